"""Write inference results to the database: one transaction, one current result.

Running the same step twice keeps the older rows (history) but leaves exactly
one current report and one current set of probe scores per study.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import update
from sqlalchemy.orm import Session

from preread.schemas.findings import DraftReport
from preread.schemas.tables import Finding, ProbeScore, Report, Study

if TYPE_CHECKING:
    from preread.worker.inference.engine import DraftResult, ProbeResult


def draft_text(report: DraftReport) -> str:
    """The human-readable draft: a findings list, then the impression."""
    lines = ["Findings:"]
    for finding in report.findings:
        lines.append(f"- {finding.text}")
    if not report.findings:
        lines.append("- No findings listed.")
    lines += ["", f"Impression: {report.impression}"]
    return "\n".join(lines)


def save_draft(session: Session, study_id: int, result: DraftResult) -> Report:
    """Store ``result`` as the study's current report; earlier reports stay, not current."""
    session.execute(update(Report).where(Report.study_id == study_id, Report.current.is_(True)).values(current=False))
    session.flush()
    parsed = result.report
    report = Report(
        study_id=study_id,
        current=True,
        draft_text=draft_text(parsed) if parsed else None,
        impression=parsed.impression if parsed else None,
        urgency=str(parsed.urgency) if parsed else None,
        raw_output=result.raw_output,
        thinking=result.thinking,
        parse_status=str(result.parse_status),
        parse_error=result.parse_error,
        structured=parsed.model_dump(mode="json") if parsed else None,
        model_id=result.model_id,
        model_revision=result.model_revision,
        prompt_version=result.prompt_version,
        mode=result.mode,
        min_pixels=result.min_pixels,
        max_pixels=result.max_pixels,
        n_images=result.n_images,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        timings=dict(result.timings),
    )
    if parsed:
        report.findings = [
            Finding(
                ordinal=i,
                text=f.text,
                anatomy=f.anatomy or None,
                laterality=str(f.laterality),
                presence=str(f.presence),
                severity=str(f.severity),
            )
            for i, f in enumerate(parsed.findings)
        ]
    session.add(report)
    session.flush()
    return report


def save_probes(session: Session, study_id: int, probes: Sequence[ProbeResult], model_id: str) -> None:
    """Store a study's probe scores as current; earlier scores stay, not current."""
    session.execute(
        update(ProbeScore).where(ProbeScore.study_id == study_id, ProbeScore.current.is_(True)).values(current=False)
    )
    session.add_all(
        ProbeScore(
            study_id=study_id,
            condition=p.condition,
            question=p.question,
            score=float(p.score),
            current=True,
            model_id=model_id,
            prompt_version=p.prompt_version,
        )
        for p in probes
    )
    # The worklist sorts on the highest current score: kept on the study row, in the same transaction.
    top = max((float(p.score) for p in probes), default=0.0)
    session.execute(update(Study).where(Study.id == study_id).values(top_probe_score=top))
    session.flush()

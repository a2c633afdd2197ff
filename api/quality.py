"""How the drafts do, from the readers' latest answer per study: probe accuracy, verdicts, versions."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from preread.api import models
from preread.schemas.settings import Settings
from preread.schemas.tables import Feedback, Report
from preread.worker.inference.thresholds import ProbeThreshold, threshold_for

VERDICTS = ("accept", "edit", "reject")


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U; ties count half); None without both classes."""
    if not positives or not negatives:
        return None
    wins = 0.0
    for p in positives:
        for n in negatives:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(positives) * len(negatives))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def probe_quality(probe: str, threshold: float, pairs: list[tuple[float, bool]]) -> models.ProbeQuality:
    """Sensitivity and specificity at ``threshold`` and AUROC for (score, reader's label) pairs."""
    pos = [s for s, label in pairs if label]
    neg = [s for s, label in pairs if not label]
    tp = sum(s >= threshold for s in pos)
    tn = sum(s < threshold for s in neg)
    return models.ProbeQuality(
        probe=probe,
        threshold=threshold,
        labelled=len(pairs),
        positives=len(pos),
        negatives=len(neg),
        true_positives=tp,
        false_negatives=len(pos) - tp,
        true_negatives=tn,
        false_positives=len(neg) - tn,
        sensitivity=_ratio(tp, len(pos)),
        specificity=_ratio(tn, len(neg)),
        auroc=auroc(pos, neg),
    )


def quality(session: Session, settings: Settings, thresholds: dict[str, ProbeThreshold]) -> models.QualityOut:
    """The quality figures over each study's latest feedback."""
    latest = select(func.max(Feedback.id)).group_by(Feedback.study_id)
    rows = session.execute(
        select(Feedback.verdict, Feedback.labels, Feedback.scores, Report.model_id, Report.prompt_version)
        .outerjoin(Report, Report.id == Feedback.report_id)
        .where(Feedback.id.in_(latest))
    ).all()
    pairs: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    verdicts = {v: 0 for v in VERDICTS}
    versions: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {v: 0 for v in VERDICTS})
    for verdict, labels, scores, model_id, prompt_version in rows:
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        versions[(model_id or "unknown", prompt_version or "unknown")][verdict] += 1
        for probe, label in (labels or {}).items():
            score = (scores or {}).get(probe)
            if score is not None:
                pairs[probe].append((float(score), bool(label)))
    total = len(rows)
    return models.QualityOut(
        answered_studies=total,
        probes=[
            probe_quality(probe, threshold_for(thresholds, probe, settings).priority, pairs[probe]) for probe in sorted(pairs)
        ],
        verdicts=[models.VerdictQuality(verdict=cast(models.Verdict, v), count=c, rate=c / total if total else 0.0) for v, c in verdicts.items()],
        versions=[
            models.VersionQuality(
                model_id=model_id, prompt_version=prompt, answered=sum(counts.values()),
                accept_rate=counts["accept"] / sum(counts.values()), **counts,
            )
            for (model_id, prompt), counts in sorted(versions.items())
        ],
    )

"""The export step: deliver a DRAFTED study's current report to every destination.

The Celery export task and ``preread draft`` call this once per draft. It plans one
delivery row per destination and sends them all at once, each destination in its own
thread; what fails stays pending with its next attempt time, and the coordinator's
:func:`~preread.worker.exporters.deliveries.deliver_due` retries it. The study becomes
EXPORTED when every delivery has finished, so an unreachable destination never fails
the study nor holds up the others.
"""

from __future__ import annotations

import logging

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Study, StudyState
from preread.worker.exporters.deliveries import deliver_report
from preread.worker.pipeline.stages import EXPORTABLE, BadInput, StepOutcome, current_report, study_in_state

log = logging.getLogger(__name__)


def export_step(settings: Settings, study_id: int) -> StepOutcome:
    """Deliver the current report of a DRAFTED study; EXPORTED once every destination has it."""
    with session_scope(settings.effective_database_url) as session:
        study_in_state(session, study_id, EXPORTABLE)
        report = current_report(session, study_id)
        if report is None:
            raise BadInput("drafted study has no current report")
        report_id = report.id
    delivered, still_open = deliver_report(settings, study_id, report_id)
    with session_scope(settings.effective_database_url) as session:
        study = session.get(Study, study_id)
        state = StudyState(study.state) if study is not None else StudyState.DRAFTED
    detail = f"{delivered} delivered, {still_open} pending"
    if still_open:
        log.info("study %s: %s; the coordinator retries the rest", study_id, detail)
    return StepOutcome(study_id, state, detail=detail)

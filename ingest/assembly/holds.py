"""Studies other parts of the pipeline still hold: pending deliveries and open archive sweeps.

Retention must not remove a study whose results are still going out, and neither
retention nor the release hint may touch a study an open sweep is still retrieving.
The ``deliveries`` and ``sweep_studies`` tables belong to other stages and may not
exist in every deployment's schema yet, so each hold is a SQL condition that is
added only when its table is there (looked up once per database; a table, once
present, stays).
"""

from __future__ import annotations

from sqlalchemy import TextClause, inspect, text
from sqlalchemy.orm import Session

#: Delivery states in which a study's result is still on its way out.
PENDING_DELIVERY_STATES = ("pending", "sending", "unconfirmed")
#: Sweep states in which a sweep still owns the studies it found.
OPEN_SWEEP_STATES = ("queued", "running", "paused")

_present: set[tuple[str, str]] = set()


def has_table(session: Session, name: str) -> bool:
    """Whether the database of ``session`` has table ``name`` (a positive answer is remembered)."""
    bind = session.get_bind()
    key = (str(bind.engine.url), name)
    if key in _present:
        return True
    found = inspect(session.connection()).has_table(name)
    if found:
        _present.add(key)
    return found


def _in_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)  # fixed enum words above, never user input


def not_delivering(session: Session) -> list[TextClause]:
    """Conditions on ``studies`` excluding a study with a delivery still pending (none without the table)."""
    if not has_table(session, "deliveries"):
        return []
    return [text(
        "NOT EXISTS (SELECT 1 FROM deliveries WHERE deliveries.study_id = studies.id "
        f"AND deliveries.state IN ({_in_list(PENDING_DELIVERY_STATES)}))"
    )]


def not_in_open_sweep(session: Session) -> list[TextClause]:
    """Conditions on ``studies`` excluding a study an open sweep owns (none without the tables)."""
    if not (has_table(session, "sweep_studies") and has_table(session, "sweeps")):
        return []
    return [text(
        "NOT EXISTS (SELECT 1 FROM sweep_studies JOIN sweeps ON sweeps.id = sweep_studies.sweep_id "
        "WHERE sweep_studies.study_instance_uid = studies.study_instance_uid "
        f"AND sweeps.state IN ({_in_list(OPEN_SWEEP_STATES)}))"
    )]

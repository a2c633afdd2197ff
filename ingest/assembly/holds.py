"""Studies other parts of the pipeline still hold: pending deliveries and open archive sweeps.

Retention must not remove a study whose results are still going out, and neither
retention nor the release hint may touch a study an open sweep is still retrieving.
Each hold is a condition on ``studies`` that a query adds to its WHERE clause.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, exists, select

from preread.schemas.tables import Delivery, DeliveryState, Study, Sweep, SweepState, SweepStudy

#: Delivery states in which a study's result is still on its way out.
PENDING_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.UNCONFIRMED)
#: Sweep states in which a sweep still owns the studies it found.
OPEN_SWEEP_STATES = (SweepState.QUEUED, SweepState.RUNNING, SweepState.PAUSED)


def not_delivering() -> list[ColumnElement[bool]]:
    """Conditions on ``studies`` excluding a study with a delivery still pending."""
    pending = select(Delivery.id).where(
        Delivery.study_id == Study.id, Delivery.state.in_([str(s) for s in PENDING_DELIVERY_STATES]))
    return [~exists(pending)]


def not_in_open_sweep() -> list[ColumnElement[bool]]:
    """Conditions on ``studies`` excluding a study an open sweep owns."""
    owned = (
        select(SweepStudy.id)
        .join(Sweep, Sweep.id == SweepStudy.sweep_id)
        .where(SweepStudy.study_instance_uid == Study.study_instance_uid,
               Sweep.state.in_([str(s) for s in OPEN_SWEEP_STATES]))
    )
    return [~exists(owned)]

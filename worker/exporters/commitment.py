"""Storage Commitment results: the N-EVENT-REPORT a PACS sends after our N-ACTION.

The PACS answers on an association it opens to our listener. :func:`handle_n_event_report`
is a pynetdicom ``evt.EVT_N_EVENT_REPORT`` handler for the listener to bind (with
:data:`COMMITMENT_CONTEXT_ROLES` on its supported Storage Commitment Push Model context);
it confirms (or fails) the deliveries of the transaction.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from pynetdicom import sop_class

from preread.schemas.settings import Settings
from preread.worker.exporters.deliveries import confirm_commitment

log = logging.getLogger(__name__)

#: The listener accepts the Storage Commitment Push Model with the PACS as SCP (it sends the report).
COMMITMENT_SOP_CLASS: str = sop_class.StorageCommitmentPushModel  # type: ignore[attr-defined]  # pynetdicom builds its SOP class names at import
COMMITMENT_CONTEXT_ROLES = {"scu_role": False, "scp_role": True}


class EventType(enum.IntEnum):
    """N-EVENT-REPORT Event Type ID of the Storage Commitment Push Model (PS3.4 J.3.3)."""

    ALL_COMMITTED = 1
    FAILURES_EXIST = 2


class ReportStatus(enum.IntEnum):
    """Statuses we answer an N-EVENT-REPORT with (PS3.7 C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110


def handle_n_event_report(event: Any, settings: Settings) -> tuple[int, None]:
    """Confirm the transaction's deliveries; bind with ``(evt.EVT_N_EVENT_REPORT, handle_n_event_report, [settings])``."""
    if event.request.AffectedSOPClassUID != COMMITMENT_SOP_CLASS:
        return ReportStatus.PROCESSING_FAILURE, None
    info = event.event_information
    transaction_uid = str(info.get("TransactionUID", ""))
    committed = event.request.EventTypeID == EventType.ALL_COMMITTED and not info.get("FailedSOPSequence")
    confirmed = confirm_commitment(settings, transaction_uid, committed)
    log.info("storage commitment %s: %s, %d deliveries updated", transaction_uid, "committed" if committed else "failed", confirmed)
    return ReportStatus.SUCCESS, None

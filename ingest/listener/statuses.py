"""C-STORE and C-ECHO response statuses the listener answers with (PS3.4 B.2.3, PS3.7 C).

The standard's names for the codes it names; our own names for the
sub-codes we use inside its ranges (each listed in ``docs/conformance.md``).
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """A C-STORE-RSP (or C-ECHO-RSP) Status value."""

    #: Success.
    SUCCESS = 0x0000
    #: Refused: Out of Resources (standard): the disk is below the free-space watermark; nothing was kept.
    OUT_OF_RESOURCES = 0xA700
    #: Refused: Out of Resources, ours: the file or its index row could not be written; retry later.
    OUT_OF_RESOURCES_NOT_STORED = 0xA701
    #: Error: Cannot understand, ours: the data set is not well formed or cannot be parsed (bytes quarantined).
    CANNOT_UNDERSTAND_MALFORMED = 0xC210
    #: Error: Cannot understand, pynetdicom's: the store handler raised (not expected; logged).
    CANNOT_UNDERSTAND_HANDLER_FAILED = 0xC211
    #: Error: Cannot understand, ours: a Study/Series/SOP Instance/SOP Class UID is missing or invalid.
    CANNOT_UNDERSTAND_INVALID_IDENTITY = 0xC220
    #: Error: Cannot understand, ours: the data set's SOP UIDs differ from the request's Affected SOP UIDs.
    CANNOT_UNDERSTAND_IDENTITY_MISMATCH = 0xC221
    #: Error: Cannot understand, ours: the request's Affected SOP Instance UID is empty or invalid.
    CANNOT_UNDERSTAND_INVALID_REQUEST = 0xC222

    def __str__(self) -> str:
        return f"0x{int(self):04X}"

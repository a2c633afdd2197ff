"""The end of an association as a completion hint.

A sender that releases an association cleanly has, as far as it knows, sent what
it had. For each study that association stored instances of, the release sets
``studies.released_at`` and ``release_hint_at = released_at + grace`` (the
``release_grace`` setting, by modality: a single-frame projection is complete at
once, CT and MR senders often use one association per series). The stability
monitor (:func:`~preread.ingest.assembly.stability.mark_stable`) then makes the
study STABLE once the hint time has passed, unless an instance arrived after the
release (or an open sweep owns the study); the idle timer stays the fallback for
senders that keep associations open. An aborted association gives no hint. The
listener passes ``on_hint`` (its monitor's ``due_in``) so the monitor looks when the
grace ends rather than at its next tick.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

from pynetdicom.events import Event
from sqlalchemy import Engine, select, update

from preread.schemas.settings import Settings
from preread.schemas.tables import Study, StudyState, utcnow

LOGGER = logging.getLogger("preread.ingest.release")

_stored: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def note_stored(assoc: Any, study_uid: str) -> None:
    """Remember that ``assoc`` stored an instance of ``study_uid`` (called by the C-STORE handler)."""
    with _lock:
        _stored.setdefault(assoc, set()).add(study_uid)


def take_stored(assoc: Any) -> set[str]:
    """The study UIDs ``assoc`` stored instances of, forgotten as they are taken."""
    with _lock:
        return _stored.pop(assoc, set())


def hint_released(engine: Engine, settings: Settings, study_uids: set[str],
                  writer: AbstractContextManager[Any] | None = None) -> list[float]:
    """Set the release hint on those of ``study_uids`` still RECEIVING; returns the grace of each hinted.

    ``writer``: the index's SQLite writer turn (:class:`~preread.ingest.assembly.index.WriterLock`),
    taken for the transaction so that it waits its turn instead of busy-polling the file lock.
    """
    if not study_uids:
        return []
    now = utcnow()
    hinted: list[float] = []
    with writer or nullcontext(), engine.begin() as conn:
        rows = conn.execute(
            select(Study.id, Study.modalities)
            .where(Study.study_instance_uid.in_(sorted(study_uids)), Study.state == StudyState.RECEIVING)
        ).all()
        for row in rows:
            grace = settings.grace_for(row.modalities)
            conn.execute(
                update(Study)
                .where(Study.id == row.id, Study.state == StudyState.RECEIVING)
                .values(released_at=now, release_hint_at=now + timedelta(seconds=grace))
            )
            hinted.append(grace)
    return hinted


def handle_released(event: Event, engine: Engine, settings: Settings,
                    on_hint: Callable[[float], None] | None = None,
                    writer: AbstractContextManager[Any] | None = None) -> None:
    """``evt.EVT_RELEASED``: the studies this association stored are complete after their grace.

    ``on_hint(seconds)`` learns when the first of those graces ends (the stability monitor's ``due_in``).
    """
    uids = take_stored(event.assoc)
    try:
        graces = hint_released(engine, settings, uids, writer)
    except Exception as exc:  # the idle timer is the fallback: a failed hint only delays
        LOGGER.warning("release hint not recorded (%d studies): %s", len(uids), type(exc).__name__)
        return
    if graces:
        LOGGER.debug("association released: %d studies complete after their grace", len(graces))
        if on_hint is not None:
            on_hint(min(graces))


def handle_aborted(event: Event) -> None:
    """``evt.EVT_ABORTED``: no hint; forget what the association stored."""
    take_stored(event.assoc)

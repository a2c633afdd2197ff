"""The outbox dispatcher: publishes committed hand-offs to the broker.

A state change and its outbox row commit together; this publishes the row and
marks it sent. A crash between publish and mark re-publishes the row later,
which the idempotent tasks absorb.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Outbox, utcnow
from preread.worker.pipeline.queues import TASK_FOR_TOPIC

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


def dispatch_once(settings: Settings, app: Celery, *, limit: int = 200) -> int:
    """Publish up to ``limit`` unsent outbox rows, most urgent first; returns how many were sent."""
    from preread.worker.pipeline.broker import message_priority

    sent = 0
    broker_url = str(app.conf.broker_url or "")
    with session_scope(settings.effective_database_url) as session:
        query = (
            select(Outbox)
            .where(Outbox.sent_at.is_(None))
            .order_by(Outbox.priority.desc(), Outbox.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        for row in session.scalars(query):
            task = TASK_FOR_TOPIC.get(row.topic)
            if task is None:
                log.error("outbox row %s has unknown topic %r; dropped", row.id, row.topic)
                row.sent_at = utcnow()
                continue
            options: dict[str, object] = {"queue": row.topic, "routing_key": row.topic}
            priority = message_priority(broker_url, row.priority)
            if priority is not None:
                options["priority"] = priority
            try:
                app.send_task(task, args=[row.study_id], **options)
            except Exception as exc:  # broker down: keep the rest for the next pass
                log.warning("broker unavailable, %d outbox rows wait: %s", 1, type(exc).__name__)
                break
            row.sent_at = utcnow()
            row.attempts += 1
            sent += 1
    return sent


class OutboxPublisher:
    """Publishes the outbox from a process that is not a worker (the listener's stability monitor).

    The Celery app is built on first use from the process's own settings, so
    a listener that never marks a study STABLE never imports Celery.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app: Celery | None = None

    def __call__(self) -> int:
        """Publish what is unsent; the coordinator (if any) publishes what this could not."""
        if self._app is None:
            from preread.worker.pipeline.broker import make_celery

            self._app = make_celery(self.settings)
        return dispatch_once(self.settings, self._app, limit=200)

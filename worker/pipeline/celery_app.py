"""The Celery application: queues, routing, delivery guarantees.

Pipeline state lives in the database; Celery only carries "work on study N"
messages, so no result backend is used. Work that must not be lost is
acknowledged late and rejected back to the queue when a worker dies; the
outbox and the reconciler cover what a broker itself loses.
"""

from __future__ import annotations

from preread.worker.pipeline.broker import embedded_broker, make_celery, message_priority, queue_folder
from preread.worker.pipeline.queues import EXPORT, INFER, QUEUES, RENDER, TASK_FOR_TOPIC

__all__ = ["EXPORT", "INFER", "QUEUES", "RENDER", "TASK_FOR_TOPIC", "app", "embedded_broker", "make_celery",
           "message_priority", "queue_folder"]

app = make_celery()

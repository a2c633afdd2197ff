"""Queue and task names shared by the Celery app, the dispatcher and the CLI."""

from __future__ import annotations

#: Queue names: CPU rendering, GPU inference, pushing results out.
RENDER, INFER, EXPORT = "render", "infer", "export"
QUEUES = (RENDER, INFER, EXPORT)

#: Task names, stable across refactors because messages in flight carry them.
TASK_FOR_TOPIC = {
    RENDER: "preread.render_study",
    INFER: "preread.infer_study",
    EXPORT: "preread.export_study",
}

"""``preread worker``: a Celery worker for some of the pipeline's queues."""

from __future__ import annotations

import os
import socket
from typing import Annotated

import typer

from preread.worker.pipeline.queues import INFER, QUEUES


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: render, infer, export.")] = ",".join(QUEUES),
    concurrency: Annotated[int, typer.Option(help="Tasks at once (threads share one model on infer).")] = 1,
    pool: Annotated[str | None, typer.Option(help="Celery pool; default 'threads' with infer, else 'prefork'.")] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    gpus: Annotated[str | None, typer.Option(help="'all' or GPU indices '0,1': one worker process per GPU, "
                                             "each pinned with CUDA_VISIBLE_DEVICES, restarted if it dies.")] = None,
) -> None:
    """Run a worker. GPU workers serve 'infer' with one model loaded once per process."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if unknown or not names:
        raise typer.BadParameter(f"unknown queue(s) {unknown}; choose from {', '.join(QUEUES)}")
    if gpus is not None:  # a supervisor of one `preread worker` per GPU (worker/pipeline/gpus.py)
        from preread.worker.pipeline.gpus import per_gpu_workers

        raise typer.Exit(per_gpu_workers(gpus, names, concurrency, pool, loglevel))
    os.environ["PREREAD_WORKER_QUEUES"] = ",".join(names)
    from preread.worker.pipeline.celery_app import app

    chosen_pool = pool or ("threads" if INFER in names else "prefork")
    app.worker_main(
        [
            "worker",
            "-Q", ",".join(names),
            "-c", str(concurrency),
            "-P", chosen_pool,
            "-n", f"preread-{'-'.join(names)}-{os.getpid()}@{socket.gethostname()}",
            "--loglevel", loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )

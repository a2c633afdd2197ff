"""API token roles, importable without the database layer (``preread token --help`` stays fast)."""

from __future__ import annotations

import enum


class ApiRole(enum.StrEnum):
    """What an API token may do: read the queue, answer it, administer, or (worker) scrape health and metrics
    and fetch the PNGs a GPU host drafts from, never a patient's identity."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
    WORKER = "worker"

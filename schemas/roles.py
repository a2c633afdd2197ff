"""API token roles, importable without the database layer (``preread token --help`` stays fast)."""

from __future__ import annotations

import enum


class ApiRole(enum.StrEnum):
    """What an API token may do: read the queue, answer it, administer, or scrape health and metrics."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
    WORKER = "worker"

"""Free space: the watermark below which nothing new is accepted."""

from __future__ import annotations

import shutil
from pathlib import Path


def has_free_space(path: Path, min_free_bytes: int, incoming: int = 0) -> bool:
    """Whether the file system of ``path`` keeps ``min_free_bytes`` after ``incoming`` more."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free - incoming >= min_free_bytes

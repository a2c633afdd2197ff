"""Retention: remove stored instances, PNGs and quarantine past ``PREREAD_RETENTION_DAYS``.

Off unless configured: with ``retention_days`` unset nothing is ever deleted.
Only files go: every database row (studies, series, instances, images, reports,
findings, probe scores, feedback, audit) stays, and the study records when its
files were removed (``studies.files_removed_at``) and how many bytes that freed.
Each run is a ``cleanup_runs`` row, which ``preread status`` shows.

A study is eligible once it is finished (DRAFTED, EXPORTED or FAILED: never while
RECEIVING, STABLE or RENDERED), has no delivery pending and is not owned by an open
sweep (:mod:`~preread.ingest.assembly.holds`). The age pass takes studies whose last
instance arrived before the limit; the space pass (free space under twice
``PREREAD_MIN_FREE_BYTES``) takes the oldest eligible studies first until free space
is back above twice the watermark, so that the listener never stays at 0xA700.

A step that needs a cleaned study's files calls :func:`check_files_present`, which
raises :class:`FilesRemoved` naming what was removed and when.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy.orm import Session

from preread.ingest.assembly.holds import not_delivering, not_in_open_sweep
from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import CleanupRun, Image, Instance, Series, Study, StudyState, utcnow

LOGGER = logging.getLogger("preread.ingest.retention")

#: States in which a study's files may go: nothing is still receiving or working on them.
FINISHED = (StudyState.DRAFTED, StudyState.EXPORTED, StudyState.FAILED)
#: Seconds between age passes run by the coordinator.
DAILY = 24 * 3600.0
#: The space pass frees until free space is this many times the listener's watermark.
SPACE_FACTOR = 2
#: Seconds between space passes while free space stays low.
SPACE_RETRY_S = 60.0
#: ``cleanup_runs.reason`` values.
REASON_AGE = "age"
REASON_SPACE = "space"


class RetentionOff(Exception):
    """Cleanup was asked for while ``PREREAD_RETENTION_DAYS`` is unset."""


class FilesRemoved(Exception):
    """A step needs a study's files, and retention cleanup removed them."""


@dataclass
class CleanupResult:
    """What one cleanup removed (or, in a dry run, would remove)."""

    reason: str
    dry_run: bool
    studies: list[str] = field(default_factory=list)
    files: int = 0
    bytes_freed: int = 0
    quarantine_files: int = 0
    free_bytes_after: int | None = None

    def summary(self) -> str:
        """One line for logs and the CLI."""
        verb = "would free" if self.dry_run else "freed"
        return (f"cleanup ({self.reason}): {len(self.studies)} studies, {self.files} files, "
                f"{self.quarantine_files} quarantined files; {verb} {human_bytes(self.bytes_freed)}")


def human_bytes(count: int) -> str:
    """``1.5 GiB``-style size."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


# --- the check other steps call -------------------------------------------------------------


def check_files_present(session: Session, study_id: int, files: list[Path] | None = None) -> None:
    """Raise :class:`FilesRemoved` if cleanup removed files of the study that a step needs now.

    ``files`` are the paths the step is about to read (default: the study's instances).
    A study cleanup never touched, or whose files have all come back (sent again), passes.
    """
    study = session.get(Study, study_id)
    if study is None or study.files_removed_at is None:
        return
    if files is None:
        files = [Path(p) for p in session.execute(
            select(Instance.path).join(Series, Instance.series_id == Series.id).where(Series.study_id == study_id)
        ).scalars()]
    missing = sum(1 for path in files if not path.exists())
    if not missing and files:
        return
    instances = session.execute(
        select(func.count()).select_from(Instance).join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
    ).scalar_one()
    images = session.execute(select(func.count()).select_from(Image).where(Image.study_id == study_id)).scalar_one()
    freed = f" ({human_bytes(study.files_removed_bytes)})" if study.files_removed_bytes else ""
    raise FilesRemoved(
        f"study {study.study_instance_uid}: its {instances} stored instances and {images} PNGs{freed} were removed by "
        f"retention cleanup on {study.files_removed_at:%Y-%m-%d %H:%M} UTC (PREREAD_RETENTION_DAYS); "
        "send the study again to process it; its reports are kept"
    )


# --- choosing and removing ---------------------------------------------------------------------


def eligible(session: Session, *, before: datetime | None, limit: int = 100) -> list[tuple[int, str]]:
    """(id, UID) of studies whose files may go, oldest last instance first; only older than ``before`` if given."""
    stmt = (
        select(Study.id, Study.study_instance_uid)
        .where(
            Study.state.in_([str(s) for s in FINISHED]),
            or_(Study.files_removed_at.is_(None), Study.last_received_at > Study.files_removed_at),
            *not_delivering(),
            *not_in_open_sweep(),
        )
        .order_by(Study.last_received_at, Study.id)
        .limit(limit)
    )
    if before is not None:
        stmt = stmt.where(Study.last_received_at < before)
    return [(row.id, row.study_instance_uid) for row in session.execute(stmt)]


def _claim(session: Session, study_id: int, now: datetime) -> bool:
    """Mark the study's files as going, only if it is still finished and unheld (the same rule as :func:`eligible`)."""
    changed = cast(CursorResult[Any], session.execute(
        update(Study)
        .where(Study.id == study_id, Study.state.in_([str(s) for s in FINISHED]),
               *not_delivering(), *not_in_open_sweep())
        .values(files_removed_at=now, files_removed_bytes=0)
        .execution_options(synchronize_session=False)
    )).rowcount
    return bool(changed)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in roots)


def _unlink(path: Path, dry_run: bool) -> int:
    """Remove one file; its size, or 0 when it was not there."""
    try:
        size = path.stat().st_size
        if not dry_run:
            path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its empty parents up to (not including) ``stop``."""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def study_files(session: Session, study_id: int, received_by: datetime | None) -> list[Path]:
    """The study's instance files and PNGs (instances received by ``received_by`` when given)."""
    instances = select(Instance.path).join(Series, Instance.series_id == Series.id).where(Series.study_id == study_id)
    if received_by is not None:
        instances = instances.where(Instance.received_at <= received_by)
    paths = [Path(p) for p in session.execute(instances).scalars()]
    paths += [Path(p) for p in session.execute(select(Image.path).where(Image.study_id == study_id)).scalars()]
    return paths


def remove_study(settings: Settings, study_id: int, uid: str, *, dry_run: bool, now: datetime) -> tuple[int, int] | None:
    """Remove one study's instance files, PNGs and manifest; (files, bytes), or None if it was no longer eligible."""
    url = settings.effective_database_url
    storage_root, images_root = settings.storage_dir.resolve(), settings.images_dir.resolve()
    with session_scope(url) as session:
        if not dry_run and not _claim(session, study_id, now):
            return None
        paths = study_files(session, study_id, None if dry_run else now)
    images_dir = images_root / uid
    if images_dir.is_dir():
        paths += [p for p in images_dir.rglob("*") if p.is_file()]
    files = freed = 0
    for path in dict.fromkeys(paths):  # an Image path also found by the folder walk counts once
        if not _inside(path, (storage_root, images_root)):
            LOGGER.warning("study %d: not removing %s: outside the data dir", study_id, path)
            continue
        size = _unlink(path, dry_run)
        if size or path.exists():
            files += 1
            freed += size
        if not dry_run:
            _prune_empty(path.parent, storage_root if path.resolve().is_relative_to(storage_root) else images_root)
    if not dry_run:
        with session_scope(url) as session:
            session.execute(update(Study).where(Study.id == study_id).values(files_removed_bytes=freed))
    return files, freed


def clean_quarantine(settings: Settings, before: datetime, *, dry_run: bool) -> tuple[int, int]:
    """Remove quarantined files (data sets and their reason files) last written before ``before``."""
    folder = settings.quarantine_dir
    if not folder.is_dir():
        return 0, 0
    files = freed = 0
    limit = before.timestamp()
    for path in folder.iterdir():
        try:
            if not path.is_file() or path.stat().st_mtime >= limit:
                continue
        except FileNotFoundError:
            continue
        size = _unlink(path, dry_run)
        files += 1
        freed += size
    return files, freed


def cleanup(settings: Settings, *, dry_run: bool = False, reason: str = REASON_AGE, now: datetime | None = None) -> CleanupResult:
    """Remove what retention allows; ``reason=REASON_SPACE`` also takes younger studies, oldest first, until
    free space is back above twice the watermark. Raises :class:`RetentionOff` when retention is unset."""
    if settings.retention_days is None:
        raise RetentionOff("PREREAD_RETENTION_DAYS is not set: retention is off and nothing is deleted; "
                           "set it (days) to enable cleanup")
    now = now or utcnow()
    cutoff = now - timedelta(days=settings.retention_days)
    target = SPACE_FACTOR * settings.min_free_bytes
    result = CleanupResult(reason=reason, dry_run=dry_run)
    url = settings.effective_database_url

    def enough() -> bool:
        if reason != REASON_SPACE:
            return False
        if dry_run:
            return free_bytes(settings.data_dir) + result.bytes_freed >= target
        return free_bytes(settings.data_dir) >= target

    qfiles, qfreed = clean_quarantine(settings, cutoff, dry_run=dry_run)
    result.quarantine_files, result.bytes_freed = qfiles, qfreed
    for before in (cutoff, None) if reason == REASON_SPACE else (cutoff,):
        seen: set[int] = set()
        while not enough():
            with session_scope(url) as session:
                batch = [(i, u) for i, u in eligible(session, before=before, limit=100 + len(seen)) if i not in seen]
            if not batch:
                break
            for study_id, uid in batch:
                seen.add(study_id)
                removed = remove_study(settings, study_id, uid, dry_run=dry_run, now=now)
                if removed is not None:
                    result.studies.append(uid)
                    result.files += removed[0]
                    result.bytes_freed += removed[1]
                if enough():
                    break
    result.free_bytes_after = free_bytes(settings.data_dir)
    if not dry_run:
        with session_scope(url) as session:
            session.add(CleanupRun(
                reason=reason, studies=len(result.studies), files=result.files + result.quarantine_files,
                bytes_freed=result.bytes_freed, free_bytes_after=result.free_bytes_after, started_at=now,
                finished_at=utcnow(),
            ))
    LOGGER.info("%s", result.summary())
    return result


# --- the coordinator's trigger and the status lines ----------------------------------------------


def due(settings: Settings, now: datetime | None = None) -> str | None:
    """Which cleanup the coordinator should run now: ``space``, ``age`` (a day since the last), or None."""
    if settings.retention_days is None:
        return None
    if free_bytes(settings.data_dir) < SPACE_FACTOR * settings.min_free_bytes:
        return REASON_SPACE
    now = now or utcnow()
    with session_scope(settings.effective_database_url) as session:
        last = session.execute(
            select(func.max(CleanupRun.started_at)).where(CleanupRun.reason == REASON_AGE)
        ).scalar_one_or_none()
    if last is None or (now - last).total_seconds() >= DAILY:
        return REASON_AGE
    return None


_last_space_pass = -SPACE_RETRY_S


def run_if_due(settings: Settings) -> CleanupResult | None:
    """The coordinator's call: run the cleanup :func:`due` names, if any.

    A space pass runs at most every ``SPACE_RETRY_S`` seconds: when nothing more may
    go, the disk stays low until studies finish, and that is said once per pass.
    """
    global _last_space_pass
    reason = due(settings)
    if reason is None:
        return None
    if reason == REASON_SPACE:
        if time.monotonic() - _last_space_pass < SPACE_RETRY_S:
            return None
        _last_space_pass = time.monotonic()
    result = cleanup(settings, reason=reason)
    if reason == REASON_SPACE and (result.free_bytes_after or 0) < SPACE_FACTOR * settings.min_free_bytes:
        LOGGER.warning(
            "free space %s is still under twice PREREAD_MIN_FREE_BYTES (%s) after cleanup: no more finished, unheld "
            "study to remove; free disk space or raise the disk size", human_bytes(result.free_bytes_after or 0),
            human_bytes(SPACE_FACTOR * settings.min_free_bytes))
    return result


def status_lines(settings: Settings) -> list[str]:
    """Disk use of the data dir and what cleanup last freed, for ``preread status``."""
    probe = settings.data_dir
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    lines = [
        f"disk: {human_bytes(usage.used)} used, {human_bytes(usage.free)} free of {human_bytes(usage.total)} "
        f"(listener refuses below {human_bytes(settings.min_free_bytes)})"
    ]
    if settings.retention_days is None:
        lines.append("retention: off (PREREAD_RETENTION_DAYS unset; nothing is deleted)")
    else:
        lines.append(f"retention: {settings.retention_days} days")
    with session_scope(settings.effective_database_url) as session:
        last = session.execute(select(CleanupRun).order_by(CleanupRun.started_at.desc(), CleanupRun.id.desc()).limit(1)).scalar_one_or_none()
        if last is not None:
            lines.append(
                f"last cleanup ({last.reason}) {last.started_at:%Y-%m-%d %H:%M} UTC: {last.studies} studies, "
                f"{last.files} files, freed {human_bytes(last.bytes_freed)}"
            )
    return lines


__all__ = [
    "CleanupResult", "FilesRemoved", "RetentionOff", "check_files_present", "cleanup", "due", "run_if_due",
    "status_lines",
]

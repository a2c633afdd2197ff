"""Where the infer step's PNGs come from: this host's data dir, or the listener host's reading-queue API.

Without ``PREREAD_IMAGES_URL`` the step reads the PNGs the render step wrote
(one host, or a shared mount). With it, a GPU host that shares only the broker
and the database with the listener fetches the study's render manifest and each
PNG from that host's ``preread api`` with ``PREREAD_WORKER_TOKEN`` (a
``worker``-role token), writes them atomically under its own data dir
(``fetched/``), checks each one's size and SHA-256 against the manifest, and
removes them once the step is done.

Errors say which setting to look at. An API that cannot be reached, times out
or answers 5xx/429 raises :class:`ImagesUnreachable`, a :class:`ConnectionError`
and so one of the infer task's declared ``autoretry_for`` errors (counted as
attempts, up to ``PREREAD_MAX_ATTEMPTS``). A refused token (401/403) raises
:class:`TokenRefused`: that is this worker's configuration, not the study's, so
the infer step leaves the study RENDERED and the worker goes not ready (its
readiness check, :func:`images_problem`, asks the API's whoami with the token),
as a worker whose token is refused at start is. Other refusals
(:class:`ImagesRefused`, :class:`ImagesMissing`) are the study's: it fails with
the reason.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from preread.ingest.storage.files import write_atomic
from preread.schemas.remote_images import IMAGE_PATH, MANIFEST_PATH, WHOAMI_PATH, RemoteManifest, WorkerIdentity
from preread.schemas.settings import Settings

log = logging.getLogger(__name__)

#: Folder under the data dir that holds fetched PNGs while a step uses them.
FETCHED_DIR = "fetched"
#: Seconds to connect, and to wait for any one read, from the API.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
#: Statuses worth another try besides 5xx: the API is busy or restarting.
RETRYABLE_STATUS = frozenset({408, 425, 429})
#: How to get a token the API accepts, for every message about a refused one.
TOKEN_FIX = ("create a worker token on the API host (`preread token create NAME --role worker`), "
             "set PREREAD_WORKER_TOKEN to it and restart this worker")


class ImagesError(Exception):
    """The study's PNGs cannot be had as things are; retrying will not help."""


class ImagesRefused(ImagesError):
    """The API refused the worker token (401/403), or answered something that is not ours."""


class TokenRefused(ImagesRefused):
    """The API refused PREREAD_WORKER_TOKEN (401 revoked or unknown, 403 another role): the worker's problem."""


class ImagesMissing(ImagesError):
    """The study's PNGs are not there (removed by retention, or never written)."""


class ImagesChanged(ImagesError):
    """The study was rendered again while its PNGs were fetched: a newer infer task has the new ones."""


class ImagesUnreachable(ConnectionError):
    """The API could not be reached, timed out, answered 5xx/429, or a PNG arrived damaged: worth another try."""


@dataclass(frozen=True, slots=True)
class StoredImage:
    """One ``images`` row of the study as the infer step read it: its id and the path on the render host."""

    image_id: int
    path: Path


@contextmanager
def study_images(settings: Settings, study_uid: str, stored: list[StoredImage]) -> Iterator[list[Path]]:
    """The study's PNGs as local files, in the model's order, for the length of the ``with`` block."""
    if not settings.images_url:
        missing = [image.path.name for image in stored if not image.path.exists()]
        if missing:
            raise ImagesMissing(f"rendered images missing on disk: {', '.join(missing[:3])}")
        yield [image.path for image in stored]
        return
    folder, paths = fetch_study(settings, study_uid, [image.image_id for image in stored])
    try:
        yield paths
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fetch_study(settings: Settings, study_uid: str, expected_ids: list[int]) -> tuple[Path, list[Path]]:
    """Fetch the study's PNGs from PREREAD_IMAGES_URL into a new folder under the data dir; (folder, paths)."""
    root = settings.data_dir / FETCHED_DIR
    prune_stale(root, older_than=2 * settings.longest_task)
    started = time.perf_counter()
    with _client(settings) as client:
        answer = _get(client, settings, MANIFEST_PATH.format(study_uid=study_uid), "render manifest of the study")
        try:
            manifest = RemoteManifest.model_validate_json(answer.content)
        except ValidationError:
            raise ImagesRefused(f"{settings.images_url} (PREREAD_IMAGES_URL) answered something that is not a render "
                                "manifest: point it at the listener host's `preread api`") from None
        if [image.image_id for image in manifest.images] != expected_ids:
            raise ImagesChanged("the study was rendered again while its images were fetched")
        folder = root / f"{study_uid}.{secrets.token_hex(4)}"
        paths: list[Path] = []
        try:
            for image in manifest.images:
                data = _get(client, settings, IMAGE_PATH.format(study_uid=study_uid, n=image.n),
                            f"rendered image {image.n} of the study").content
                if len(data) != image.size or hashlib.sha256(data).hexdigest() != image.sha256:
                    raise ImagesUnreachable(f"image {image.n} of study {study_uid} arrived with another size or "
                                            "SHA-256 than its manifest gives; it is fetched again")
                path = folder / f"{image.n:04d}.png"
                write_atomic(path, [data], sync=False)  # a cache: a killed worker leaves a stale folder, never a torn PNG
                paths.append(path)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    log.info("study %s: fetched %d images from %s in %.2fs", study_uid, len(paths), settings.images_url,
             time.perf_counter() - started)
    return folder, paths


def images_problem(settings: Settings) -> str | None:
    """Why this worker cannot fetch PNGs from PREREAD_IMAGES_URL, in one line with the fix; None when it can."""
    if not settings.images_url:
        return None
    try:
        with _client(settings) as client:
            answer = _get(client, settings, WHOAMI_PATH, "worker routes")
        WorkerIdentity.model_validate_json(answer.content)
    except (ImagesError, ImagesUnreachable) as exc:
        return str(exc)
    except ValidationError:
        return (f"{settings.images_url} (PREREAD_IMAGES_URL) is not a preread API: "
                "point it at the listener host's `preread api`")
    except OSError as exc:  # the CA bundle cannot be read
        return (f"cannot read PREREAD_IMAGES_CA={settings.images_ca}: {exc.strerror or type(exc).__name__}; "
                "fix the path or unset it")
    return None


def prune_stale(root: Path, older_than: float) -> None:
    """Remove fetched folders a killed worker left behind (older than ``older_than`` seconds)."""
    if not root.is_dir():
        return
    cutoff = time.time() - older_than
    for folder in root.iterdir():
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:  # another task's cleanup got there first
            continue


def _client(settings: Settings) -> httpx.Client:
    """An HTTP client for PREREAD_IMAGES_URL with the worker token (one per fetch: threads and forks share none)."""
    token = settings.worker_token.get_secret_value() if settings.worker_token else ""
    verify: ssl.SSLContext | bool = True
    if settings.images_ca is not None:
        verify = ssl.create_default_context(cafile=str(settings.images_ca))
    return httpx.Client(
        base_url=settings.images_url or "",
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        verify=verify,
    )


def _get(client: httpx.Client, settings: Settings, path: str, what: str) -> httpx.Response:
    """GET ``path``; the response on 2xx, else the error that says what went wrong and which setting to fix."""
    base = settings.images_url
    try:
        response = client.get(path)
    except httpx.TransportError as exc:
        raise ImagesUnreachable(f"cannot reach {base} (PREREAD_IMAGES_URL) for the {what}: {type(exc).__name__}; "
                                "start `preread api` on the listener host or fix PREREAD_IMAGES_URL") from None
    code = response.status_code
    if code < 300:
        return response
    detail = _detail(response)
    if code in (401, 403):
        raise TokenRefused(f"{base} (PREREAD_IMAGES_URL) refused PREREAD_WORKER_TOKEN (HTTP {code}: {detail}); "
                           f"{TOKEN_FIX}")
    if code in RETRYABLE_STATUS or code >= 500:
        raise ImagesUnreachable(f"{base} (PREREAD_IMAGES_URL) answered HTTP {code} for the {what}")
    if code == 404:
        hint = "; point it at the listener host's `preread api`" if path == WHOAMI_PATH else ""
        raise ImagesMissing(f"{base} (PREREAD_IMAGES_URL) has no {what} (HTTP 404: {detail}){hint}")
    raise ImagesRefused(f"{base} (PREREAD_IMAGES_URL) answered HTTP {code} for the {what}: {detail}")


def _detail(response: httpx.Response) -> str:
    """The API's one-line reason (its JSON ``detail``), never more than 300 characters."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = (detail if isinstance(detail, str) else response.reason_phrase or "").strip()
    return text.splitlines()[0][:300] if text else "no reason given"

"""Routes for remote infer workers: a study's render manifest and its PNGs, for ``worker``-role tokens only.

A GPU host that shares only the broker and the database with the listener
fetches what the infer step reads from here (``worker/inference/images.py``).
Least privilege: these routes admit the ``worker`` role and no other, and they
answer with UIDs, pixel data and window settings only; a worker token still
gets 403 from every route that shows a patient's identity (worklist, study,
search). Each PNG a worker fetches is audited as ``worker_fetch_image`` under
the worker token's name, never as a radiologist's ``view_image``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from preread.api.audit import Action, record
from preread.api.auth import db_session, require
from preread.api.routes import study_or_http_error
from preread.api.studies import NoStudy, image_path
from preread.api.tokens import Principal
from preread.ingest.storage.retention import FilesRemoved, check_files_present
from preread.schemas.remote_images import WORKER_PREFIX, RemoteImage, RemoteManifest, WorkerIdentity
from preread.schemas.tables import ApiRole, Image

#: Only worker tokens: a reader's token has no business fetching pixels by the batch.
WORKERS = frozenset({ApiRole.WORKER})

worker_api = APIRouter(prefix=WORKER_PREFIX, tags=["worker"])
Worker = Annotated[Principal, Depends(require(WORKERS))]
Db = Annotated[Session, Depends(db_session, scope="function")]
_CHUNK = 1 << 20



@lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a PNG, cached by (path, size, mtime): a re-render writes a new file."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


@worker_api.get("/whoami", response_model=WorkerIdentity, summary="The worker token's name (a remote worker's readiness check)")
def whoami(principal: Worker) -> WorkerIdentity:
    return WorkerIdentity(name=principal.name, role=str(principal.role))


@worker_api.get("/studies/{study_uid}/manifest", response_model=RemoteManifest,
                summary="The study's rendered PNGs in the model's order, with size and SHA-256 of each")
def manifest(study_uid: str, principal: Worker, session: Db) -> Response:
    study = study_or_http_error(session, study_uid)
    rows = session.execute(
        select(Image).where(Image.study_id == study.id).order_by(Image.ordinal, Image.id)
    ).scalars().all()
    try:
        check_files_present(session, study.id, [Path(row.path) for row in rows])
    except FilesRemoved as exc:  # says what retention removed, and when
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    images = []
    for n, row in enumerate(rows):
        path = Path(row.path)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                detail=f"rendered image {n} of the study is missing on the API host") from None
        images.append(RemoteImage(
            n=n, image_id=row.id, sop_instance_uid=row.sop_instance_uid, frame=row.frame, width=row.width,
            height=row.height, window=row.window, window_center=row.window_center, window_width=row.window_width,
            size=stat.st_size, sha256=_digest(str(path), stat.st_size, stat.st_mtime_ns),
        ))
    body = RemoteManifest(study_instance_uid=study.study_instance_uid, state=str(study.state), images=images)
    return Response(body.model_dump_json(), media_type="application/json")


@worker_api.get("/studies/{study_uid}/images/{n}", response_class=FileResponse,
                summary="The study's n-th rendered PNG, from 0", responses={200: {"content": {"image/png": {}}}})
def worker_image(request: Request, study_uid: str, n: int, principal: Worker, session: Db) -> FileResponse:
    study = study_or_http_error(session, study_uid)
    try:
        path = image_path(session, study, n)
    except NoStudy as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    record(session, principal, Action.WORKER_IMAGE, study_uid=study.study_instance_uid,
           client=request.client.host if request.client else None, detail=f"image {n}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})

"""Remote infer workers fetch a study's PNGs from the reading-queue API with a ``worker``-role token.

The API side (``api/worker_images.py``): only worker tokens, no patient identity,
each PNG audited under the worker's token name. The worker side
(``worker/inference/images.py``), in this process against the real ``preread api``:
verified PNGs under the worker's own data dir, gone after use; a refused token and
an unreachable API each say which setting to fix, and only the second is retried.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import create_engine, select, update

from preread.schemas.settings import Settings
from preread.schemas.tables import AuditEvent, Image, Study, StudyState, utcnow
from preread.worker.inference.images import (
    ImagesChanged,
    ImagesMissing,
    ImagesRefused,
    ImagesUnreachable,
    StoredImage,
    TokenRefused,
    fetch_study,
    images_problem,
    study_images,
)
from tests.api.conftest import PHI, Stack
from tests.support.procs import base_env, free_port, preread_argv


def _stored(stack: Stack, uid: str) -> list[StoredImage]:
    engine = create_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Image.id, Image.path).join(Study, Study.id == Image.study_id)
                .where(Study.study_instance_uid == uid).order_by(Image.ordinal, Image.id)
            ).all()
    finally:
        engine.dispose()
    return [StoredImage(i, Path(p)) for i, p in rows]


def _audit(stack: Stack, uid: str) -> list[tuple[str, str]]:
    engine = create_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(AuditEvent.token_name, AuditEvent.action).where(AuditEvent.study_instance_uid == uid)
            ).all()]
    finally:
        engine.dispose()


def _worker_settings(stack: Stack, tmp_path: Path, token: str, url: str | None = None) -> Settings:
    """A GPU host's settings: its own empty data dir, the database, the API's URL and a token."""
    return Settings(data_dir=tmp_path / "gpu-data", database_url=stack.db_url, images_url=url or stack.url,
                    worker_token=token)


def test_worker_routes_serve_verified_pngs_to_worker_tokens_only(stack: Stack) -> None:
    uid = stack.studies["routine"]
    with stack.client("worker") as worker:
        answer = worker.get(f"/api/v1/worker/studies/{uid}/manifest")
        assert answer.status_code == 200, answer.text
        for phi in PHI:
            assert phi not in answer.text, "the manifest names no patient"
        manifest = answer.json()
        assert manifest["study_instance_uid"] == uid and len(manifest["images"]) == 2
        assert [i["n"] for i in manifest["images"]] == [0, 1]
        for image in manifest["images"]:
            png = worker.get(f"/api/v1/worker/studies/{uid}/images/{image['n']}")
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert len(png.content) == image["size"]
            assert hashlib.sha256(png.content).hexdigest() == image["sha256"]
        assert worker.get(f"/api/v1/worker/studies/{uid}/images/2").status_code == 404
        assert worker.get("/api/v1/worker/whoami").json() == {"name": "worker-user", "role": "worker"}
        # least privilege: the worker token still sees no patient identity anywhere
        assert worker.get(f"/api/v1/studies/{uid}").status_code == 403
        assert worker.get(f"/api/v1/studies/{uid}/images/0").status_code == 403
        assert worker.post("/api/v1/search", json={"patient_id": PHI[3]}).status_code == 403
    for role in ("read", "write", "admin"):
        with stack.client(role) as other:
            refused = other.get(f"/api/v1/worker/studies/{uid}/manifest")
            assert refused.status_code == 403 and "needs worker" in refused.json()["detail"], role
    assert httpx.get(f"{stack.url}/api/v1/worker/studies/{uid}/images/0").status_code == 401
    audit = _audit(stack, uid)
    assert audit.count(("worker-user", "worker_fetch_image")) == 2, "each PNG a worker fetched is audited under its name"
    assert ("worker-user", "view_image") not in audit, "not as a radiologist's view"


def test_fetch_materialises_the_pngs_in_the_workers_own_data_dir(stack: Stack, tmp_path: Path) -> None:
    uid = stack.studies["stat"]
    stored = _stored(stack, uid)
    settings = _worker_settings(stack, tmp_path, stack.tokens["worker"])
    assert images_problem(settings) is None
    with study_images(settings, uid, stored) as paths:
        assert len(paths) == len(stored) == 2
        for path, original in zip(paths, stored):
            assert path.is_relative_to(settings.data_dir / "fetched"), path
            assert path.read_bytes() == original.path.read_bytes()
    assert not any(settings.data_dir.rglob("*.png")), "the fetched PNGs are removed once the step is done"
    with pytest.raises(ImagesChanged):  # the study was rendered again meanwhile: the newer task drafts it
        fetch_study(settings, uid, [s.image_id + 1000 for s in stored])
    assert not any(settings.data_dir.rglob("*.png"))


def test_a_refused_token_and_an_unreachable_api_name_the_setting(stack: Stack, tmp_path: Path) -> None:
    uid = stack.studies["stat"]
    ids = [s.image_id for s in _stored(stack, uid)]
    unknown = _worker_settings(stack, tmp_path, "prt_0123456789abcdef_" + "x" * 43)
    problem = images_problem(unknown)
    assert problem is not None
    for needle in (stack.url, "PREREAD_IMAGES_URL", "refused PREREAD_WORKER_TOKEN", "HTTP 401",
                   "preread token create NAME --role worker"):
        assert needle in problem, problem
    with pytest.raises(ImagesRefused) as refused:
        fetch_study(unknown, uid, ids)
    assert not isinstance(refused.value, ConnectionError), "a refused token is not retried"
    assert isinstance(refused.value, TokenRefused), "the worker's token, not the study: the worker pauses"
    assert "PREREAD_IMAGES_URL" in str(refused.value) and unknown.worker_token is not None
    assert unknown.worker_token.get_secret_value() not in str(refused.value)

    reader = _worker_settings(stack, tmp_path, stack.tokens["read"])
    problem = images_problem(reader)
    assert problem is not None and "HTTP 403" in problem and "the read role cannot do this" in problem, problem

    away = _worker_settings(stack, tmp_path, stack.tokens["worker"], url=f"http://127.0.0.1:{free_port()}")
    problem = images_problem(away)
    assert problem is not None and "cannot reach" in problem and "PREREAD_IMAGES_URL" in problem, problem
    with pytest.raises(ImagesUnreachable) as unreachable:
        fetch_study(away, uid, ids)
    assert isinstance(unreachable.value, ConnectionError), "the infer task's autoretry_for retries it"

    good = _worker_settings(stack, tmp_path, stack.tokens["worker"])
    with pytest.raises(ImagesMissing) as missing:
        fetch_study(good, "1.2.3.4.5.6.7", [])
    assert "no study" in str(missing.value) and not isinstance(missing.value, TokenRefused)


def test_a_study_cleaned_by_retention_says_so_to_the_remote_worker(stack: Stack, tmp_path: Path) -> None:
    uid = stack.studies["mr"]
    ids = [s.image_id for s in _stored(stack, uid)]
    engine = create_engine(stack.db_url)
    with engine.begin() as conn:  # received ten days ago
        conn.execute(update(Study).where(Study.study_instance_uid == uid)
                     .values(last_received_at=utcnow() - timedelta(days=10)))
    engine.dispose()
    cleaned = subprocess.run(preread_argv("cleanup"), env=base_env(**stack.settings, retention_days=5),
                             capture_output=True, text=True, timeout=300)
    assert cleaned.returncode == 0, cleaned.stderr
    with pytest.raises(ImagesMissing) as missing:
        fetch_study(_worker_settings(stack, tmp_path, stack.tokens["worker"]), uid, ids)
    message = str(missing.value)
    assert "PREREAD_IMAGES_URL" in message and "removed by retention cleanup" in message, message


def test_a_refused_token_leaves_the_study_waiting_and_images_gone_fail_it(stack: Stack, tmp_path: Path) -> None:
    """The infer task's step as a worker runs it: a refused token is the worker's fault, a missing PNG the study's.

    Both stop at the fetch, before the model: no engine is needed.
    """
    from preread.worker.pipeline.celery_app import app
    from preread.worker.pipeline.stages import INFERABLE, infer_step
    from preread.worker.pipeline.tasks import infer_study, run_step

    uid = stack.studies["ct"]
    engine = create_engine(stack.db_url)
    with engine.begin() as conn:  # waiting for infer, one earlier attempt counted
        conn.execute(update(Study).where(Study.study_instance_uid == uid)
                     .values(state=StudyState.RENDERED, attempts=1, error=None))
        study_id = conn.execute(select(Study.id).where(Study.study_instance_uid == uid)).scalar_one()

    def row() -> Any:
        with engine.connect() as conn:
            return conn.execute(select(Study.state, Study.attempts, Study.error).where(Study.id == study_id)).one()

    def infer(settings: Settings) -> str:
        app.conf.preread_settings = settings
        return run_step(infer_study, study_id, lambda: infer_step(settings, study_id, cast(Any, None)), INFERABLE)

    previous = app.conf.preread_settings
    try:
        refused = infer(_worker_settings(stack, tmp_path, "prt_0123456789abcdef_" + "x" * 43))
        waiting = row()
        png = Path(_stored(stack, uid)[0].path)
        png.rename(png.with_suffix(".moved"))  # the PNG gone from the API host
        try:
            failed_outcome = infer(_worker_settings(stack, tmp_path, stack.tokens["worker"]))
        finally:
            png.with_suffix(".moved").rename(png)
        failed = row()
    finally:
        app.conf.preread_settings = previous
        engine.dispose()
    assert refused == "not_ready"
    assert (waiting.state, waiting.attempts, waiting.error) == (StudyState.RENDERED, 1, None), "no attempt, no failure"
    assert failed_outcome == "failed" and failed.state == StudyState.FAILED, failed
    assert failed.attempts == 2 and "infer:" in failed.error and "missing on the API host" in failed.error, failed

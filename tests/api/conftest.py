"""A real reading-queue stack for the API tests: Postgres filled by ``preread draft`` (tiny model), a private
Redis as broker, tokens made with ``preread token create``, and ``preread api`` served by uvicorn."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import _create_pg_database, _drop_pg_database, testdata
from tests.support.procs import Proc, RedisServer, base_env, free_port, preread_argv, wait_until
from tests.support.synthetic import projection, save

#: Patient data the tests put in the files: it must never appear in a log.
PHI = ("Doe^Jane", "PID-STAT-7", "Roe^Richard", "PID-ROUTINE-8")


@dataclass
class Stack:
    """Everything a test needs to talk to the running API and check the database behind it."""

    url: str
    db_url: str
    settings: dict[str, object]
    tokens: dict[str, str]
    studies: dict[str, str]
    folders: dict[str, Path]
    redis: RedisServer
    api: Proc
    workdir: Path
    extra: list[Proc] = field(default_factory=list)

    def client(self, role: str | None = "write") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(preread_argv(*args), env=base_env(**self.settings), capture_output=True, text=True, timeout=900)

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(preread_argv(*args), base_env(**self.settings), self.workdir / f"{name}.log").start()
        self.extra.append(proc)
        return proc


def chest_study(folder: Path, *, name: str, patient_id: str, accession: str, priority: str | None) -> str:
    """A two-view chest radiograph study with identity and an order priority; returns its UID."""
    study_uid, series_uid = generate_uid(), generate_uid()
    for number, view in ((1, "PA"), (2, "LL")):
        ds = projection(study_uid=study_uid, series_uid=series_uid, series_number=1, instance_number=number, view=view)
        ds.PatientName = name
        ds.PatientID = patient_id
        ds.IssuerOfPatientID = "HOSP-A"
        ds.PatientBirthDate = "19610203"
        ds.AccessionNumber = accession
        ds.StudyDescription = "Chest two views"
        ds.BodyPartExamined = "CHEST"
        if priority:
            ds.RequestedProcedurePriority = priority
        save(ds, folder)
    return study_uid


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("api-stack")
    name = f"preread_api_{uuid.uuid4().hex[:10]}"
    db_url = _create_pg_database(name)
    redis = RedisServer(work / "redis").start()
    folders = {k: work / "in" / k for k in ("stat", "routine", "ct", "mr")}
    studies = {
        "stat": chest_study(folders["stat"], name=PHI[0], patient_id=PHI[1], accession="ACC-STAT", priority="STAT"),
        "routine": chest_study(folders["routine"], name=PHI[2], patient_id=PHI[3], accession="ACC-ROUT", priority=None),
    }
    folders["ct"].mkdir(parents=True)
    folders["mr"].mkdir(parents=True)
    shutil.copy(testdata("CT_small.dcm"), folders["ct"] / "ct.dcm")
    shutil.copy(testdata("MR_small.dcm"), folders["mr"] / "mr.dcm")
    for key, file in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm")):
        studies[key] = str(dcmread(testdata(file), stop_before_pixels=True).StudyInstanceUID)
    port = free_port()
    settings: dict[str, object] = dict(
        database_url=db_url, data_dir=work / "data", model=tiny_model_dir, max_images=2, broker_url=redis.url,
        api_port=port, reconcile_after=3600, stable_after=1, dispatch_interval=0.2,
    )
    api = Proc(preread_argv("api"), base_env(**settings), work / "api.log")
    s = Stack(f"http://127.0.0.1:{port}", db_url, settings, {}, studies, folders, redis, api, work)
    try:
        drafted = s.run("draft", str(work / "in"), "--json")
        assert drafted.returncode == 0, drafted.stderr
        for role in ("read", "write", "admin", "worker"):
            created = s.run("token", "create", f"{role}-user", "--role", role)
            assert created.returncode == 0, created.stderr
            s.tokens[role] = created.stdout.strip()
        api.start()
        wait_until(lambda: httpx.get(f"{s.url}/healthz", timeout=2).status_code == 200, 120, what="the API")
        yield s
    finally:
        for proc in reversed(s.extra):
            proc.kill()
        api.kill()
        log = api.output()
        redis.kill()
        from preread.schemas.database import engine_for

        engine_for.cache_clear()
        _drop_pg_database(name)
        for phi in PHI:
            assert phi not in log, "the API's log must never contain patient names or IDs"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the test item, so fixtures can see a failure (the browser's screenshot)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)

"""Sweeps against a real Orthanc on loopback, with the listener in this process and real Postgres.

These drive one :class:`SweepRunner` step by step (no model, no workers): they
check what reaches our storage and index, what the sweep records, and that a
study is held from the stability monitor until the sweep releases it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from preread.ingest.assembly.stability import mark_stable
from preread.ingest.listener.ae import Listener
from preread.ingest.sweep import ledger
from preread.ingest.sweep.query import RemoteStudy
from preread.ingest.sweep.retrieve import Retrieved
from preread.ingest.sweep.runner import SweepRunner
from preread.ingest.sweep.sources import parse_sources
from preread.ingest.sweep.window import parse_window
from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Instance, Outbox, Study, StudyState, Sweep, SweepState, SweepStudy
from tests.support.orthanc import ORTHANC, Orthanc
from tests.support.procs import free_port
from tests.sweep.helpers import DAY1, DAY2, DAY3, make_study, three_dates

pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed")

OUR_AE = "PREREAD"


@pytest.fixture
def settings(tmp_path: Path, pg_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=pg_url, ae_title=OUR_AE, host="127.0.0.1",
                    port=free_port(), min_free_bytes=0, stable_after=0.5)


@pytest.fixture
def listener(settings: Settings) -> Iterator[Listener]:
    server = Listener(settings, monitor=False)
    server.start()
    yield server
    server.stop()


def start_orthanc(tmp_path: Path, settings: Settings, **kwargs: object) -> Orthanc:
    return Orthanc(tmp_path, peers={OUR_AE: ("127.0.0.1", settings.port)}, **kwargs).start()  # type: ignore[arg-type]


def source_for(kind: str, orthanc: Orthanc | None, folder: Path | None = None, **extra: object):  # type: ignore[no-untyped-def]
    raw: dict[str, object] = {"name": "pacs", "kind": kind, **extra}
    if kind == "dicom":
        assert orthanc is not None
        raw.update(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    elif kind == "dicomweb":
        assert orthanc is not None
        raw.update(url=orthanc.dicomweb_url)
    else:
        raw.update(path=str(folder))
    return parse_sources([raw])[0]


def new_sweep(url: str, start: date, end: date, **kwargs: object) -> int:
    with session_scope(url) as session:
        sweep_id = ledger.create_sweep(session, "pacs", start, end, **kwargs)  # type: ignore[arg-type]
        assert sweep_id is not None
        ledger.claim(session, "test-owner", 600)
    return sweep_id


def drive(runner: SweepRunner, steps: int = 200) -> None:
    """Step the runner until it ends (the workers' part is played by marking released studies DRAFTED)."""
    for _ in range(steps):
        if not runner.step():
            return
        with session_scope(runner.url) as session:  # stand-in for the pipeline: released studies are drafted
            session.execute(
                Study.__table__.update().where(Study.state == StudyState.STABLE).values(state=str(StudyState.DRAFTED))
            )
    raise AssertionError("sweep did not end")


def rows(url: str, sweep_id: int) -> dict[str, SweepStudy]:
    with session_scope(url) as session:
        return {r.study_instance_uid: r for r in session.scalars(select(SweepStudy).where(SweepStudy.sweep_id == sweep_id))}


def stored(url: str) -> dict[str, int]:
    """Instances stored here per Study Instance UID."""
    engine = create_engine(url)
    with engine.connect() as conn:
        from preread.schemas.tables import Series

        result = dict(conn.execute(
            select(Study.study_instance_uid, func.count(Instance.id))
            .join(Series, Series.study_id == Study.id).join(Instance, Instance.series_id == Series.id)
            .group_by(Study.study_instance_uid)
        ).all())
    engine.dispose()
    return result


@pytest.mark.parametrize("kind,retrieve", [("dicom", "c-move"), ("dicom", "c-get"), ("dicomweb", None), ("folder", None)])
def test_sweep_over_two_dates_retrieves_and_releases_exactly_those(
    tmp_path: Path, settings: Settings, listener: Listener, kind: str, retrieve: str | None
) -> None:
    studies = three_dates(tmp_path / "in", per_day=2, instances=2)
    orthanc = None if kind == "folder" else start_orthanc(tmp_path, settings, dicomweb=kind == "dicomweb")
    try:
        if orthanc is not None:
            orthanc.upload([f for day in studies.values() for _, files in day for f in files])
        extra = {"retrieve": retrieve} if retrieve else {}
        source = source_for(kind, orthanc, tmp_path / "in", **extra)
        url = settings.effective_database_url
        sweep_id = new_sweep(url, DAY1, DAY2)
        runner = SweepRunner(sweep_id, settings, source, None, owner="test-owner")
        drive(runner)
    finally:
        if orthanc is not None:
            orthanc.stop()
    wanted = {uid for day in (DAY1, DAY2) for uid, _ in studies[day]}
    found = rows(url, sweep_id)
    assert set(found) == wanted, "the sweep found the studies of the two dates, not the third"
    assert all(r.state == "released" and r.expected == 2 and r.received == 2 for r in found.values())
    assert stored(url) == {uid: 2 for uid in wanted}, "every instance of those studies, and nothing else, is here"
    with session_scope(url) as session:
        sweep = session.get(Sweep, sweep_id)
        assert sweep is not None and sweep.state == SweepState.DONE
        outbox = session.execute(select(Outbox.study_id, Outbox.priority)).all()
    assert len(outbox) == 4 and {p for _, p in outbox} == {ledger.SWEEP_PRIORITY}, "one lowest-priority hand-off each"


def without_study_counts(runner: SweepRunner) -> None:
    """Make the runner's source look like a PACS that returns no Number of Study Related Instances."""
    find = runner.query.find_studies

    def find_without(day: date, modalities: list[str]) -> list[RemoteStudy]:
        return [replace(s, instances=None) for s in find(day, modalities)]

    runner.query.find_studies = find_without  # type: ignore[method-assign]


@pytest.mark.parametrize("count_level", ["study", "image"])
def test_an_instance_deleted_between_count_and_retrieve_makes_the_study_incomplete(
    tmp_path: Path, settings: Settings, listener: Listener, count_level: str
) -> None:
    uid, files = make_study(tmp_path / "in", DAY1, instances=3)
    other, other_files = make_study(tmp_path / "in", DAY1, instances=2, hour=14)
    orthanc = start_orthanc(tmp_path, settings)
    try:
        orthanc.upload(files + other_files)
        url = settings.effective_database_url
        sweep_id = new_sweep(url, DAY1, DAY1)
        runner = SweepRunner(sweep_id, settings, source_for("dicom", orthanc), None, owner="test-owner")
        if count_level == "image":
            without_study_counts(runner)
        count, retrieve = runner.query.count_instances, runner.retriever.retrieve
        doomed = __import__("pydicom").dcmread(files[1], stop_before_pixels=True).SOPInstanceUID
        image_counts: list[str] = []
        deleted: list[str] = []

        def count_images(study_uid: str, assoc: object = None) -> list[str]:
            image_counts.append(study_uid)
            return count(study_uid, assoc)

        def delete_then_retrieve(study_uids: list[str], assoc: object = None) -> Retrieved:
            if uid in study_uids and not deleted:  # after the count, before the first retrieve
                orthanc.delete_instance(doomed)
                deleted.append(doomed)
            return retrieve(study_uids, assoc)

        runner.query.count_instances = count_images  # type: ignore[method-assign]
        runner.retriever.retrieve = delete_then_retrieve  # type: ignore[method-assign]
        drive(runner)
    finally:
        orthanc.stop()
    if count_level == "study":
        assert image_counts == [], "the PACS gave each study's count with the day's query: no query per study"
    else:
        assert sorted(image_counts) == sorted([uid, other]), "no count from the PACS: each study counted at IMAGE level"
    found = rows(url, sweep_id)
    short = found[uid]
    assert (short.state, short.expected, short.received) == ("incomplete", 3, 2)
    assert short.attempts == 3, "a short count is retried before giving up"
    assert short.error is not None and "2 of 3" in short.error
    assert (found[other].state, found[other].expected, found[other].received) == ("released", 2, 2)
    with session_scope(url) as session:
        states = dict(session.execute(select(Study.study_instance_uid, Study.state)).all())
    assert states[uid] == StudyState.DRAFTED, "the incomplete study is still drafted with what arrived"


def test_a_study_count_below_what_the_pacs_sends_is_raised_to_what_it_sent(
    tmp_path: Path, settings: Settings, listener: Listener
) -> None:
    uid, files = make_study(tmp_path / "in", DAY1, instances=3)
    orthanc = start_orthanc(tmp_path, settings)
    try:
        orthanc.upload(files)
        url = settings.effective_database_url
        sweep_id = new_sweep(url, DAY1, DAY1)
        runner = SweepRunner(sweep_id, settings, source_for("dicom", orthanc), None, owner="test-owner")
        find = runner.query.find_studies
        runner.query.find_studies = lambda day, mods: [replace(s, instances=1) for s in find(day, mods)]  # type: ignore[method-assign]
        drive(runner)
    finally:
        orthanc.stop()
    row = rows(url, sweep_id)[uid]
    assert (row.state, row.expected, row.received, row.attempts) == ("released", 3, 3, 1), \
        "the count is what the PACS said it moved, when that is more than the study query said"


def test_a_held_study_waits_for_its_release(tmp_path: Path, settings: Settings, listener: Listener) -> None:
    uid, files = make_study(tmp_path / "in", DAY2, instances=2)
    orthanc = start_orthanc(tmp_path, settings)
    try:
        orthanc.upload(files)
        url = settings.effective_database_url
        sweep_id = new_sweep(url, DAY2, DAY2)
        runner = SweepRunner(sweep_id, settings, source_for("dicom", orthanc), None, owner="test-owner")
        runner.step()  # the day's query: the study's row now holds it
        row = rows(url, sweep_id)[uid]
        runner.retriever.retrieve([uid])  # instances arrive, but the sweep has not checked them yet
        later = datetime.now().astimezone() + timedelta(hours=1)
        with session_scope(url) as session:
            assert mark_stable(session, settings.stable_after, now=later) == [], "no stability flip while held"
        runner._some([(row.id, uid, None, 0)])  # count, see both instances here, release
    finally:
        orthanc.stop()
    with session_scope(url) as session:
        state = session.scalar(select(Study.state).where(Study.study_instance_uid == uid))
        hand_offs = session.scalar(select(func.count()).select_from(Outbox))
    assert state == StudyState.STABLE and hand_offs == 1
    assert rows(url, sweep_id)[uid].state == "released"


def test_outside_the_window_nothing_is_retrieved_inside_it_the_sweep_goes_on(
    tmp_path: Path, settings: Settings, listener: Listener
) -> None:
    uid, files = make_study(tmp_path / "in", DAY1, instances=1)
    orthanc = start_orthanc(tmp_path, settings)
    try:
        orthanc.upload(files)
        url = settings.effective_database_url
        sweep_id = new_sweep(url, DAY1, DAY1)
        now = datetime.now()
        closed = parse_window(f"{(now + timedelta(hours=2)):%H}:00-{(now + timedelta(hours=3)):%H}:00")
        runner = SweepRunner(sweep_id, settings, source_for("dicom", orthanc), closed, owner="test-owner")
        runner.stop_event.wait = lambda *_: False  # type: ignore[method-assign]  # no idle sleeps in the test
        for _ in range(3):
            assert runner.step()
        assert stored(url) == {} and rows(url, sweep_id) == {}, "outside the window: no query, no retrieve"
        with session_scope(url) as session:
            sweep = session.get(Sweep, sweep_id)
            assert sweep is not None and sweep.note is not None and "window" in sweep.note
        runner.window = parse_window(f"{(now - timedelta(hours=1)):%H}:00-{(now + timedelta(hours=2)):%H}:00")
        drive(runner)
    finally:
        orthanc.stop()
    assert stored(url) == {uid: 1}


def test_a_pacs_that_does_not_know_our_ae_fails_the_sweep_naming_what_to_configure(
    tmp_path: Path, settings: Settings, listener: Listener
) -> None:
    uid, files = make_study(tmp_path / "in", DAY1)
    orthanc = Orthanc(tmp_path).start()  # no DicomModalities: our AE title is unknown to it
    try:
        orthanc.upload(files)
        url = settings.effective_database_url
        sweep_id = new_sweep(url, DAY1, DAY1)
        runner = SweepRunner(sweep_id, settings, source_for("dicom", orthanc), None, owner="test-owner")
        runner.run()
    finally:
        orthanc.stop()
    with session_scope(url) as session:
        sweep = session.get(Sweep, sweep_id)
        assert sweep is not None
        assert sweep.state == SweepState.FAILED
        assert sweep.error is not None and "PREREAD" in sweep.error and "c-get" in sweep.error
    assert rows(url, sweep_id)[uid].state in ("counted", "retrieving"), "the study stays held for a resume"


@pytest.mark.parametrize("associations", [1, 2])
def test_retrieves_overlap_up_to_the_association_cap_and_no_further(
    tmp_path: Path, settings: Settings, listener: Listener, associations: int
) -> None:
    studies = [make_study(tmp_path / "in", DAY1, hour=8 + k) for k in range(4)]
    orthanc = start_orthanc(tmp_path, settings)
    record = listener.ctx.index.record
    lock = threading.Lock()
    storing: set[str] = set()
    together: list[int] = []

    def slow_record(ds: Any, ident: Any, *args: Any, **kwargs: Any) -> bool:
        """The listener indexing an instance, held long enough for a concurrent move to show."""
        with lock:
            storing.add(ident.study_uid)
            together.append(len(storing))
        time.sleep(0.4)
        try:
            return record(ds, ident, *args, **kwargs)
        finally:
            with lock:
                storing.discard(ident.study_uid)

    try:
        orthanc.upload([f for _, files in studies for f in files])
        listener.ctx.index.record = slow_record  # type: ignore[method-assign]
        url = settings.effective_database_url
        sweep_id = new_sweep(url, DAY1, DAY1)
        runner = SweepRunner(sweep_id, settings, source_for("dicom", orthanc, max_associations=associations), None,
                             owner="test-owner")
        drive(runner)
    finally:
        listener.ctx.index.record = record  # type: ignore[method-assign]
        orthanc.stop()
    assert all(r.state == "released" for r in rows(url, sweep_id).values()) and len(together) == 4
    assert max(together) == associations, (
        f"with max_associations = {associations}, the listener received {max(together)} studies at once")


def accepted_associations(listener: Listener) -> list[str]:
    """The calling AE title of every association the listener accepts from now on (pynetdicom's server hook)."""
    from pynetdicom import evt

    callers: list[str] = []
    assert listener.server is not None
    listener.server.bind(evt.EVT_ACCEPTED, lambda event: callers.append(event.assoc.requestor.ae_title))
    return callers


def sweep_one_day(tmp_path: Path, settings: Settings, listener: Listener, studies: int,
                  prepare: Any = None, **source: object) -> tuple[str, int, SweepRunner, dict[str, int], list[str], str]:
    """``studies`` one-image studies of DAY1 in Orthanc, swept to the end by one runner (``prepare(runner)`` first):
    (database URL, sweep id, runner, instances per study, calling AE of each association the listener accepted,
    Orthanc's AE title)."""
    made = [make_study(tmp_path / "in", DAY1, hour=6 + k) for k in range(studies)]
    orthanc = start_orthanc(tmp_path, settings)
    try:
        orthanc.upload([f for _, files in made for f in files])
        url = settings.effective_database_url
        sweep_id = new_sweep(url, DAY1, DAY1)
        runner = SweepRunner(sweep_id, settings, source_for("dicom", orthanc, **source), None, owner="test-owner")
        if prepare is not None:
            prepare(runner)
        callers = accepted_associations(listener)
        drive(runner)
    finally:
        orthanc.stop()
    return url, sweep_id, runner, {uid: len(files) for uid, files in made}, callers, orthanc.aet


def test_the_pacs_moves_several_studies_per_association_and_each_is_checked_on_its_own(
    tmp_path: Path, settings: Settings, listener: Listener
) -> None:
    url, sweep_id, _, sizes, callers, pacs = sweep_one_day(
        tmp_path, settings, listener, 6, max_associations=1, move_batch=3, max_in_flight=10)
    found = rows(url, sweep_id)
    assert {uid: (r.state, r.expected, r.received, r.attempts) for uid, r in found.items()} == {
        uid: ("released", n, n, 1) for uid, n in sizes.items()}
    assert callers == [pacs, pacs], "six studies, three a C-MOVE: the PACS associated twice, not six times"
    assert stored(url) == sizes


def test_a_pacs_that_refuses_a_list_of_studies_is_asked_one_study_per_request(
    tmp_path: Path, settings: Settings, listener: Listener
) -> None:
    from pydicom.dataset import Dataset

    from preread.ingest.sweep.dimse import QRStatus

    lists: list[int] = []

    def refuse_lists(runner: SweepRunner) -> None:
        """The PACS answers a list of Study Instance UIDs with Unable to Process and moves nothing."""
        send = runner.retriever._send  # type: ignore[attr-defined]

        def no_lists(uids: list[str], assoc: Any) -> Any:
            if len(uids) > 1:
                lists.append(len(uids))
                refused = Dataset()
                refused.Status = QRStatus.UNABLE_TO_PROCESS
                refused.NumberOfCompletedSuboperations = 0
                return iter([(refused, None)])
            return send(uids, assoc)

        runner.retriever._send = no_lists  # type: ignore[attr-defined]

    url, sweep_id, runner, sizes, callers, _ = sweep_one_day(
        tmp_path, settings, listener, 4, prepare=refuse_lists, max_associations=1, move_batch=2, max_in_flight=10)
    assert lists == [2], "after one refused list, each study is asked for alone"
    assert runner.retriever.batch == 1
    assert {r.state for r in rows(url, sweep_id).values()} == {"released"}
    assert {r.attempts for r in rows(url, sweep_id).values()} == {1}, "no study lost an attempt to the refused list"
    assert len(callers) == 4 and stored(url) == sizes

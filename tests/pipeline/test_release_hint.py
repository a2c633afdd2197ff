"""The end of an association as a completion hint, end to end: storescu, listener, coordinator, workers.

``PREREAD_STABLE_AFTER`` is 600 s here, longer than any wait: a study drafted in these
tests was made STABLE by its released association, not by the idle timer.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from preread.schemas.tables import StudyState
from tests.pipeline.test_queue import Pipeline, redis_server  # noqa: F401  (the fixture)
from tests.support.procs import RedisServer, processes, storescu, wait_until
from tests.support.studies import all_in, states
from tests.support.synthetic import ct_series, projection, save

pytestmark = pytest.mark.slow

#: Longest wait for a draft: well under PREREAD_STABLE_AFTER, so the idle timer cannot be what made it.
WAIT = 300


def _rows(url: str, sql: str, **params: object) -> list:  # type: ignore[type-arg]
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def _pipeline(tmp_path: Path, pg_url: str, redis: RedisServer, model: Path, started: list) -> Pipeline:  # type: ignore[type-arg]
    pipe = Pipeline(tmp_path, pg_url, redis.url, model, started)
    pipe.env["PREREAD_STABLE_AFTER"] = "600"
    pipe.full()
    return pipe


def test_cr_from_one_association_is_drafted_without_the_idle_timer(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path  # noqa: F811
) -> None:
    study_uid = generate_uid()
    cr = save(projection(study_uid=study_uid, series_uid=generate_uid(), series_number=1, instance_number=1, view="PA"),
              tmp_path / "in")
    with processes() as started:
        pipe = _pipeline(tmp_path, pg_url, redis_server, tiny_model_dir, started)
        assert storescu(pipe.port, [cr]).returncode == 0
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 1), WAIT, what="the CR DRAFTED")
        except AssertionError:
            raise AssertionError(f"{states(pg_url)}\n{pipe.logs()}") from None
    hint = _rows(pg_url, "select released_at, release_hint_at, last_received_at from studies")[0]
    assert hint.released_at >= hint.last_received_at
    assert 0.9 <= (hint.release_hint_at - hint.released_at).total_seconds() <= 1.1  # CR's grace: 1 s
    assert _rows(pg_url, "select count(*) from reports where current")[0][0] == 1


def test_ct_over_two_associations_is_one_study_with_one_draft_then_redrafted_after_a_late_instance(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, tiny_model_dir: Path  # noqa: F811
) -> None:
    study_uid = generate_uid()
    first = ct_series(tmp_path / "s1", study_uid=study_uid, n=4, series_number=1)
    second = ct_series(tmp_path / "s2", study_uid=study_uid, n=4, series_number=2)
    late = ct_series(tmp_path / "s3", study_uid=study_uid, n=1, series_number=3)
    with processes() as started:
        pipe = _pipeline(tmp_path, pg_url, redis_server, tiny_model_dir, started)
        assert storescu(pipe.port, first).returncode == 0
        time.sleep(3)  # within CT's 10 s grace: the first release must not make the study STABLE
        assert _rows(pg_url, "select state from studies")[0][0] == StudyState.RECEIVING
        assert storescu(pipe.port, second).returncode == 0
        try:
            wait_until(lambda: all_in(pg_url, StudyState.DRAFTED, 1), WAIT, what="the CT study DRAFTED")
        except AssertionError:
            raise AssertionError(f"{states(pg_url)}\n{pipe.logs()}") from None
        assert _rows(pg_url, "select count(*) from instances")[0][0] == 8
        assert _rows(pg_url, "select count(*) from reports")[0][0] == 1
        assert _rows(pg_url, "select count(*) from outbox where topic = 'render'")[0][0] == 1  # STABLE once

        # a late instance re-opens the study; its association's release makes it drafted again
        assert storescu(pipe.port, late).returncode == 0
        try:
            wait_until(lambda: _rows(pg_url, "select count(*) from reports")[0][0] == 2
                       and all_in(pg_url, StudyState.DRAFTED, 1), WAIT, what="the re-opened study drafted again")
        except AssertionError:
            raise AssertionError(f"{states(pg_url)}\n{pipe.logs()}") from None
    assert _rows(pg_url, "select count(*) from reports where current")[0][0] == 1
    assert _rows(pg_url, "select count(*) from instances")[0][0] == 9

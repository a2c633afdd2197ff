"""The worklist query on its own: order, keyset pages and the probe filter's two strategies agree, on both databases."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

import preread.api.worklist as worklist
from preread.schemas.database import session_scope
from preread.schemas.tables import ProbeScore, Study

PROBES = ("pneumothorax", "fracture", "cardiomegaly")


def _fill(url: str, n: int = 60) -> dict[int, tuple[int, float, datetime, dict[str, float]]]:
    rng = random.Random(5)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    truth = {}
    with session_scope(url) as session:
        for i in range(n):
            scores = {p: round(rng.random(), 2) for p in PROBES}  # rounded: ties in the top score happen
            arrival = start + timedelta(minutes=rng.randrange(0, 30))  # ties in arrival happen too
            study = Study(study_instance_uid=f"1.2.3.{i + 1}", priority=rng.choice((0, 0, 1, 2)),
                          top_probe_score=max(scores.values()), first_received_at=arrival, state="DRAFTED",
                          modalities="CR")
            session.add(study)
            session.flush()
            for p, score in scores.items():
                session.add(ProbeScore(study_id=study.id, condition=p, question="?", score=score, current=True,
                                       model_id="m", prompt_version="v"))
                session.add(ProbeScore(study_id=study.id, condition=p, question="?", score=1.0 - score, current=False,
                                       model_id="m", prompt_version="old"))
            truth[study.id] = (study.priority, study.top_probe_score, arrival, scores)
    return truth


def _all_pages(url: str, filters: worklist.Filters, limit: int) -> list[int]:
    ids, cursor = [], None
    for _ in range(200):
        with session_scope(url) as session:
            rows, cursor = worklist.page(session, filters, limit, cursor)
        ids += [r.study.id for r in rows]
        if cursor is None:
            return ids
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize("selective_limit", [3000, -1], ids=["matches-first", "walk-the-order"])
def test_order_pages_and_probe_filter(db_url: str, selective_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worklist, "selective_limit", lambda page_rows, studies: selective_limit)
    truth = _fill(db_url)
    expected = sorted(truth, key=lambda i: (-truth[i][0], -truth[i][1], truth[i][2], i))
    assert _all_pages(db_url, worklist.Filters(), 50) == expected
    assert _all_pages(db_url, worklist.Filters(), 7) == expected, "pages of 7 follow the same order, none twice"
    filters = worklist.Filters(probe="pneumothorax", min_score=0.6)
    matching = [i for i in expected if truth[i][3]["pneumothorax"] >= 0.6]
    assert 0 < len(matching) < len(expected), "the current scores decide, not the older ones"
    assert _all_pages(db_url, filters, 5) == matching
    assert _all_pages(db_url, worklist.Filters(urgency=worklist.Urgency.STAT), 50) == [i for i in expected if truth[i][0] == 2]

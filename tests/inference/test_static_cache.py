"""Drafts decoded into a static key/value cache give the eager path's greedy tokens.

On CUDA the engine decodes drafts into a static cache and lets transformers
compile the decode step; here the same path runs on CPU with the tiny model,
without ``torch.compile`` (the compiled variant is the ``slow`` test: inductor
needs minutes on a shared CPU). Constrained (JSON schema) and free drafts,
batched with left padding and through the batcher's threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from preread.schemas.findings import DraftReport
from preread.schemas.tables import ParseStatus
from preread.worker.inference.engine import CACHE_LENGTH_STEP, Engine, GenerationOptions, StudyContext, bucket_rows
from preread.worker.inference.model import LoadedModel, get_model
from tests.inference.test_engine import in_threads
from tests.support.tiny_model import write_test_pngs

PIXELS = {"min_pixels": 56 * 56, "max_pixels": 96 * 28 * 28}
CHEST = StudyContext("CR", "CHEST", "CHEST PA AND LATERAL", "064Y", "F")
HEAD = StudyContext("CT", "HEAD", "CT HEAD WITHOUT CONTRAST", "081Y", "M")
FREE = GenerationOptions(constrained=False, max_new_tokens=40)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    torch.set_num_threads(1)
    return get_model(str(tiny_model_dir), device="cpu", **PIXELS)


@pytest.fixture(scope="module")
def eager(loaded: LoadedModel) -> Iterator[Engine]:
    eng = Engine(loaded, static_cache=False, batch_wait_ms=1.0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def static(loaded: LoadedModel) -> Iterator[Engine]:
    eng = Engine(loaded, static_cache=True, compile_decode=False, batch_size=4, batch_wait_ms=300.0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[list[Path], StudyContext]]:
    """Three studies of different prompt lengths, so batched rows are left padded."""
    root = tmp_path_factory.mktemp("static")
    return [
        (write_test_pngs(root / "a", [(320, 288), (256, 352)], seed=1), CHEST),
        (write_test_pngs(root / "b", [(512, 400)], seed=2), HEAD),
        (write_test_pngs(root / "c", [(180, 420)], seed=4), CHEST),
    ]


@pytest.fixture
def static_caches(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every StaticCache created during the test (by the engine or by generate)."""
    import transformers.cache_utils as cache_utils
    import transformers.generation.utils as generation

    made: list[Any] = []

    class Recording(cache_utils.StaticCache):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cache_utils, "StaticCache", Recording)
    monkeypatch.setattr(generation, "StaticCache", Recording)
    return made


def test_engine_defaults_follow_the_device(loaded: LoadedModel) -> None:
    eng = Engine(loaded)
    try:
        assert loaded.device.type == "cpu" and not eng.static_cache and not eng.compile_decode
    finally:
        eng.close()


def test_constrained_drafts_with_a_static_cache_equal_eager(
    eager: Engine, static: Engine, studies: list, static_caches: list
) -> None:
    want = eager.draft_many(studies)
    got = static.draft_many(studies)
    assert len(static_caches) <= 1  # at most one new cache for the batch (none if kept from an earlier test)
    assert static._static_caches[len(studies)].layers[0].max_cache_len % CACHE_LENGTH_STEP == 0
    for a, b in zip(want, got, strict=True):
        assert b.raw_output == a.raw_output and b.completion_tokens == a.completion_tokens
        assert b.parse_status == ParseStatus.OK, b.parse_error
        assert b.report == DraftReport.model_validate_json(b.raw_output)


def test_free_drafts_with_a_static_cache_equal_eager(eager: Engine, static: Engine, studies: list) -> None:
    want = eager.draft_many(studies, FREE)
    got = static.draft_many(studies, FREE)
    assert [r.raw_output for r in got] == [r.raw_output for r in want]
    assert {r.completion_tokens for r in got} <= set(range(1, 41))


def test_batcher_path_uses_the_static_cache(
    eager: Engine, static: Engine, studies: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[Any] = []
    pick = static._static_cache

    def spy(*args: Any) -> Any:
        used.append(pick(*args))
        return used[-1]

    monkeypatch.setattr(static, "_static_cache", spy)
    want = [eager.draft_many([s])[0] for s in studies]
    got = in_threads([lambda s=s: static.draft(*s) for s in studies])
    assert used and all(int(c.get_seq_length()) > 0 for c in used)  # generate decoded into them
    assert max(r.timings["batch_size"] for r in got) > 1, "the batcher did not batch"
    assert [r.raw_output for r in got] == [r.raw_output for r in want]


def test_a_kept_cache_serves_the_next_batch_of_its_size(
    eager: Engine, static: Engine, studies: list, static_caches: list
) -> None:
    """Batches of one size decode into the same cache tensors (what compiled CUDA graphs replay on)."""
    first = static.draft_many(studies[:2], FREE)
    again = static.draft_many(studies[1:], FREE)
    kept = static._static_caches[2]
    assert len(static_caches) <= 1 and all(c is kept for c in static_caches)
    assert [r.raw_output for r in first + again] == [r.raw_output for r in eager.draft_many(studies[:2] + studies[1:], FREE)]


def test_bucket_rows_rounds_up_to_powers_of_two_within_the_batch_size() -> None:
    assert [bucket_rows(n, 50) for n in (1, 2, 3, 5, 9, 17, 33, 50)] == [1, 2, 4, 8, 16, 32, 50, 50]
    assert bucket_rows(3, 3) == 3 and bucket_rows(7, 4) == 7


@pytest.mark.slow
def test_compiled_decode_on_cpu_equals_eager(loaded: LoadedModel, eager: Engine, studies: list) -> None:
    """The CUDA configuration (static cache, compiled decode, rows filled to a power of two) on CPU."""
    compiled = Engine(loaded, static_cache=True, compile_decode=True, batch_size=4, batch_wait_ms=1.0)
    try:
        got = compiled.draft_many(studies)
    finally:
        compiled.close()
    want = eager.draft_many(studies)
    assert {r.timings["batch_rows"] for r in got} == {4.0}
    for a, b in zip(want, got, strict=True):
        assert b.raw_output == a.raw_output and b.parse_status == ParseStatus.OK


def test_a_failing_static_path_falls_back_to_the_dynamic_cache_once(
    loaded: LoadedModel, eager: Engine, studies: list, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A compile error on some card must not stop drafting: one warning, then the eager path for good."""
    eng = Engine(loaded, static_cache=True, compile_decode=False, batch_wait_ms=1.0)
    calls: list[int] = []

    def broken(*args: Any) -> Any:
        calls.append(1)
        raise RuntimeError("inductor: compilation failed")

    monkeypatch.setattr(eng, "_static_cache", broken)
    try:
        with caplog.at_level("WARNING", logger="preread.worker.inference.engine"):
            first = eng.draft_many(studies[:2], FREE)
            second = eng.draft(*studies[2], FREE)
    finally:
        eng.close()
    assert [r.raw_output for r in [*first, second]] == [r.raw_output for r in eager.draft_many(studies, FREE)]
    assert calls == [1] and not eng.static_cache
    warnings = [r for r in caplog.records if "static-cache decoding failed" in r.getMessage()]
    assert len(warnings) == 1 and "compilation failed" in warnings[0].getMessage()

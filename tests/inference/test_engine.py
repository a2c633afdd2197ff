"""The inference engine on the tiny model (CPU, float32, one thread).

Constrained drafts validate for random weights over many seeds, solo and
batched; batched and solo results are equal; probe scores are probabilities
that do not depend on batching; think blocks are kept apart; the prompt
version follows the prompt file.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from preread.schemas.findings import DraftReport, Urgency
from preread.schemas.tables import ParseStatus
from tests.support.tiny_model import write_test_pngs
from preread.worker.inference.engine import DraftResult, Engine, GenerationOptions, ProbeResult, StudyContext, urgency_from_probes
from preread.worker.inference.model import LoadedModel, get_model
from preread.worker.inference.parsing import split_thinking
from preread.worker.inference.prompting import DEFAULT_PROMPTS, load_prompts

PIXELS = {"min_pixels": 56 * 56, "max_pixels": 96 * 28 * 28}
T = TypeVar("T")

CHEST = StudyContext("CR", "CHEST", "CHEST PA AND LATERAL", "064Y", "F")
HEAD = StudyContext("CT", "HEAD", "CT HEAD WITHOUT CONTRAST", "081Y", "M")
KNEE = StudyContext("MR", "KNEE", None, None, None)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    torch.set_num_threads(1)
    return get_model(str(tiny_model_dir), device="cpu", **PIXELS)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    eng = Engine(loaded, batch_size=4, probe_batch_rows=32, batch_wait_ms=300.0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[list[Path], StudyContext]]:
    """Four studies with different image counts and sizes (so prompt lengths differ and rows are padded)."""
    root = tmp_path_factory.mktemp("studies")
    return [
        (write_test_pngs(root / "a", [(320, 288), (256, 352)], seed=1), CHEST),
        (write_test_pngs(root / "b", [(512, 400)], seed=2), HEAD),
        (write_test_pngs(root / "c", [(200, 200), (300, 180)], seed=3), KNEE),
        (write_test_pngs(root / "d", [(180, 420)], seed=4), CHEST),
    ]


def in_threads(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run the calls at once from separate threads (as Celery threads would) and return their results."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def assert_valid(result: DraftResult, engine: Engine) -> None:
    """The raw output is one schema-valid compact JSON document, ended by a stop token, not by the bound."""
    assert result.parse_status == ParseStatus.OK, (result.parse_error, result.raw_output[:300])
    report = DraftReport.model_validate_json(result.raw_output)
    assert result.report == report
    assert json.dumps(report.model_dump(mode="json"), separators=(",", ":")) == result.raw_output
    assert result.completion_tokens < engine.grammar.max_new_tokens


# --- constrained drafts ------------------------------------------------------------------------


def test_max_new_tokens_covers_the_longest_document(engine: Engine) -> None:
    from preread.worker.inference.grammar import longest_document_chars

    assert engine.grammar.max_new_tokens > longest_document_chars(think=False)
    assert engine.grammar.max_new_tokens >= engine.configured_max_new_tokens


@pytest.mark.parametrize("seed", range(20))
def test_constrained_draft_validates_solo(engine: Engine, studies: list, seed: int) -> None:
    images, ctx = studies[seed % len(studies)]
    options = GenerationOptions(do_sample=True, temperature=1.5, seed=seed)
    [result] = engine.draft_many([(images, ctx)], options)
    assert_valid(result, engine)


def test_constrained_drafts_validate_batched(engine: Engine, studies: list) -> None:
    """20 seeds, each a batch of the four studies (rows of different lengths, left padded)."""
    for seed in range(20):
        results = engine.draft_many(studies, GenerationOptions(do_sample=True, temperature=1.5, seed=100 + seed))
        for result in results:
            assert_valid(result, engine)


def test_solo_and_batched_drafts_are_equal(engine: Engine, studies: list) -> None:
    solo = [engine.draft_many([study])[0] for study in studies]
    batched = in_threads([lambda s=s: engine.draft(*s) for s in studies])
    assert max(r.timings["batch_size"] for r in batched) > 1, "the batcher did not batch"
    for one, many in zip(solo, batched, strict=True):
        assert_valid(one, engine)
        assert many.raw_output == one.raw_output
        assert many.prompt_tokens == one.prompt_tokens
        assert many.completion_tokens == one.completion_tokens


def test_draft_records_provenance(engine: Engine, studies: list) -> None:
    images, ctx = studies[0]
    result = engine.draft(images, ctx)
    assert result.model_id == engine.loaded.model_id and result.mode == "json"
    assert result.prompt_version == engine.prompts.version
    assert (result.min_pixels, result.max_pixels, result.n_images) == (PIXELS["min_pixels"], PIXELS["max_pixels"], 2)
    assert {"queue_s", "generate_s", "batch_size"} <= set(result.timings)


# --- probes ------------------------------------------------------------------------------------


def test_probe_questions_per_modality(engine: Engine, studies: list) -> None:
    chest = {p.condition for p in engine.probe(*studies[0])}
    head = {p.condition for p in engine.probe(*studies[1])}
    assert {
        "pneumothorax", "pleural_effusion", "consolidation", "cardiomegaly",
        "pulmonary_edema", "fracture", "free_air", "malpositioned_device",
    } <= chest  # fmt: skip
    assert {"haemorrhage", "mass_effect", "midline_shift", "fracture"} <= head


def test_probe_scores_are_probabilities_and_batch_independent(engine: Engine, studies: list) -> None:
    solo = [engine.probe_many([study])[0] for study in studies]
    together = engine.probe_many(studies)
    threaded = in_threads([lambda s=s: engine.probe(*s) for s in studies])
    for one, many, via_batcher in zip(solo, together, threaded, strict=True):
        assert [p.condition for p in one] == [p.condition for p in many] == [p.condition for p in via_batcher]
        for a, b, c in zip(one, many, via_batcher, strict=True):
            assert 0.0 <= a.score <= 1.0
            assert abs(a.score - b.score) <= 1e-5 and abs(a.score - c.score) <= 1e-5
            assert a.prompt_version == engine.prompts.version


def test_probe_score_is_yes_over_yes_plus_no(engine: Engine, studies: list) -> None:
    """The score equals P(yes)/(P(yes)+P(no)) from the full softmax of a plain model-card forward pass."""
    from qwen_vl_utils import process_vision_info

    images, ctx = studies[0]
    condition, question = engine.prompts.probe_questions(ctx)[2]
    messages = engine._messages(images, question)
    text = engine.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vision, _ = process_vision_info(messages)
    with torch.inference_mode():
        probs = engine.model(**engine._inputs([text], vision)).logits[0, -1].float().softmax(-1)
    yes, no = probs[engine.yes_ids].sum(), probs[engine.no_ids].sum()
    scores = {p.condition: p.score for p in engine.probe(images, ctx)}
    assert scores[condition] == pytest.approx(float(yes / (yes + no)), abs=1e-5)


def test_urgency_from_probe_thresholds() -> None:
    def probes(*scores: float) -> list[ProbeResult]:
        return [ProbeResult(f"c{i}", "q", s, "v") for i, s in enumerate(scores)]

    assert urgency_from_probes(probes(0.1, 0.2), 0.5, 0.85) == Urgency.ROUTINE
    assert urgency_from_probes(probes(0.1, 0.6), 0.5, 0.85) == Urgency.PRIORITY
    assert urgency_from_probes(probes(0.9, 0.6), 0.5, 0.85) == Urgency.STAT
    assert urgency_from_probes([], 0.5, 0.85) == Urgency.ROUTINE


# --- think blocks, free text, prompts ----------------------------------------------------------------


def test_think_block_is_kept_apart_from_the_answer(loaded: LoadedModel, studies: list) -> None:
    eng = Engine(loaded, think=True, batch_wait_ms=1.0)
    try:
        result = eng.draft_many([studies[0]])[0]
        probes = eng.probe(*studies[0])
    finally:
        eng.close()
    assert result.raw_output.startswith("<think>")
    assert result.thinking is not None and "</think>" not in result.thinking
    assert result.parse_status == ParseStatus.OK, result.parse_error
    answer = result.raw_output.split("</think>", 1)[1].strip()
    assert result.report == DraftReport.model_validate_json(answer)
    assert all(0.0 <= p.score <= 1.0 for p in probes)


def test_think_default_follows_the_model_id() -> None:
    from preread.worker.inference.engine import _think_default

    assert _think_default("InfiX-ai/InfiMed-RL-3B") and not _think_default("InfiX-ai/InfiMed-SFT-3B")


def test_free_text_mode_returns_raw_output(loaded: LoadedModel, studies: list) -> None:
    eng = Engine(loaded, mode="text", max_new_tokens=48, batch_wait_ms=1.0)
    try:
        result = eng.draft(*studies[0])
    finally:
        eng.close()
    assert result.mode == "text" and result.completion_tokens <= 48
    # unconstrained random weights write tokens, never the "Findings: ... Impression: ..." sections
    _, answer = split_thinking(result.raw_output)
    assert answer, "the raw output is kept"
    assert result.parse_status == ParseStatus.INVALID and result.report is None
    assert result.parse_error == "no 'Findings:' followed by 'Impression:' in the output"


def test_changed_prompt_file_changes_recorded_version(loaded: LoadedModel, studies: list, tmp_path: Path) -> None:
    copy = tmp_path / "preread.toml"
    shutil.copy(DEFAULT_PROMPTS, copy)
    before = load_prompts(copy).version
    assert before == load_prompts(DEFAULT_PROMPTS).version
    copy.write_text(copy.read_text().replace("Is there a pneumothorax?", "Is a pneumothorax present?", 1))
    after = load_prompts(copy)
    assert after.version != before
    eng = Engine(loaded, prompts=after, batch_wait_ms=1.0)
    try:
        assert eng.draft(*studies[0]).prompt_version == after.version
        assert {p.prompt_version for p in eng.probe(*studies[0])} == {after.version}
    finally:
        eng.close()


def test_drafts_and_probes_from_many_threads_share_one_model_thread(engine: Engine, studies: list) -> None:
    """Draft and probe requests of several studies at once: each gets its own kind of result."""
    calls: list[Callable[[], Any]] = []
    for study in studies[:3]:
        calls.append(lambda s=study: engine.draft(*s))
        calls.append(lambda s=study: engine.probe(*s))
    results = in_threads(calls)
    for i, result in enumerate(results):
        if i % 2 == 0:
            assert isinstance(result, DraftResult) and result.parse_status == ParseStatus.OK
        else:
            assert result and all(isinstance(p, ProbeResult) for p in result)
    assert engine._batcher._thread.is_alive()

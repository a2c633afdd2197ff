"""Probes that share the study's prefix score what separate forward passes score.

The engine encodes a study's images and the prompt its questions share once,
keeps that key/value cache and runs every question as a suffix continuing it
(Qwen2.5-VL's 3D positions carried on from the prefix). Each probability must
equal, within 1e-4 in float32 on CPU, what one plain model-card forward pass
over the whole prompt of that one question gives: for a CT study of several
images and a single-image CR, alone, batched together and through the batcher.

The tiny model's random head gives near-uniform logits (every P(yes) close to
0.5), where a wrong position moves a probability by barely 1e-4; so these
tests scale its output head by 12 (scores near 0.9), where a position off by
one moves the probabilities by 4-7e-4 while the exact path stays within 1e-6.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from preread.worker.inference.engine import Engine, ProbeResult, StudyContext
from preread.worker.inference.model import LoadedModel, load_model
from tests.inference.test_engine import in_threads
from tests.support.tiny_model import write_test_pngs

PIXELS = {"min_pixels": 56 * 56, "max_pixels": 96 * 28 * 28}
HEAD_SCALE = 12.0
TOLERANCE = 1e-4

CT_HEAD = StudyContext("CT", "HEAD", "CT HEAD WITHOUT CONTRAST", "081Y", "M")
CR_CHEST = StudyContext("CR", "CHEST", "CHEST PA AND LATERAL", "064Y", "F")


@pytest.fixture(scope="module")
def sharp(tiny_model_dir: Path) -> LoadedModel:
    """A private copy of the tiny model (not the process-wide one) with a sharper output head."""
    torch.set_num_threads(1)
    loaded = load_model(str(tiny_model_dir), device="cpu", **PIXELS)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(HEAD_SCALE)
    return loaded


@pytest.fixture(scope="module", params=[False, True], ids=["answer", "think"])
def engine(sharp: LoadedModel, request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng = Engine(sharp, think=request.param, probe_batch_rows=32, batch_wait_ms=300.0)
    assert eng.shared_prefix
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], StudyContext]:
    """Four slices of different sizes (so several image blocks with different grids precede the text)."""
    images = write_test_pngs(tmp_path_factory.mktemp("ct"), [(320, 288), (256, 352), (200, 200), (280, 224)], seed=11)
    return images, CT_HEAD


@pytest.fixture(scope="module")
def cr_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], StudyContext]:
    return write_test_pngs(tmp_path_factory.mktemp("cr"), [(512, 400)], seed=12), CR_CHEST


def separate_pass_scores(engine: Engine, images: list[Path], ctx: StudyContext) -> dict[str, float]:
    """P(yes) / (P(yes) + P(no)) per question, each from its own plain model-card forward pass."""
    from qwen_vl_utils import process_vision_info

    from preread.worker.inference.engine import EMPTY_THINK

    scores = {}
    for condition, question in engine.prompts.probe_questions(ctx):
        messages = engine._messages(images, question)
        text = engine.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if engine.think:
            text += EMPTY_THINK
        vision, _ = process_vision_info(messages)
        with torch.inference_mode():
            probs = engine.model(**engine._inputs([text], vision)).logits[0, -1].float().softmax(-1)
        yes, no = probs[engine.yes_ids].sum(), probs[engine.no_ids].sum()
        scores[condition] = float(yes / (yes + no))
    return scores


def assert_match(results: list[ProbeResult], expected: dict[str, float]) -> None:
    assert [p.condition for p in results] == list(expected)
    for probe in results:
        assert probe.score == pytest.approx(expected[probe.condition], abs=TOLERANCE), probe.condition


@pytest.mark.parametrize("which", ["ct", "cr"])
def test_shared_prefix_scores_equal_separate_forward_passes(engine: Engine, which: str, request: pytest.FixtureRequest) -> None:
    images, ctx = request.getfixturevalue(f"{which}_study")
    expected = separate_pass_scores(engine, images, ctx)
    assert len(expected) >= 4
    assert max(expected.values()) - min(expected.values()) > TOLERANCE  # the questions are told apart
    assert_match(engine.probe_many([(images, ctx)])[0], expected)


def test_studies_batched_together_and_through_the_batcher_keep_their_scores(
    engine: Engine, ct_study: tuple, cr_study: tuple
) -> None:
    """A CT and a CR in one prefill (left-padded to each other) and in one suffix pass."""
    expected = [separate_pass_scores(engine, *study) for study in (ct_study, cr_study)]
    together = engine.probe_many([ct_study, cr_study])
    threaded = in_threads([lambda: engine.probe(*ct_study), lambda: engine.probe(*cr_study)])
    for results, want in zip([*together, *threaded], expected * 2, strict=True):
        assert_match(results, want)


def test_full_row_baseline_gives_the_same_scores(engine: Engine, ct_study: tuple, cr_study: tuple) -> None:
    """The former one-row-per-question way (the benchmark's baseline) agrees with the shared prefix."""
    shared = engine.probe_many([ct_study, cr_study])
    engine.shared_prefix = False
    try:
        full = engine.probe_many([ct_study, cr_study])
    finally:
        engine.shared_prefix = True
    for a_study, b_study in zip(shared, full, strict=True):
        for a, b in zip(a_study, b_study, strict=True):
            assert a.condition == b.condition and a.score == pytest.approx(b.score, abs=TOLERANCE)


def test_prefix_holds_the_images_and_the_study_context_once(engine: Engine, ct_study: tuple) -> None:
    """Only the question itself (and the end of the turn) is left to each suffix."""
    images, ctx = ct_study
    job = engine._prepare_probe(images, ctx)
    image_token = engine.processor.image_token_id
    assert sum(1 for t in job.rows[0][: job.prefix_len] if t == image_token) == sum(
        int(g.prod()) // 4 for g in job.image_grid_thw
    )
    context_line = engine.prompts.probe_questions(ctx)[0][1].split("\n")[0]
    assert context_line in engine.tokenizer.decode(job.rows[0][: job.prefix_len])
    for row, (_, question) in zip(job.rows, job.questions, strict=True):
        suffix = engine.tokenizer.decode(row[job.prefix_len :])
        assert image_token not in row[job.prefix_len :]
        assert context_line not in suffix
        assert question.split("\n")[-1].split("?")[0][-12:] in suffix
        assert len(row) - job.prefix_len < 40 < job.prefix_len


def test_a_profile_without_questions_scores_nothing_beside_one_with_questions(
    sharp: LoadedModel, ct_study: tuple, cr_study: tuple, tmp_path: Path
) -> None:
    from preread.worker.inference.prompting import DEFAULT_PROMPTS, load_prompts

    text = DEFAULT_PROMPTS.read_text()
    start = text.index("[profile.probes]\npneumothorax")  # the chest radiograph's questions
    end = text.index("[[profile]]", start)
    edited = tmp_path / "preread.toml"
    edited.write_text(text[:start] + text[end:])
    prompts = load_prompts(edited)
    assert prompts.probe_questions(CR_CHEST) == [] and prompts.probe_questions(CT_HEAD)
    eng = Engine(sharp, prompts=prompts, batch_wait_ms=1.0)
    try:
        assert eng.probe(*cr_study) == []
        none, ct = eng.probe_many([cr_study, ct_study])
        assert none == []
        assert_match(ct, separate_pass_scores(eng, *ct_study))
    finally:
        eng.close()

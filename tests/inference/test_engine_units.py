"""Unit tests of the engine's parts: grammar, parsing, prompts, batcher (no model forward passes)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest

from preread.schemas.findings import MAX_FINDINGS, SAFE_TEXT, DraftReport, Laterality, Presence, Severity, Urgency
from preread.schemas.tables import ParseStatus
from preread.worker.inference.batcher import DynamicBatcher
from preread.worker.inference.grammar import SAFE_CHARS, compile_draft_grammar, draft_ebnf, longest_document_chars
from preread.worker.inference.parsing import parse_output, parse_text_answer, split_thinking
from preread.worker.inference.prompting import StudyContext, context_text, load_prompts

# --- grammar ----------------------------------------------------------------------------------


def _finding(text: str = "small effusion") -> dict[str, str]:
    return {"text": text, "anatomy": "left lung", "laterality": "left", "presence": "present", "severity": "mild"}


def _doc(findings: list[dict[str, str]], impression: str = "effusion", urgency: str = "routine") -> str:
    return json.dumps({"findings": findings, "impression": impression, "urgency": urgency}, separators=(",", ":"))


@pytest.fixture(scope="module")
def matcher_factory(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    compiled = {think: compile_draft_grammar(tok, len(tok) + 27, stops, think, 1024) for think in (False, True)}

    def accepts(text: str, think: bool = False) -> bool:
        matcher = xgr.GrammarMatcher(compiled[think].compiled)
        return matcher.accept_string(text) and matcher.is_completed()

    return accepts


def test_safe_chars_are_allowed_by_the_schema_pattern() -> None:
    assert re.fullmatch(SAFE_TEXT, SAFE_CHARS)
    assert not set('"<|\\') & set(SAFE_CHARS)


def test_grammar_accepts_valid_and_longest_documents(matcher_factory) -> None:  # type: ignore[no-untyped-def]
    assert matcher_factory(_doc([_finding()]))
    longest = _doc([_finding("x" * 160) | {"anatomy": "y" * 48, "laterality": "bilateral", "presence": "uncertain", "severity": "moderate"}] * MAX_FINDINGS, "z" * 400, "priority")
    assert len(longest) == longest_document_chars()
    assert matcher_factory(longest)
    DraftReport.model_validate_json(longest)


@pytest.mark.parametrize(
    "text",
    [
        _doc([_finding("a <b")]),
        _doc([_finding("a|b")]),
        _doc([_finding("x" * 161)]),
        _doc([_finding()] * (MAX_FINDINGS + 1)),
        _doc([_finding()], urgency="urgent"),
        _doc([_finding()]).replace(":", ": "),
        _doc([_finding()], impression=""),
        '{"impression":"x","findings":[],"urgency":"stat"}',
    ],
)
def test_grammar_rejects_invalid_documents(matcher_factory, text: str) -> None:  # type: ignore[no-untyped-def]
    assert not matcher_factory(text)


def test_think_grammar(matcher_factory) -> None:  # type: ignore[no-untyped-def]
    doc = _doc([_finding()])
    assert matcher_factory("<think>The left costophrenic angle is blunted.</think>\n" + doc, think=True)
    assert not matcher_factory(doc, think=True)
    assert "think ::=" in draft_ebnf(think=True) and "think" not in draft_ebnf(think=False)


# --- parsing ----------------------------------------------------------------------------------


def test_split_thinking() -> None:
    assert split_thinking("<think>a\nb</think>\n{}") == ("a\nb", "{}")
    assert split_thinking("no think here") == (None, "no think here")
    assert split_thinking("<think>cut off") == ("cut off", "")


def test_parse_output_keeps_status_for_bad_output() -> None:
    assert parse_output("not json", "json").status == ParseStatus.INVALID
    assert parse_output("", "json").status == ParseStatus.EMPTY
    assert parse_output("<think>only thinking</think>", "json").status == ParseStatus.EMPTY
    ok = parse_output("<think>x</think>" + _doc([_finding()]), "json")
    assert ok.status == ParseStatus.OK and ok.thinking == "x" and ok.report is not None


def test_parse_free_text_medevalkit_style() -> None:
    text = (
        "Findings: There is a small left pleural effusion. No pneumothorax. "
        "Possible right lower lobe consolidation. Severe cardiomegaly.\n"
        "Impression: Left effusion and cardiomegaly; possible pneumonia."
    )
    report = parse_text_answer(text)
    assert [f.laterality for f in report.findings] == [Laterality.LEFT, Laterality.NONE, Laterality.RIGHT, Laterality.NONE]
    assert [f.presence for f in report.findings] == [Presence.PRESENT, Presence.ABSENT, Presence.UNCERTAIN, Presence.PRESENT]
    assert report.findings[0].severity == Severity.MILD and report.findings[3].severity == Severity.SEVERE
    assert report.impression.startswith("Left effusion") and report.urgency == Urgency.ROUTINE
    assert parse_output("Findings: a <b> \"quoted\" | c.\nImpression: fine", "text").status == ParseStatus.OK
    assert parse_output("The lungs are clear.", "text").status == ParseStatus.INVALID


# --- prompts ----------------------------------------------------------------------------------


def test_context_carries_no_identity_and_no_special_characters() -> None:
    fields = {f.name for f in dataclasses.fields(StudyContext)}
    assert fields == {"modality", "body_part", "study_description", "patient_age", "patient_sex"}
    text = context_text(StudyContext("CT", "HEAD", 'CT <|im_end|> "HEAD"', "070Y", "F"))
    assert "<" not in text and "|" not in text and '"' not in text
    assert "Modality: CT." in text and "Patient age: 070Y." in text


def test_prompts_follow_modality_and_body_part() -> None:
    prompts = load_prompts()
    assert prompts.profile(StudyContext("DX", "CHEST")).name == "chest_xray"
    assert prompts.profile(StudyContext("CR", None)).name == "chest_xray"
    assert prompts.profile(StudyContext("CT", "HEAD")).name == "head_ct"
    assert prompts.profile(StudyContext("MR", "KNEE")).name == "generic"
    draft = prompts.draft_prompt(StudyContext("CT", "HEAD"), "json", think=False)
    assert "head CT" in draft and "Modality: CT." in draft
    assert "<think>" in prompts.draft_prompt(StudyContext("CT", "HEAD"), "json", think=True)
    assert "Findings:" in prompts.draft_prompt(StudyContext("CR", "CHEST"), "text", think=False)


# --- batcher ----------------------------------------------------------------------------------


def test_batcher_runs_full_batches_at_once_and_groups_by_kind() -> None:
    calls: list[tuple[str, list[int]]] = []

    def run(kind, payloads):  # type: ignore[no-untyped-def]
        calls.append((kind, list(payloads)))
        return [p * 10 for p in payloads]

    batcher = DynamicBatcher(run, max_rows=3, max_wait_ms=10_000)
    try:
        start = time.monotonic()
        futures = [batcher.submit("a", i, length=100) for i in range(3)]
        assert [f.result(timeout=5) for f in futures] == [0, 10, 20]
        assert time.monotonic() - start < 5  # full: no waiting for the deadline
    finally:
        batcher.close()
    assert calls == [("a", [0, 1, 2])]


def test_batcher_flushes_old_requests_and_separates_kinds() -> None:
    calls: list[tuple[str, list[int]]] = []
    batcher = DynamicBatcher(lambda k, p: (calls.append((k, list(p))), p)[1], max_rows=8, max_wait_ms=20)
    try:
        fa = batcher.submit("a", 1, length=10)
        fb = batcher.submit("b", 2, length=10)
        assert fa.result(timeout=5) == 1 and fb.result(timeout=5) == 2
    finally:
        batcher.close()
    assert sorted(calls) == [("a", [1]), ("b", [2])]


def test_batcher_groups_by_length_and_counts_rows() -> None:
    calls: list[list[str]] = []
    batcher = DynamicBatcher(lambda k, p: (calls.append(list(p)), p)[1], max_rows=4, max_wait_ms=10_000, length_bucket=100)
    try:
        f = [
            batcher.submit("p", "short1", length=50, rows=2),
            batcher.submit("p", "long", length=950, rows=2),
            batcher.submit("p", "short2", length=60, rows=2),
        ]
        assert f[0].result(timeout=5) == "short1" and f[2].result(timeout=5) == "short2"
        assert calls == [["short1", "short2"]]
    finally:
        batcher.close()  # drains "long"
    assert calls[-1] == ["long"]


def test_batcher_hands_errors_to_every_caller() -> None:
    def run(kind, payloads):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory")

    batcher = DynamicBatcher(run, max_rows=2, max_wait_ms=1)
    try:
        futures = [batcher.submit("a", i, length=1) for i in range(2)]
        for future in futures:
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(timeout=5)
        assert batcher._thread.is_alive()  # the model thread survives a failed batch
    finally:
        batcher.close()

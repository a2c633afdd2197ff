"""The draft grammar: EBNF generated from the pydantic schema, compiled by xgrammar.

xgrammar's JSON-schema compiler ignores ``maxLength`` when a string has a
``pattern`` and cannot compile long bounded regex repetitions, so the grammar
is generated here from :class:`schemas.findings.DraftReport`'s JSON schema:
objects with properties in declared order, compact separators, arrays with
``maxItems``, enums, and strings of ``minLength..maxLength`` printable ASCII
characters without ``"``, ``\\``, ``<`` or ``|``. Every document the grammar
admits validates against the schema, and its length in bytes bounds the
number of tokens (every byte is a token of a byte-level BPE vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from preread.schemas.findings import SAFE_TEXT, DraftReport

#: Printable ASCII without ``"`` (0x22), ``<`` (0x3c), ``\\`` (0x5c), ``|`` (0x7c): a subset of ``SAFE_TEXT``.
SAFE_CHAR_CLASS = r"[\x20\x21\x23-\x3b\x3d-\x5b\x5d-\x7b\x7d\x7e]"
#: The one character a string may hold.
SAFE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"<\\|')
#: Upper bound on the think block's characters (InfiMed-RL).
THINK_MAX_CHARS = 1500


def _lit(text: str) -> str:
    """An EBNF string literal."""
    return json.dumps(text)


class _EbnfBuilder:
    """Turns the (small) JSON schema subset that DraftReport uses into EBNF rules."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.defs: dict[str, Any] = schema.get("$defs", {})
        self.rules: dict[str, str] = {"safe_char": SAFE_CHAR_CLASS}
        self.root = self.rule_for(schema, "root")

    def rule_for(self, node: dict[str, Any], name: str) -> str:
        """Define a rule for ``node`` (named ``name`` unless it is a $ref) and return the rule name."""
        if "$ref" in node:
            ref = node["$ref"].rsplit("/", 1)[-1]
            rule = f"def_{ref}"
            if rule not in self.rules:
                self.rules[rule] = ""  # placeholder against recursion
                self.rules[rule] = self.body(self.defs[ref], rule)
            return rule
        self.rules[name] = self.body(node, name)
        return name

    def body(self, node: dict[str, Any], name: str) -> str:
        """The right-hand side of a rule for ``node``."""
        if "enum" in node:
            return " | ".join(_lit(json.dumps(v)) for v in node["enum"])
        kind = node.get("type")
        if kind == "object":
            required = node.get("required", [])
            parts = []
            for i, (key, sub) in enumerate(node["properties"].items()):
                if key not in required:
                    raise ValueError(f"optional property {key!r} is not supported by the draft grammar")
                sep = "" if i == 0 else '"," '
                parts.append(f"{sep}{_lit(json.dumps(key) + ':')} {self.rule_for(sub, f'{name}_{key}')}")
            return '"{" ' + " ".join(parts) + ' "}"'
        if kind == "array":
            item = self.rule_for(node["items"], f"{name}_item")
            most = node.get("maxItems")
            if most is None:
                raise ValueError(f"{name}: arrays need maxItems to bound the output")
            least = node.get("minItems", 0)
            alternatives = [] if least > 0 else ['"[" "]"']
            if most >= 1:
                rest_min = max(least - 1, 0)
                alternatives.append(f'"[" {item} ("," {item}){{{rest_min},{most - 1}}} "]"')
            return " | ".join(alternatives)
        if kind == "string":
            most = node.get("maxLength")
            if most is None:
                raise ValueError(f"{name}: strings need maxLength to bound the output")
            if node.get("pattern", SAFE_TEXT) != SAFE_TEXT:
                raise ValueError(f"{name}: only SAFE_TEXT strings are known to fit the grammar's character class")
            return f'"\\"" safe_char{{{node.get("minLength", 0)},{most}}} "\\""'
        raise ValueError(f"{name}: unsupported schema node {node}")

    def ebnf(self, think: bool) -> str:
        """The grammar text; with ``think`` the JSON is preceded by a bounded ``<think>`` block."""
        rules = dict(self.rules)
        if think:
            rules = {"root": "think json_root", "json_root": rules.pop(self.root), **rules}
            rules["think"] = f'"<think>" [^<]{{0,{THINK_MAX_CHARS}}} "</think>" [\\n ]{{0,2}}'
        else:
            rules = {"root": rules.pop(self.root), **rules}
        return "".join(f"{rule} ::= {rhs}\n" for rule, rhs in rules.items())


def draft_json_schema() -> dict[str, Any]:
    """The JSON schema of the draft report (pydantic)."""
    return DraftReport.model_json_schema()


def draft_ebnf(think: bool = False) -> str:
    """EBNF for a compact draft-report JSON document, optionally preceded by a ``<think>`` block."""
    return _EbnfBuilder(draft_json_schema()).ebnf(think)


def _longest(node: dict[str, Any], defs: dict[str, Any]) -> Any:
    """The longest instance of a schema node (each bound at its maximum)."""
    if "$ref" in node:
        return _longest(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    if "enum" in node:
        return max(node["enum"], key=lambda v: len(json.dumps(v)))
    kind = node["type"]
    if kind == "object":
        return {k: _longest(v, defs) for k, v in node["properties"].items()}
    if kind == "array":
        return [_longest(node["items"], defs)] * node["maxItems"]
    if kind == "string":
        return "x" * node["maxLength"]
    raise ValueError(node)


def longest_document_chars(think: bool = False) -> int:
    """Characters (= bytes, ASCII only) of the longest document the grammar admits."""
    schema = draft_json_schema()
    doc = json.dumps(_longest(schema, schema.get("$defs", {})), separators=(",", ":"))
    extra = len("<think>") + THINK_MAX_CHARS * 4 + len("</think>") + 2 if think else 0  # [^<] may be 4-byte UTF-8
    return len(doc) + extra


def max_new_tokens_for(think: bool, configured: int) -> int:
    """At least the longest valid document plus its stop token: a draft is never cut short."""
    return max(configured, longest_document_chars(think) + 1)


@dataclass(frozen=True)
class CompiledDraftGrammar:
    """The compiled grammar and what generation needs with it."""

    compiled: Any  # xgrammar.CompiledGrammar
    stop_token_ids: tuple[int, ...]
    think: bool
    max_new_tokens: int


def compile_draft_grammar(
    tokenizer: Any, vocab_size: int, stop_token_ids: list[int], think: bool, configured_max_new_tokens: int
) -> CompiledDraftGrammar:
    """Compile the draft grammar for this tokenizer (the real processor's) and the model's vocab size."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    compiled = compiler.compile_grammar(xgr.Grammar.from_ebnf(draft_ebnf(think)))
    return CompiledDraftGrammar(
        compiled=compiled,
        stop_token_ids=tuple(stop_token_ids),
        think=think,
        max_new_tokens=max_new_tokens_for(think, configured_max_new_tokens),
    )


def logits_processor(grammar: CompiledDraftGrammar) -> Any:
    """A fresh xgrammar HF logits processor (one per ``generate`` call; one matcher per row)."""
    import xgrammar.contrib.hf

    return xgrammar.contrib.hf.LogitsProcessor(grammar.compiled)

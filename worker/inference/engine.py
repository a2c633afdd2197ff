"""The inference engine: draft reports and triage probes, through one dynamic batcher.

One :class:`Engine` per worker process (see :func:`get_engine`). Threads call
:meth:`Engine.draft` and :meth:`Engine.probe`; both prepare their request on
the calling thread (chat template, image loading and resizing, as the model
card does with ``qwen_vl_utils.process_vision_info``) and hand it to the
batcher's model thread, which runs left-padded batches:

* drafts: ``model.generate`` with xgrammar's HF logits processor (one
  matcher per row) so that the JSON always validates; free-text mode is
  unconstrained and parsed afterwards;
* probes: each study's images and the part of the prompt its questions share
  are encoded once (one left-padded prefill for the batch's studies, keeping
  the key/value cache); every question then runs as a short suffix that
  continues that cache, all questions of the batch in one forward pass. The
  score is ``P(yes) / (P(yes) + P(no))`` from the suffix's last logits. The
  former way, one full row per question (images encoded once, but every row
  attends over the whole prompt), stays as ``shared_prefix=False``: the
  benchmark's baseline.

With ``static_cache`` (default: on CUDA) drafts decode into a static
key/value cache whose decode step transformers compiles with ``torch.compile``
(CUDA graphs, ``reduce-overhead``); batch sizes are rounded up to powers of
two and cache lengths to :data:`CACHE_LENGTH_STEP`, and the caches are kept
and reset between batches, so that few graphs exist and they are replayed on
the same cache tensors.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preread.schemas.findings import DraftReport, Urgency
from preread.schemas.settings import Settings
from preread.schemas.tables import ParseStatus
from preread.worker.inference.batcher import DynamicBatcher
from preread.worker.inference.grammar import CompiledDraftGrammar, compile_draft_grammar, logits_processor
from preread.worker.inference.model import LoadedModel, get_model_for_settings
from preread.worker.inference.parsing import parse_output
from preread.worker.inference.prompting import PromptSet, StudyContext, load_prompts

__all__ = [
    "DraftResult",
    "Engine",
    "GenerationOptions",
    "ProbeResult",
    "StudyContext",
    "get_engine",
    "urgency_from_probes",
]

log = logging.getLogger(__name__)

#: Answer words whose first token counts as "yes" / "no" in a probe.
YES_WORDS = ("yes", "Yes")
NO_WORDS = ("no", "No")
#: Assistant prefix that closes an empty think block, so a reasoning model answers at once in a probe.
EMPTY_THINK = "<think>\n\n</think>\n\n"
#: Static key/value caches are sized in steps of this many tokens, so that one compiled decode graph
#: serves prompts of many lengths (transformers keeps the largest size seen and reuses it).
CACHE_LENGTH_STEP = 1024
#: Most static caches kept at once (batch sizes are few when the decode step is compiled: powers of two).
MAX_STATIC_CACHES = 8
#: Per-token tensors of the processor's output, left padded when rows are batched.
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass
class DraftResult:
    """One draft: the raw output always, the parsed report when it validates, and provenance."""

    raw_output: str
    thinking: str | None
    report: DraftReport | None
    parse_status: ParseStatus
    parse_error: str | None
    prompt_version: str
    model_id: str
    model_revision: str | None
    mode: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]
    min_pixels: int
    max_pixels: int
    n_images: int


@dataclass
class ProbeResult:
    """One triage question's score: P(yes) / (P(yes) + P(no))."""

    condition: str
    question: str
    score: float
    prompt_version: str


@dataclass(frozen=True)
class GenerationOptions:
    """How a draft is generated. Defaults: greedy, constrained in JSON mode, the engine's token bound."""

    constrained: bool | None = None  # None: constrained when the mode is 'json'
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    seed: int | None = None


@dataclass
class _DraftJob:
    """One study's draft request: the processor's tensors for its single row (CPU)."""

    inputs: dict[str, torch.Tensor]
    n_images: int
    options: GenerationOptions
    submitted: float
    prepare_s: float


@dataclass
class _ProbeJob:
    """One study's probes: each question's full token row; the study's images are encoded once."""

    questions: list[tuple[str, str]]
    rows: list[list[int]]  # one token row per question (image placeholders expanded), unpadded
    prefix_len: int  # leading tokens every row shares (all image tokens among them)
    pixel_values: torch.Tensor  # the study's images, once
    image_grid_thw: torch.Tensor  # one row per image of the study
    submitted: float
    prepare_s: float

    @property
    def width(self) -> int:
        """The longest row's length in tokens (the batcher's length bucket)."""
        return max(len(r) for r in self.rows)


@dataclass
class _DraftOutput:
    raw: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def urgency_from_probes(probes: Sequence[ProbeResult], priority_threshold: float, stat_threshold: float) -> Urgency:
    """The study's urgency from its highest probe score and the thresholds."""
    top = max((p.score for p in probes), default=0.0)
    if top >= stat_threshold:
        return Urgency.STAT
    if top >= priority_threshold:
        return Urgency.PRIORITY
    return Urgency.ROUTINE


def _first_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The first token of each word's tokenization (as the answer's first token), deduplicated."""
    ids: list[int] = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if encoded and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def shared_prefix_len(rows: Sequence[Sequence[int]], image_token_id: int) -> int:
    """Tokens at the start of every row that all rows share, leaving each row at least one token of its own.

    Every image token must lie in that prefix: the suffix pass carries no images.
    """
    shortest = min(len(r) for r in rows)
    first = rows[0]
    n = 0
    while n < shortest - 1 and all(r[n] == first[n] for r in rows):
        n += 1
    for row in rows:
        if image_token_id in row[n:]:
            raise ValueError("the probe questions do not share the study's images as a common prefix")
    return n


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of token rows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def bucket_rows(rows: int, most: int) -> int:
    """The power of two at or above ``rows``, at most ``most`` (never below ``rows``): few compiled batch shapes."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return max(rows, min(bucket, most))


def _think_default(model_id: str) -> bool:
    """InfiMed-RL reasons in a ``<think>`` block before answering; the SFT model does not."""
    return "-rl" in model_id.lower() or "_rl" in model_id.lower()


class Engine:
    """Drafts and probes on one loaded model; thread-safe, one per process."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        mode: str = "json",
        think: bool | None = None,
        prompts: PromptSet | None = None,
        max_new_tokens: int = 1024,
        max_images: int = 4,
        batch_size: int = 8,
        probe_batch_rows: int = 32,
        batch_wait_ms: float = 5.0,
        shared_prefix: bool = True,
        static_cache: bool | None = None,
        compile_decode: bool | None = None,
    ) -> None:
        if mode not in ("json", "text"):
            raise ValueError(f"draft mode must be 'json' or 'text', not {mode!r}")
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.mode = mode
        self.think = _think_default(loaded.model_id) if think is None else think
        self.prompts = prompts or load_prompts()
        self.max_images = max_images
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.stop_token_ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_token_id: int = int(pad if pad is not None else self.stop_token_ids[0])
        self.vocab_size: int = int(self.model.get_output_embeddings().weight.shape[0])
        self.configured_max_new_tokens = max_new_tokens
        self.yes_ids = _first_token_ids(self.tokenizer, YES_WORDS)
        self.no_ids = _first_token_ids(self.tokenizer, NO_WORDS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"cannot tell yes {self.yes_ids} from no {self.no_ids} tokens")
        self._grammar: CompiledDraftGrammar | None = None
        self._grammar_lock = threading.Lock()
        # The batcher's thread is the model's only user in production; draft_many/probe_many
        # (tests, benchmarks) run on the caller's thread, so model calls are serialised here too.
        self._model_lock = threading.RLock()
        self.batch_size = batch_size
        self.probe_batch_rows = probe_batch_rows
        #: Probes continue one cached prefill of the study's images and shared prompt (else: full rows).
        self.shared_prefix = shared_prefix
        on_cuda = loaded.device.type == "cuda"
        #: Drafts decode into a static key/value cache (default: on CUDA).
        self.static_cache = on_cuda if static_cache is None else static_cache
        #: With the static cache, the decode step is compiled (default: on CUDA; on CPU only when asked).
        self.compile_decode = self.static_cache and (on_cuda if compile_decode is None else compile_decode)
        self._compile_config = self._make_compile_config(on_cuda) if self.compile_decode else None
        # Static caches kept across batches (one per batch size, all of one length), so that the compiled
        # decode step and its CUDA graphs see the same cache tensors every time; reset before each use.
        self._static_caches: OrderedDict[int, Any] = OrderedDict()
        self._static_cache_len = 0
        # One model thread for both kinds: drafts batch up to batch_size studies, probes up to
        # probe_batch_rows questions; the two kinds never share a batch.
        self._batcher = DynamicBatcher(
            self._run_batch,
            max_rows=batch_size,
            max_wait_ms=batch_wait_ms,
            name="preread-model",
            row_limit=lambda kind: probe_batch_rows if kind == "probe" else batch_size,
        )

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """An engine on the process-wide model named by ``settings``."""
        return cls(
            get_model_for_settings(settings),
            mode=settings.draft_mode,
            think=None if settings.think == "auto" else settings.think,
            prompts=load_prompts(settings.prompts_path),
            max_new_tokens=settings.max_new_tokens,
            max_images=settings.max_images,
            batch_size=settings.batch_size,
            probe_batch_rows=settings.probe_batch_rows,
            batch_wait_ms=settings.batch_wait_ms,
        )

    @staticmethod
    def _make_compile_config(on_cuda: bool) -> Any:
        """How transformers compiles the decode step: CUDA graphs on CUDA; plain inductor elsewhere."""
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, mode="reduce-overhead" if on_cuda else "default")
        if not on_cuda:
            # transformers compiles on CUDA-like devices only unless told
            config._compile_all_devices = True  # type: ignore[assignment]
        return config

    @property
    def grammar(self) -> CompiledDraftGrammar:
        """The compiled draft grammar (compiled on first use, from the real tokenizer)."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = compile_draft_grammar(
                    self.tokenizer, self.vocab_size, self.stop_token_ids, self.think, self.configured_max_new_tokens
                )
            return self._grammar

    def close(self) -> None:
        """Stop the model threads after the queued requests."""
        self._batcher.close()

    # --- public API ---------------------------------------------------------------------
    def draft(
        self, images: list[Path], ctx: StudyContext, options: GenerationOptions | None = None
    ) -> DraftResult:
        """Draft a report for one study's images (batched with other threads' drafts)."""
        job = self._prepare_draft(images, ctx, options or GenerationOptions())
        future = self._batcher.submit(("draft", job.options), job, length=int(job.inputs["input_ids"].shape[1]))
        return self._result(future.result(), job.n_images)

    def draft_many(
        self, studies: Sequence[tuple[list[Path], StudyContext]], options: GenerationOptions | None = None
    ) -> list[DraftResult]:
        """Draft several studies as one batch on the calling thread (no batcher)."""
        jobs = [self._prepare_draft(images, ctx, options or GenerationOptions()) for images, ctx in studies]
        with self._model_lock:
            outputs = self._run_drafts(jobs)
        return [self._result(out, job.n_images) for out, job in zip(outputs, jobs, strict=True)]

    def probe(self, images: list[Path], ctx: StudyContext) -> list[ProbeResult]:
        """Score the study's triage questions (one forward pass with other threads' probes)."""
        job = self._prepare_probe(images, ctx)
        if not job.questions:
            return []
        future = self._batcher.submit("probe", job, length=job.width, rows=len(job.questions))
        return future.result()

    def probe_many(self, studies: Sequence[tuple[list[Path], StudyContext]]) -> list[list[ProbeResult]]:
        """Probe several studies as one batch on the calling thread (no batcher)."""
        jobs = [self._prepare_probe(images, ctx) for images, ctx in studies]
        with self._model_lock:
            return self._run_probes(jobs)

    # --- preparation (caller's thread) -----------------------------------------------------
    def _messages(self, images: Sequence[Path | Any], text: str) -> list[dict[str, Any]]:
        """Model-card messages: image items (``file://`` paths, with the pixel budget) then the text."""
        content: list[dict[str, Any]] = []
        for image in list(images)[: self.max_images]:
            ref = f"file://{Path(image).resolve()}" if isinstance(image, (str, Path)) else image
            content.append(
                {"type": "image", "image": ref, "min_pixels": self.loaded.min_pixels, "max_pixels": self.loaded.max_pixels}
            )
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def _vision(self, messages: list[dict[str, Any]]) -> list[Any]:
        from qwen_vl_utils import process_vision_info

        image_inputs, _ = process_vision_info(messages)
        return list(image_inputs or [])

    def _prepare_draft(self, images: Sequence[Path | Any], ctx: StudyContext, options: GenerationOptions) -> _DraftJob:
        """Chat template, images and processor tensors for one draft, as the model card builds them."""
        if not images:
            raise ValueError("a draft needs at least one image")
        start = time.perf_counter()
        messages = self._messages(images, self.prompts.draft_prompt(ctx, self.mode, self.think))
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        vision = self._vision(messages)
        inputs = self.processor(text=[text], images=vision, padding=True, return_tensors="pt")
        return _DraftJob(dict(inputs), len(vision), options, time.perf_counter(), time.perf_counter() - start)

    def _prepare_probe(self, images: Sequence[Path | Any], ctx: StudyContext) -> _ProbeJob:
        """One row per question; the pixel values of the study's images are kept once."""
        if not images:
            raise ValueError("a probe needs at least one image")
        start = time.perf_counter()
        questions = self.prompts.probe_questions(ctx)
        texts = []
        for _, question in questions:
            text = self.processor.apply_chat_template(
                self._messages(images, question), tokenize=False, add_generation_prompt=True
            )
            texts.append(text + EMPTY_THINK if self.think else text)
        vision = self._vision(self._messages(images, ""))
        pixels = self.processor.image_processor(images=vision, return_tensors="pt")
        # The same images in every row: expand the placeholders as the processor does, without
        # preprocessing the pixels once per question.
        merge = self.processor.image_processor.merge_size**2
        pad = self.processor.image_token
        counts = [int(g.prod()) // merge for g in pixels["image_grid_thw"]]
        expanded = []
        for text in texts:
            pieces = text.split(pad)
            if len(pieces) != len(counts) + 1:
                raise ValueError("image placeholders do not match the images")
            expanded.append("".join(p + (pad * counts[i] if i < len(counts) else "") for i, p in enumerate(pieces)))
        rows = [list(map(int, r)) for r in self.tokenizer(expanded)["input_ids"]] if expanded else []
        return _ProbeJob(
            questions=questions,
            rows=rows,
            prefix_len=shared_prefix_len(rows, int(self.processor.image_token_id)) if rows else 0,
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            submitted=time.perf_counter(),
            prepare_s=time.perf_counter() - start,
        )

    def _result(self, out: _DraftOutput, n_images: int) -> DraftResult:
        parsed = parse_output(out.raw, self.mode)
        return DraftResult(
            raw_output=out.raw,
            thinking=parsed.thinking,
            report=parsed.report,
            parse_status=parsed.status,
            parse_error=parsed.error,
            prompt_version=self.prompts.version,
            model_id=self.loaded.model_id,
            model_revision=self.loaded.revision,
            mode=self.mode,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            timings=out.timings,
            min_pixels=self.loaded.min_pixels,
            max_pixels=self.loaded.max_pixels,
            n_images=n_images,
        )

    # --- model thread -----------------------------------------------------------------------
    def _run_batch(self, kind: Any, jobs: list[Any]) -> Sequence[Any]:
        """The batcher's entry point: one batch of one kind."""
        with self._model_lock:
            if kind == "probe":
                return self._run_probes(jobs)
            return self._run_drafts(jobs)

    def _inputs(self, texts: list[str], images: list[Any]) -> Any:
        """Left-padded model inputs for texts and images in one processor call, as the model card builds them."""
        return self.processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(
            self.loaded.device
        )

    def _collate(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Rows of several requests as one left-padded batch (as ``processor(..., padding=True)`` pads)."""
        width = max(int(p["input_ids"].shape[1]) for p in parts)
        batch: dict[str, torch.Tensor] = {}
        for key in parts[0]:
            tensors = [p[key] for p in parts]
            if key in _SEQUENCE_KEYS:
                fill = self.pad_token_id if key == "input_ids" else 0
                tensors = [torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill) for t in tensors]
            batch[key] = torch.cat(tensors).to(self.loaded.device)
        return batch

    def _generation_config(self, options: GenerationOptions, constrained: bool) -> Any:
        config = copy.deepcopy(self.model.generation_config)
        if constrained:
            max_new = self.grammar.max_new_tokens
        else:
            max_new = self.configured_max_new_tokens
        config.max_new_tokens = options.max_new_tokens or max_new
        config.min_new_tokens = options.min_new_tokens
        config.do_sample = options.do_sample
        config.temperature = options.temperature if options.do_sample else None
        config.top_p = None
        config.top_k = None
        config.eos_token_id = self.stop_token_ids
        config.pad_token_id = self.pad_token_id
        return config

    def _static_cache(self, config: Any, rows: int, prompt_tokens: int) -> Any:
        """The kept static cache for this batch size, reset; all kept caches grow together in steps.

        Sets ``config`` to compile the decode step (or not). The length is the longest needed so far
        rounded up to :data:`CACHE_LENGTH_STEP`, so one compiled length serves most batches.
        """
        from transformers import cache_utils

        if self._compile_config is not None:
            config.compile_config = self._compile_config
        else:
            config.disable_compile = True
        needed = prompt_tokens + int(config.max_new_tokens)
        if needed > self._static_cache_len:
            self._static_caches.clear()  # free the shorter ones before allocating
            self._static_cache_len = -(-needed // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
        cache = self._static_caches.pop(rows, None)
        if cache is None:
            text_config = self.model.config.get_text_config(decoder=True)
            cache = cache_utils.StaticCache(config=text_config, max_cache_len=self._static_cache_len)
        else:
            cache.reset()
        self._static_caches[rows] = cache  # most recently used last
        while len(self._static_caches) > MAX_STATIC_CACHES:
            self._static_caches.popitem(last=False)
        return cache

    def _generate(self, inputs: dict[str, torch.Tensor], options: GenerationOptions, constrained: bool) -> torch.Tensor:
        """``model.generate`` on one batch: static cache when enabled, else (and after it failed once) dynamic."""
        if self.static_cache:
            try:
                return self._generate_once(inputs, options, constrained, static=True)
            except torch.cuda.OutOfMemoryError:
                raise  # the caller's smaller-budget retry handles memory
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile failing on this card or version
                log.warning(
                    "static-cache decoding failed (%s: %s); this worker drafts with the dynamic cache from now on",
                    type(exc).__name__, str(exc)[:300],
                )  # fmt: skip
                self.static_cache = False
                self.compile_decode = False
                self._static_caches.clear()
        return self._generate_once(inputs, options, constrained, static=False)

    def _generate_once(
        self, inputs: dict[str, torch.Tensor], options: GenerationOptions, constrained: bool, static: bool
    ) -> torch.Tensor:
        processors = [logits_processor(self.grammar)] if constrained else []  # fresh matchers per call
        config = self._generation_config(options, constrained)
        cache: dict[str, Any] = {}
        if static:
            cache["cache"] = self._static_cache(config, int(inputs["input_ids"].shape[0]), int(inputs["input_ids"].shape[1]))
        if options.seed is not None:
            torch.manual_seed(options.seed)
        output: torch.Tensor = self.model.generate(
            **inputs, generation_config=config, logits_processor=processors, **cache
        )
        return output

    @torch.inference_mode()
    def _run_drafts(self, jobs: list[_DraftJob]) -> list[_DraftOutput]:
        started = time.perf_counter()
        options = jobs[0].options
        constrained = options.constrained if options.constrained is not None else self.mode == "json"
        rows = [j.inputs for j in jobs]
        if self.compile_decode:
            # Each batch size is a compiled graph of its own: fill up to a power of two with copies of the last row.
            rows += [rows[-1]] * (bucket_rows(len(rows), self.batch_size) - len(rows))
        inputs = self._collate(rows)
        prefilled = time.perf_counter()
        output = self._generate(inputs, options, constrained)
        done = time.perf_counter()
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        stops = torch.isin(new_tokens, torch.tensor(self.stop_token_ids, device=new_tokens.device))
        results = []
        for i, job in enumerate(jobs):
            hits = stops[i].nonzero()
            completion = int(hits[0].item()) + 1 if len(hits) else int(new_tokens.shape[1])
            timings = {
                "prepare_s": job.prepare_s,
                "queue_s": started - job.submitted,
                "preprocess_s": prefilled - started,
                "generate_s": done - prefilled,
                "batch_size": float(len(jobs)),
                "batch_rows": float(len(rows)),
            }
            results.append(_DraftOutput(texts[i], int(prompt_tokens[i]), completion, timings))
        return results

    @torch.inference_mode()
    def _run_probes(self, jobs: list[_ProbeJob]) -> list[list[ProbeResult]]:
        """Score every question of the batch's studies; each study's images are encoded once."""
        asked = [job for job in jobs if job.rows]  # a profile may have no questions
        scores: list[float] = []
        if asked:
            features = self._study_image_features(asked)
            if self.shared_prefix:
                logits = self._probe_logits_shared_prefix(asked, features)
            else:
                logits = self._probe_logits_full_rows(asked, features)
            yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
            no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
            scores = torch.sigmoid(yes - no).tolist()  # = P(yes) / (P(yes) + P(no))
        results: list[list[ProbeResult]] = []
        row = 0
        for job in jobs:
            study_results = []
            for condition, question in job.questions:
                study_results.append(ProbeResult(condition, question, float(scores[row]), self.prompts.version))
                row += 1
            results.append(study_results)
        return results

    def _study_image_features(self, jobs: list[_ProbeJob]) -> list[list[torch.Tensor]]:
        """The vision encoder over every image of the batch at once: per study, one tensor per image."""
        device = self.loaded.device
        vision = self.model.get_image_features(
            torch.cat([j.pixel_values for j in jobs]).to(device),
            torch.cat([j.image_grid_thw for j in jobs]).to(device),
            return_dict=True,
        )
        per_image = list(vision.pooler_output)
        studies: list[list[torch.Tensor]] = []
        first = 0
        for job in jobs:
            n = int(job.image_grid_thw.shape[0])
            studies.append(per_image[first : first + n])
            first += n
        return studies

    def _image_inputs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}  # type: ignore[arg-type]

    def _probe_logits_full_rows(self, jobs: list[_ProbeJob], features: list[list[torch.Tensor]]) -> torch.Tensor:
        """The baseline: one forward pass over one full row (images and whole prompt) per question."""
        device = self.loaded.device
        rows = [row for job in jobs for row in job.rows]
        ids, mask = _left_pad(rows, self.pad_token_id)
        row_features: list[torch.Tensor] = []
        grids: list[torch.Tensor] = []
        for job, study in zip(jobs, features, strict=True):
            for _ in job.questions:
                row_features.extend(study)
                grids.append(job.image_grid_thw)
        return self.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            mm_token_type_ids=(ids == self.processor.image_token_id).long().to(device),
            image_grid_thw=torch.cat(grids).to(device),
            mm_encoder_outputs=self._image_inputs(row_features),
            logits_to_keep=1,
            use_cache=False,
        ).logits[:, -1, :].float()

    def _probe_logits_shared_prefix(self, jobs: list[_ProbeJob], features: list[list[torch.Tensor]]) -> torch.Tensor:
        """Prefill each study's shared prefix once, then every question's suffix against that cache.

        The prefill is one left-padded batch with Qwen2.5-VL's 3D (M-RoPE) positions from
        ``get_rope_index``; a suffix continues its study's text positions from the prefix's
        largest position + 1 (what ``rope_deltas`` encodes), left-padded too so that every row's
        last token is the question's last, and its attention mask is the study's prefix mask
        followed by its own. The cache rows are selected per question (one copy per row).
        """
        device = self.loaded.device
        image_token = int(self.processor.image_token_id)
        prefix_ids, prefix_mask = _left_pad([job.rows[0][: job.prefix_len] for job in jobs], self.pad_token_id)
        prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
        grid = torch.cat([j.image_grid_thw for j in jobs]).to(device)
        positions, _ = self.model.model.get_rope_index(
            prefix_ids,
            mm_token_type_ids=(prefix_ids == image_token).long(),
            image_grid_thw=grid,
            attention_mask=prefix_mask,
        )
        prefill = self.model(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            position_ids=positions,
            mm_encoder_outputs=self._image_inputs([f for study in features for f in study]),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = prefill.cache
        next_position = positions.amax(dim=(0, 2)) + 1  # per study; padding positions are 0

        study_of_row = [s for s, job in enumerate(jobs) for _ in job.rows]
        suffixes = [row[job.prefix_len :] for job in jobs for row in job.rows]
        ids, mask = _left_pad(suffixes, self.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        index = torch.tensor(study_of_row, device=device)
        width = ids.shape[1]
        lengths = mask.sum(dim=1)
        # Real tokens get next_position, next_position + 1, ...; padding (masked) gets smaller ones.
        offsets = torch.arange(width, device=device)[None, :] - (width - lengths)[:, None]
        suffix_positions = (next_position[index][:, None] + offsets).clamp(min=0)
        cache.batch_select_indices(index)
        return self.model(
            input_ids=ids,
            attention_mask=torch.cat([prefix_mask[index], mask], dim=1),
            position_ids=suffix_positions[None].expand(3, -1, -1),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :].float()


_engines: dict[tuple[Any, ...], Engine] = {}
_engines_lock = threading.Lock()


def readiness_problem(settings: Settings) -> str | None:
    """Why this process cannot serve infer tasks, in one line naming model, device and fix; None when ready.

    Loads the engine (the model, on the configured device) as the first task
    would, so a worker that says ready has its model in memory; a worker with
    PREREAD_IMAGES_URL must also be let in there with its token.
    """
    from preread.worker.inference.images import images_problem
    from preread.worker.inference.model import device_problem, folder_problem

    problem = device_problem(settings.model, settings.device) or folder_problem(settings.model, settings.device)
    if problem:
        return problem
    problem = images_problem(settings)  # a remote worker: PREREAD_IMAGES_URL answers its token
    if problem:
        return problem
    try:
        get_engine(settings)
    except Exception as exc:  # the model cannot load: say so in one line, never a traceback per task
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        return (f"model {settings.model} could not be loaded on {settings.device}: {type(exc).__name__}: {detail}; "
                "set PREREAD_MODEL=/path/to/folder (or PREREAD_DEVICE=cpu)")
    return None


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for these settings (model loaded once)."""
    key = (
        settings.model,
        settings.model_revision,
        settings.device,
        settings.min_pixels,
        settings.max_pixels,
        settings.draft_mode,
        str(settings.prompts_path),
        settings.think,
    )
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = Engine.from_settings(settings)
        return engine

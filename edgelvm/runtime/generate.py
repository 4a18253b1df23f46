"""The generation loop, gpt-fast style: :func:`prefill`, :func:`decode_one_token`, :func:`decode_n_tokens`,
:func:`generate`.

The loop is family-agnostic. What a family adds is decided once per batch, when :class:`~edgelvm.runtime.vlm.VLM`
builds a :class:`Plan` from the manifest's rules: the prompt embeddings (image features spliced in or not) and the
:class:`StepInputs` that give each step the decoder's extra inputs (M-RoPE positions, cross-attention states) —
an empty one for most families. The backend (:class:`~edgelvm.runtime.backend.Backend`) runs every step.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from edgelvm.errors import BackendError, ConfigError
from edgelvm.runtime.backend import Backend
from edgelvm.runtime.images import ImageInput
from edgelvm.runtime.sampling import Sampler, SamplingConfig
from edgelvm.runtime.text import ChatTokenizer, Message, StopText

#: A batch shares its prefix (prefilled once, then forked) only when the prefix is at least this long.
MIN_SHARED_PREFIX = 8
#: The most tokens a draft may propose per step (speculative decoding): each is a draft step, and acceptance falls
#: with the distance from the last verified token.
MAX_DRAFT_TOKENS = 16


@dataclass
class Request:
    """One conversation to answer: its images (in placeholder order) and either a prompt or full chat messages."""

    prompt: str | None = None
    images: list[ImageInput] = field(default_factory=list)
    messages: list[Message] | None = None


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: token budget, stop conditions and sampling (greedy unless ``temperature > 0``)."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens (benchmarks use it for fixed lengths)
    stop: Sequence[str] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    draft_tokens: int | None = None  # speculative decoding: tokens a loaded draft proposes per step (None: the
    # VLM's setting, 0: off for this call)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}",
                where="max_new_tokens",
                fix="ask for at least one token",
            )
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}",
                where="min_new_tokens",
                fix="lower it or raise max_new_tokens",
            )
        if self.draft_tokens is not None and not 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise ConfigError(
                f"draft_tokens must be in [0, {MAX_DRAFT_TOKENS}], got {self.draft_tokens}",
                where="draft_tokens",
                fix="use 0 (no speculation) or a few tokens (4 is typical)",
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)


def make_config(options: dict[str, Any]) -> GenerationConfig:
    """Keyword options → :class:`GenerationConfig`, naming any unknown option."""
    names = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(
            f"unknown generation option(s): {', '.join(unknown)}",
            where="generate()",
            fix=f"use: {', '.join(sorted(names))}",
        )
    return GenerationConfig(**options)


@dataclass
class Control:
    """Cancellation and deadline for one generation, checked before every decode step."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() value

    def cancel(self) -> None:
        self.cancelled.set()

    def reason(self) -> str | None:
        if self.cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "timeout"
        return None


@dataclass
class GenerationStats:
    """What the last call did and how long it took (milliseconds; decode excludes the prefill step)."""

    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # positions actually run through the decoder at prefill (after reuse)
    reused_tokens: int = 0  # positions taken from an existing cache (chat history, shared batch prefix)
    new_tokens: int = 0
    images_encoded: int = 0  # vision-encoder runs (cache misses)
    image_cache_hits: int = 0
    draft_images_encoded: int = 0  # the draft's vision-encoder runs (speculative decoding; its own cache)
    finish_reasons: list[str] = field(default_factory=list)
    # speculative decoding (a draft bundle): rounds, tokens proposed and kept (per running row), the draft's time
    speculative_rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    draft_ms: float = 0.0  # inside decode_ms
    draft_prefill_ms: float = 0.0  # the draft's images and prompt, inside vision_ms

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """The share of draft tokens the target kept (0 without a draft)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


# ---- the plan --------------------------------------------------------------------------------------------------------
class StepInputs(Protocol):
    """A family's decoder inputs besides embeddings and cache, per step (``runtime/images``: M-RoPE positions,
    cross-attention states and mask); batched and left-padded as the backend pads the embeddings."""

    def shared_prefix(self) -> int:
        """How many leading prompt positions these inputs are equal for in every row (0: never share)."""

    def prompt(self, rows: Sequence[int], start: int, stop: int | None = None) -> dict[str, np.ndarray]:
        """Inputs for feeding positions ``start:stop`` of the prompts of ``rows``."""

    def decode(self, step: int) -> dict[str, np.ndarray]:
        """Inputs for the ``step``-th generated token of every row (0: the first token fed back)."""


@dataclass
class AllInputs:
    """The :class:`StepInputs` of every rule a bundle has (none: no extra inputs, prefixes share freely)."""

    parts: list[StepInputs]

    def shared_prefix(self) -> int:
        return min((part.shared_prefix() for part in self.parts), default=sys.maxsize)

    def prompt(self, rows: Sequence[int], start: int, stop: int | None = None) -> dict[str, np.ndarray]:
        return {name: v for part in self.parts for name, v in part.prompt(rows, start, stop).items()}

    def decode(self, step: int) -> dict[str, np.ndarray]:
        return {name: v for part in self.parts for name, v in part.decode(step).items()}


@dataclass
class Plan:
    """One batch's inputs, built once: each row's prompt embeddings and the family's per-step inputs."""

    rows: list[np.ndarray]  # per row [S_r, E]
    inputs: StepInputs
    shareable: bool = True  # False where a prompt must be prefilled as one block (prefix-LM attention)

    def shared_prefix(self) -> int:
        """Leading positions every row shares (bitwise-equal embeddings and inputs), keeping ≥ 1 own per row."""
        if not self.shareable or len(self.rows) < 2:
            return 0
        length = min(len(r) for r in self.rows)
        same = np.ones(length, dtype=bool)
        for other in self.rows[1:]:
            same &= (other[:length] == self.rows[0][:length]).all(axis=-1)
        shared = int(length if same.all() else np.argmin(same))
        return min(shared, self.inputs.shared_prefix(), length - 1)


@dataclass
class Decoding:
    """Everything a decode loop needs besides the plan and the cache: the token rules and where results go."""

    backend: Backend
    embed: Callable[[np.ndarray], np.ndarray]  # token ids [B] -> embeddings [B, E]
    tokenizer: ChatTokenizer
    eos: set[int]
    pad_id: int
    config: GenerationConfig
    control: Control
    stats: GenerationStats
    output_ids: list[list[int]]
    on_fed: Callable[[int, int], None] = lambda row, token: None  # told each sampled token once it is cached
    draft: Any = None  # a :class:`~edgelvm.runtime.speculative.DraftRun`: speculative decoding


# ---- the loop --------------------------------------------------------------------------------------------------------
def prefill(backend: Backend, cache: Any, plan: Plan, start: int, stats: GenerationStats) -> np.ndarray:
    """Feed every row's prompt after the ``start`` positions already in ``cache``; each row's last logits.

    A backend with ``max_step_tokens`` (a TensorRT engine whose prefill profile was built for chunks: its
    attention scratch is sized for chunk × context instead of context²) is fed a batch-1 prompt in chunks."""
    started = time.perf_counter()
    rows, fed = range(len(plan.rows)), start
    for stop in prefill_chunks(backend, plan, start):
        logits = backend.step([r[fed:stop] for r in plan.rows], cache, plan.inputs.prompt(rows, fed, stop))
        fed = stop
    stats.prefill_ms += (time.perf_counter() - started) * 1e3
    stats.prefill_tokens += max(len(r) - start for r in plan.rows)
    return logits


def prefill_chunks(backend: Backend, plan: Plan, start: int) -> list[int | None]:
    """Where each prefill step stops: ``[None]`` (one step, to each row's end), or chunks of the backend's
    ``max_step_tokens``."""
    longest = max(len(r) for r in plan.rows)
    chunk = getattr(backend, "max_step_tokens", None)
    if not chunk or longest - start <= chunk:
        return [None]
    if len(plan.rows) > 1 or not plan.shareable:
        why = "a batch" if len(plan.rows) > 1 else "a prefix-LM prompt (attended as one block)"
        raise BackendError(
            f"{why} of {longest - start} new prompt tokens is longer than the {chunk} one step can take, and only a "
            "single causal prompt is fed in chunks",
            where="prefill",
            fix="send such prompts one at a time, or rebuild the engines with a larger --prefill-chunk",
        )
    return [*range(start + chunk, longest, chunk), longest]


def share_prefix(backend: Backend, plan: Plan, stats: GenerationStats) -> tuple[Any, int]:
    """A batch cache holding the prefix all rows share, prefilled once for row 0 and forked; ``(new cache, 0)``
    when there is nothing worth sharing (or the backend's caches cannot fork)."""
    shared = plan.shared_prefix()
    cache = backend.new_cache(len(plan.rows))
    if shared < MIN_SHARED_PREFIX or not cache.supports_reuse:
        return cache, 0
    if cache.recurrent and len({len(r) for r in plan.rows}) > 1:
        return cache, 0  # shorter rows' padding after the prefix would pass through the states
    probe = backend.new_cache(1)
    started = time.perf_counter()
    backend.step([plan.rows[0][:shared]], probe, plan.inputs.prompt([0], 0, shared))
    cache.fill_from(probe)
    stats.prefill_ms += (time.perf_counter() - started) * 1e3
    stats.prefill_tokens += shared
    stats.reused_tokens += shared * (len(plan.rows) - 1)
    return cache, shared


def decode_one_token(run: Decoding, cache: Any, plan: Plan, tokens: np.ndarray, step: int) -> np.ndarray:
    """Feed one token per row; the next logits."""
    return run.backend.step(list(run.embed(tokens)[:, None, :]), cache, plan.inputs.decode(step))


class RowOutputs:
    """Each row's generated tokens on their way out: recorded, streamed through the stop strings, and the reason a
    row finished (EOS, a stop string, the token budget). Shared by the plain and the speculative loop."""

    def __init__(self, run: Decoding, batch: int) -> None:
        self.run = run
        self.texts = [StopText(run.tokenizer, tuple(run.config.stop)) for _ in range(batch)]
        self.reasons: list[str | None] = [None] * batch

    def active(self) -> list[int]:
        return [row for row, reason in enumerate(self.reasons) if reason is None]

    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def push(self, row: int, token: int) -> str:
        """Row ``row``'s next token; the text it releases."""
        self.run.output_ids[row].append(token)
        text = self.texts[row]
        if token in self.run.eos:
            self.reasons[row] = "stop"
            return text.finish()
        piece = text.push(token)
        if text.stopped:
            self.reasons[row] = "stop"
        elif len(self.run.output_ids[row]) >= self.run.config.max_new_tokens:
            self.reasons[row], piece = "length", piece + text.finish()
        return piece

    def interrupt(self) -> None:
        """A cancel or deadline ends every row still running."""
        interrupted = self.run.control.reason()
        if interrupted is not None:
            self.reasons = [r or interrupted for r in self.reasons]

    def finish(self) -> None:
        self.run.stats.finish_reasons = [r or "length" for r in self.reasons]


def suppress_eos(run: Decoding, logits: np.ndarray, index: int) -> np.ndarray:
    """``logits`` that choose generated token ``index``, with EOS masked while ``index < min_new_tokens``."""
    if index < run.config.min_new_tokens:
        logits[..., np.fromiter(run.eos, dtype=np.int64)] = -np.inf
    return logits


def decode_n_tokens(run: Decoding, cache: Any, plan: Plan, logits: np.ndarray) -> Iterator[tuple[int, str]]:
    """Sample, stream and feed back one token per row per step until every row stopped (EOS, a stop string, the
    budget, a cancel or a deadline); yields ``(row, text piece)``."""
    sampler = Sampler(run.config.sampling)
    outputs = RowOutputs(run, len(plan.rows))
    started = time.perf_counter()
    for step in range(run.config.max_new_tokens):
        tokens = sampler(suppress_eos(run, logits, step))
        run.stats.new_tokens += 1
        for row in range(len(plan.rows)):
            if outputs.reasons[row] is not None:
                tokens[row] = run.pad_id
                continue
            piece = outputs.push(row, int(tokens[row]))
            if piece:
                yield row, piece
        outputs.interrupt()
        if outputs.done():
            break
        logits = decode_one_token(run, cache, plan, tokens, step)
        for row in range(len(plan.rows)):
            run.on_fed(row, int(tokens[row]))
    run.stats.decode_ms = (time.perf_counter() - started) * 1e3
    outputs.finish()


def generate(run: Decoding, plan: Plan, cache: Any = None, cached: int = 0) -> Iterator[tuple[int, str]]:
    """Prefill what ``cache`` does not hold yet (without a cache: share the batch's common prefix), then decode."""
    if cache is None:
        cache, cached = share_prefix(run.backend, plan, run.stats)
    logits = prefill(run.backend, cache, plan, cached, run.stats)
    if run.draft is None:
        yield from decode_n_tokens(run, cache, plan, logits)
    else:  # the draft's own loop (runtime/speculative.py builds on this module, not the other way round)
        yield from run.draft.decode(run, cache, plan, logits)

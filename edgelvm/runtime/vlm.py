"""``VLM``: load a bundle, give it images and a prompt, get text (or a stream of text pieces).

The whole inference loop is here and short enough to read in one sitting (gpt-fast style): build the prompt,
encode the images, splice their features into the token embeddings, left-pad a batch, prefill once, then decode
one token per step into a preallocated KV cache until EOS, a stop string or the token budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import ConfigError, EdgeLVMError, PromptTooLongError
from edgelvm.manifest import Manifest, verify_bundle_files
from edgelvm.runtime.images import ImageInput
from edgelvm.runtime.ort_backend import OrtBackend
from edgelvm.runtime.preprocess import ImagePreprocessor
from edgelvm.runtime.sampling import Sampler, SamplingConfig
from edgelvm.runtime.text import ChatTokenizer, Message, StreamDecoder, user_message

log = logging.getLogger(__name__)

Images = ImageInput | Sequence[ImageInput] | None


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
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)


@dataclass
class GenerationStats:
    """Timings of the last call, for benchmarks (milliseconds; decode excludes the prefill step)."""

    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    images_encoded: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


class VLM:
    """A loaded bundle. Not thread-safe: use one instance per thread, or serialise calls."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: OrtBackend) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = ChatTokenizer(manifest.tokenizer, bundle_dir)
        self.preprocessor = ImagePreprocessor(manifest.preprocess)
        self._embed_table = np.load(bundle_dir / manifest.graphs["embed"].file, mmap_mode="r")
        self._eos = set(manifest.generation["eos_token_ids"])
        self._pad_id = int(manifest.generation["pad_token_id"])
        self.last_stats = GenerationStats()
        self.last_output_ids: list[list[int]] = []

    @classmethod
    def load(cls, bundle: str | Path, backend: str = "auto", *, threads: int | None = None, verify: bool = True) -> VLM:
        """Open a bundle. ``verify`` checks every file's sha256 against the manifest (a mismatch names the file).

        ``backend``: ``auto`` (CUDA when this onnxruntime has it, else CPU), ``onnxruntime-cpu``,
        ``onnxruntime-cuda`` or ``onnxruntime-tensorrt``.
        """
        bundle_dir = Path(bundle)
        manifest = Manifest.load(bundle_dir)
        verify_bundle_files(bundle_dir, manifest, check_hashes=verify)
        return cls(bundle_dir, manifest, OrtBackend(bundle_dir, manifest, backend=backend, threads=threads))

    @property
    def max_length(self) -> int:
        return self.manifest.kv_cache.max_length

    # ---- public API ------------------------------------------------------------------------------------------------
    def generate(self, images: Images, prompt: str, *, stream: bool = False, **options: Any) -> str | Iterator[str]:
        """Answer ``prompt`` about ``images`` (one image, a list of images, or None).

        ``options`` are :class:`GenerationConfig` fields (``max_new_tokens``, ``stop``, ``temperature``, ...).
        Returns the text, or with ``stream=True`` an iterator of text pieces as they are decoded.
        """
        pieces = self._run([Request(prompt=prompt, images=_as_list(images))], _config(options))
        if stream:
            return (piece for _, piece in pieces)
        return "".join(piece for _, piece in pieces)

    def generate_batch(self, requests: Sequence[Request | tuple[Images, str]], **options: Any) -> list[str]:
        """Answer several requests in one left-padded batch; ``options`` as for :meth:`generate`.

        The same image object used by several requests (several questions about one frame) is encoded once.
        """
        texts = [""] * len(requests)
        for index, piece in self.stream_batch(requests, **options):
            texts[index] += piece
        return texts

    def stream_batch(
        self, requests: Sequence[Request | tuple[Images, str]], **options: Any
    ) -> Iterator[tuple[int, str]]:
        """Like :meth:`generate_batch`, yielding ``(request_index, text_piece)`` as tokens are decoded."""
        normalized = [r if isinstance(r, Request) else Request(prompt=r[1], images=_as_list(r[0])) for r in requests]
        return self._run(normalized, _config(options))

    def forced_logits(self, images: Images, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Teacher forcing: the logits ``[len(continuation), vocab]`` predicting each token of ``continuation``
        after the prompt (row ``i`` is computed with ``continuation[:i]`` already in the cache).

        Used by ``edgelvm eval --reference`` for top-1 agreement and KL against a teacher.
        """
        request = Request(prompt=prompt, images=_as_list(images))
        ids = self.prompt_ids(request)
        if len(ids) + len(continuation) > self.max_length:
            raise PromptTooLongError(
                f"prompt ({len(ids)}) + continuation ({len(continuation)}) exceed the context of {self.max_length}",
                where="prompt",
                fix="shorten the continuation or re-export with a larger --max-length",
            )
        embeds = self._embed(ids, self._encode_images([request])[0])[None]
        total = len(ids) + len(continuation)
        mask = np.ones((1, total), dtype=np.int64)
        cache = self.backend.new_cache(1)
        rows = [self.backend.step(embeds, mask[:, : len(ids)], np.arange(len(ids))[None], cache)[0]]
        for i, token in enumerate(continuation[:-1]):
            position = len(ids) + i
            step_embeds = np.asarray(self._embed_table[[int(token)]], dtype=self.backend.embed_dtype)[None]
            rows.append(self.backend.step(step_embeds, mask[:, : position + 1], np.array([[position]]), cache)[0])
        return np.stack(rows).astype(np.float32)

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def prompt_ids(self, request: Request) -> list[int]:
        """Token ids of the rendered prompt, each image placeholder expanded to the image's token count."""
        messages = request.messages or [user_message(request.prompt or "", len(request.images))]
        ids = self.tokenizer.encode(self.tokenizer.render(messages, add_generation_prompt=True))
        spec = self.manifest.preprocess
        placeholders = sum(1 for i in ids if i == spec.image_token_id)
        if placeholders != len(request.images):
            raise EdgeLVMError(
                f"the prompt has {placeholders} image placeholder(s) but {len(request.images)} image(s) were given",
                where="prompt",
                fix=f"give one image per {spec.image_token!r} placeholder (prompts built from a plain string get one "
                "placeholder per image automatically)",
            )
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * spec.tokens_per_image if token == spec.image_token_id else [token])
        return expanded

    def _encode_images(self, requests: list[Request]) -> list[np.ndarray]:
        """Features per request, ``[num_images, tokens, hidden]``; each distinct image object is encoded once."""
        unique: dict[int, int] = {}
        ordered: list[ImageInput] = []
        for request in requests:
            for image in request.images:
                key = id(image) if not isinstance(image, (str, Path)) else hash(str(image))
                if key not in unique:
                    unique[key] = len(ordered)
                    ordered.append(image)
        self.last_stats.images_encoded = len(ordered)
        if not ordered:
            return [np.zeros((0, 0, 0), dtype=self.backend.embed_dtype) for _ in requests]
        pixels = self.preprocessor(ordered)
        features = self.backend.encode_images(pixels)
        result = []
        for request in requests:
            keys = [id(i) if not isinstance(i, (str, Path)) else hash(str(i)) for i in request.images]
            result.append(features[[unique[k] for k in keys]] if keys else features[:0])
        return result

    def _embed(self, ids: list[int], image_features: np.ndarray) -> np.ndarray:
        table = self._embed_table
        embeds = np.asarray(table[np.asarray(ids, dtype=np.int64)], dtype=self.backend.embed_dtype)
        if image_features.size:
            positions = np.flatnonzero(np.asarray(ids) == self.manifest.preprocess.image_token_id)
            embeds[positions] = image_features.reshape(-1, embeds.shape[-1])
        return embeds

    def _run(self, requests: list[Request], config: GenerationConfig) -> Iterator[tuple[int, str]]:
        if not requests:
            return iter(())
        # Validate everything (prompt length, images) before any compute, so errors come first.
        prompts = [self.prompt_ids(r) for r in requests]
        longest = max(len(p) for p in prompts)
        if longest + config.max_new_tokens > self.max_length:
            raise PromptTooLongError(
                f"prompt of {longest} tokens (images included) + max_new_tokens {config.max_new_tokens} exceeds the "
                f"bundle's context of {self.max_length} tokens",
                where="prompt",
                fix="shorten the prompt, lower max_new_tokens, or re-export with a larger --max-length",
            )
        return self._decode_loop(requests, prompts, config)

    def _decode_loop(
        self, requests: list[Request], prompts: list[list[int]], config: GenerationConfig
    ) -> Iterator[tuple[int, str]]:
        max_new_tokens = config.max_new_tokens
        stats = self.last_stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
        started = time.perf_counter()
        features = self._encode_images(requests)
        stats.vision_ms = (time.perf_counter() - started) * 1e3

        batch, longest = len(prompts), max(len(p) for p in prompts)
        total = longest + max_new_tokens
        hidden = self._embed_table.shape[1]
        embeds = np.zeros((batch, longest, hidden), dtype=self.backend.embed_dtype)
        mask = np.zeros((batch, total), dtype=np.int64)
        for row, (ids, feats) in enumerate(zip(prompts, features)):
            embeds[row, longest - len(ids) :] = self._embed(ids, feats)  # left padding
            mask[row, longest - len(ids) : longest] = 1
        positions = np.maximum(np.cumsum(mask[:, :longest], axis=1) - 1, 0)
        next_position = positions[:, -1] + 1

        sampler = Sampler(config.sampling)
        eos_ids = np.fromiter(self._eos, dtype=np.int64)
        cache = self.backend.new_cache(batch)
        self.last_output_ids: list[list[int]] = [[] for _ in range(batch)]  # sampled ids incl. EOS, per row
        rows = [_RowText(StreamDecoder(self.tokenizer), tuple(config.stop)) for _ in range(batch)]
        finished = np.zeros(batch, dtype=bool)

        step_started = time.perf_counter()
        logits = self.backend.step(embeds, mask[:, :longest], positions, cache)
        stats.prefill_ms = (time.perf_counter() - step_started) * 1e3
        decode_started = time.perf_counter()
        for step in range(max_new_tokens):
            if step < config.min_new_tokens:
                logits[:, eos_ids] = -np.inf
            tokens = sampler(logits)
            tokens[finished] = self._pad_id
            stats.new_tokens += 1
            for row in np.flatnonzero(~finished):
                self.last_output_ids[row].append(int(tokens[row]))
            for row in np.flatnonzero(~finished):
                token = int(tokens[row])
                done = token in self._eos
                piece = rows[row].finish() if done else rows[row].push(token)
                done = done or rows[row].stopped
                if done:
                    finished[row] = True
                if piece:
                    yield int(row), piece
            if finished.all() or step == max_new_tokens - 1:
                break
            length = longest + step + 1
            mask[:, length - 1] = 1
            step_embeds = np.asarray(self._embed_table[tokens], dtype=self.backend.embed_dtype)[:, None, :]
            logits = self.backend.step(step_embeds, mask[:, :length], next_position[:, None], cache)
            next_position += 1
        stats.decode_ms = (time.perf_counter() - decode_started) * 1e3
        for row in np.flatnonzero(~finished):  # out of budget: release text held back for a possible stop string
            if piece := rows[row].finish():
                yield int(row), piece


class _RowText:
    """One row's streamed text: emits decoded text, holding back any tail that could begin a stop string."""

    def __init__(self, decoder: StreamDecoder, stop: tuple[str, ...]) -> None:
        self.decoder, self.stop = decoder, tuple(s for s in stop if s)
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.decoder.push(token)
        text = self.decoder.text
        if not self.stop:
            return self._emit_to(len(text))
        window = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
        hits = [i for s in self.stop if (i := text.find(s, window)) != -1]
        if hits:
            self.stopped = True
            return self._emit_to(min(hits))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit_to(len(text) - hold)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._emit_to(len(self.decoder.flush()))

    def _emit_to(self, end: int) -> str:
        piece = self.decoder.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def _config(options: dict[str, Any]) -> GenerationConfig:
    names = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(
            f"unknown generation option(s): {', '.join(unknown)}",
            where="generate()",
            fix=f"use: {', '.join(sorted(names))}",
        )
    return GenerationConfig(**options)


def _as_list(images: Images) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]

"""``VLM``: load a bundle, give it images and a prompt, get text (or a stream of text pieces).

The whole inference loop is here and short enough to read in one sitting (gpt-fast style): build the prompt,
encode the images (through a feature cache), splice their features into the token embeddings, prefill what is not
already in the KV cache — a prefix shared by every request of a batch is prefilled once and forked — then decode one
token per step into a preallocated cache until EOS, a stop string, the budget, a cancel or a deadline.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BundleError, ConfigError, PromptTooLongError
from edgelvm.manifest import Manifest, verify_bundle_files
from edgelvm.runtime.cross_attention import cross_attention_inputs
from edgelvm.runtime.images import ImageInput, load_image
from edgelvm.runtime.ort_backend import OrtBackend
from edgelvm.runtime.positions import positions_rule
from edgelvm.runtime.preprocess import ImagePreprocessor, PreparedImage
from edgelvm.runtime.sampling import Sampler, SamplingConfig
from edgelvm.runtime.session_settings import SessionSettings
from edgelvm.runtime.text import ChatTokenizer, Message, StreamDecoder, user_message, without_images
from edgelvm.runtime.vision_cache import VisionCache, pixel_key
from edgelvm.runtime.vision_text import VisionTextTokenizer

log = logging.getLogger(__name__)

Images = ImageInput | Sequence[ImageInput] | None
#: A batch shares its prefix (prefilled once, then forked) only when the prefix is at least this long.
MIN_SHARED_PREFIX = 8
#: Prompt text is refused before it is tokenized when it has more than ``max_length`` × this many characters: no
#: prompt that long can fit the context (a BPE token rarely spans more than 16 characters), and tokenizing it would
#: cost seconds (a 20 MB prompt took 82 s). The cost of tokenizing is bounded with it.
MAX_CHARS_PER_TOKEN = 32
#: The largest ``kv_cache.max_length`` a manifest may declare (16M tokens); the KV cache it implies must also fit
#: this machine's memory (checked when the bundle is loaded, not at the first generate).
MAX_CONTEXT_LENGTH = 2**24


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
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


class VLM:
    """A loaded bundle.

    Thread safety: calls are serialised by an internal lock (a stream holds it until it is exhausted or closed),
    so one instance can be shared by threads; for queued, cancellable, time-limited requests use
    :class:`edgelvm.runtime.engine.Engine`.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Any, *, vision_cache_mb: float = 64) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = ChatTokenizer(manifest.tokenizer, bundle_dir)
        self.preprocessor = ImagePreprocessor(manifest.preprocess, bundle_dir)
        #: the vision graph's text input (``preprocess.vision_text``: InstructBLIP's Q-Former reads the prompt)
        vision_text = manifest.preprocess.vision_text
        self.vision_text = VisionTextTokenizer(vision_text, bundle_dir) if vision_text else None
        #: None for 1-D positions (the backend derives them from the mask), else the rule computing them per token
        self.positions = positions_rule(manifest.positions)
        #: None unless the decoder cross-attends to the images (``preprocess.image_placement = "cross_attention"``)
        self.cross = cross_attention_inputs(manifest.preprocess)
        self.vision_cache = VisionCache(int(vision_cache_mb * 2**20))
        _check_context_fits(manifest, bundle_dir)
        self._embed_table = np.load(bundle_dir / manifest.graphs["embed"].file, mmap_mode="r")
        self._eos = set(manifest.generation["eos_token_ids"])
        self._pad_id = int(manifest.generation["pad_token_id"])
        self._lock = threading.RLock()
        self.last_stats = GenerationStats()
        self.last_output_ids: list[list[int]] = []

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        backend: str = "auto",
        *,
        threads: int | None = None,
        verify: bool = True,
        vision_cache_mb: float = 64,
        decoder: str = "auto",
        spinning: bool | None = None,
        expected_sha256: str | None = None,
    ) -> VLM:
        """Open a bundle. ``verify`` checks every file's sha256 against the manifest (a mismatch names the file);
        whatever ``verify``, every file the runtime opens must be listed in the manifest and lie inside the bundle.
        ``expected_sha256``: the sha256 of the bundle's ``edgelvm.json`` (``sha256sum bundle/edgelvm.json``); with it
        the bundle loads only if its manifest — and through its hashes, every file — is the one pinned.

        ``backend``: ``auto`` (CUDA when this onnxruntime has it, else CPU), ``onnxruntime-cpu``,
        ``onnxruntime-cuda``, ``onnxruntime-tensorrt`` (ORT's TensorRT provider), or ``tensorrt`` (engines built on
        this device by ``edgelvm build``; never run on hardware in this repository yet).
        ``vision_cache_mb``: image-feature cache (0 = off). ``decoder``: ``auto`` (the ORT-fused decoder when the
        bundle has one and the backend can use it), ``portable`` (the traced one), or ``fused`` (required).
        ``threads`` / ``spinning``: ONNX Runtime session settings; the defaults are chosen for this device
        (:class:`~edgelvm.runtime.session_settings.SessionSettings`).
        """
        bundle_dir = Path(bundle)
        manifest = Manifest.load(bundle_dir, expected_sha256=expected_sha256)
        verify_bundle_files(bundle_dir, manifest, check_hashes=verify or expected_sha256 is not None)
        if backend == "tensorrt":  # engines built on this device by `edgelvm build`
            from edgelvm.runtime.trt_backend import TrtBackend

            backend_impl: Any = TrtBackend(bundle_dir, manifest)
        else:
            if decoder not in ("auto", "portable", "fused"):
                raise ConfigError(f"unknown decoder {decoder!r}", where="decoder", fix="use auto, portable or fused")
            if decoder == "fused" and "decoder_ort" not in manifest.graphs:
                raise ConfigError(
                    "this bundle has no fused decoder",
                    where=bundle_dir,
                    fix="re-export with `edgelvm export --decoder auto` (fp32, Llama-family text model)",
                )
            fused = {"auto": None, "portable": False, "fused": True}[decoder]
            settings = SessionSettings.for_this_device(threads=threads, spinning=spinning)
            backend_impl = OrtBackend(bundle_dir, manifest, backend=backend, fused=fused, settings=settings)
        return cls(bundle_dir, manifest, backend_impl, vision_cache_mb=vision_cache_mb)

    @property
    def max_length(self) -> int:
        return self.manifest.kv_cache.max_length

    @property
    def max_prompt_chars(self) -> int:
        """The most characters of message text a prompt may have (checked before tokenizing; see
        :data:`MAX_CHARS_PER_TOKEN`)."""
        return self.max_length * MAX_CHARS_PER_TOKEN

    # ---- public API ------------------------------------------------------------------------------------------------
    def generate(self, images: Images, prompt: str, *, stream: bool = False, **options: Any) -> str | Iterator[str]:
        """Answer ``prompt`` about ``images`` (one image, a list of images, or None).

        ``options`` are :class:`GenerationConfig` fields (``max_new_tokens``, ``stop``, ``temperature``, ...).
        Returns the text, or with ``stream=True`` an iterator of text pieces as they are decoded.
        """
        pieces = self.stream_requests([Request(prompt=prompt, images=_as_list(images))], make_config(options))
        if stream:
            return (piece for _, piece in pieces)
        return "".join(piece for _, piece in pieces)

    def generate_batch(self, requests: Sequence[Request | tuple[Images, str]], **options: Any) -> list[str]:
        """Answer several requests in one left-padded batch; ``options`` as for :meth:`generate`.

        Requests that begin alike (several questions about one frame) prefill their common prefix once.
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
        return self.stream_requests(normalized, make_config(options))

    def stream_requests(
        self, requests: list[Request], config: GenerationConfig, control: Control | None = None
    ) -> Iterator[tuple[int, str]]:
        """The common entry point: validates eagerly (errors surface before any compute), then streams."""
        if not requests:
            return iter(())
        # Open image files once, here: a bad file fails before any compute, and tiled bundles need the sizes to
        # count image tokens (load_image returns PIL images as they are).
        requests = [replace(r, images=[load_image(i) for i in r.images]) for r in requests]
        prompts = [self.prompt_ids(r) for r in requests]
        self._check_length(max(len(p) for p in prompts), config.max_new_tokens)
        return self._generate(requests, prompts, config, control or Control())

    def chat(self, images: Images = None, *, system: str | None = None) -> ChatSession:
        """A multi-turn conversation that keeps its KV cache: each turn prefills only its new tokens."""
        if self.manifest.attention == "prefix_lm":
            raise ConfigError(
                "this bundle's model attends bidirectionally over its whole prompt (manifest attention "
                "'prefix_lm', e.g. PaliGemma): a chat turn's new tokens cannot extend a cached conversation",
                where="chat()",
                fix="ask each question with generate() (one prompt per call, as the model was trained)",
            )
        self._refuse_cross_attention("chat()")
        return ChatSession(self, [load_image(i) for i in _as_list(images)], system=system)

    def forced_logits(self, images: Images, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Teacher forcing: the logits ``[len(continuation), vocab]`` predicting each token of ``continuation``
        after the prompt (row ``i`` is computed with ``continuation[:i]`` already in the cache).

        Used by ``edgelvm eval --reference`` for top-1 agreement and KL against a teacher.
        """
        request = Request(prompt=prompt, images=[load_image(i) for i in _as_list(images)])
        ids = self.prompt_ids(request)
        self._check_length(len(ids), len(continuation))
        positions = self._positions(ids, request.images)
        with self._lock:
            cache = self.backend.new_cache(1)
            features = self._image_features(request.images, self._texts_for([request]))
            cross = None if self.cross is None else self.cross.batch([ids], [features], self.backend.embed_dtype)
            embeds = self._embed(ids, features if cross is None else [])
            first = None if cross is None else cross.prefill(0)
            rows = [self._step([embeds], cache, None if positions is None else [positions], first)[0]]
            start = None if positions is None else self.positions.next_position(positions)
            for i, token in enumerate(continuation[:-1]):
                step = None if start is None else [self.positions.decode(start + i)]
                inputs = None if cross is None else cross.decode()
                rows.append(self._step([self._token_embeds(np.array([token]))], cache, step, inputs)[0])
        return np.stack(rows).astype(np.float32)

    # ---- prompt → embeddings -------------------------------------------------------------------------------------
    def prompt_ids(self, request: Request) -> list[int]:
        """Token ids of the rendered prompt with each image's tokens (placeholders expanded to the image's token
        count, or the image before the prompt: ``preprocess.image_placement``)."""
        return self._encode(_messages(request), request.images)

    def check_prompt_text(self, messages: list[Message]) -> None:
        """Refuse, before any tokenizing, message text that is not a string or is longer than any prompt that could
        fit the context (:attr:`max_prompt_chars`)."""
        chars = 0
        for index, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(items, list):
                raise ConfigError(
                    f"message {index}: content must be a string or a list of items, got {type(content).__name__}",
                    where=f"messages[{index}].content",
                    fix='pass text as a str, or a list like [{"type": "image"}, {"type": "text", "text": "..."}]',
                )
            for item in items:
                text = item.get("text", "") if isinstance(item, dict) and item.get("type") != "image" else ""
                if not isinstance(text, str):
                    raise ConfigError(
                        f"message {index}: text must be a str, got {type(text).__name__}",
                        where=f"messages[{index}].content",
                        fix="decode bytes first (`data.decode('utf-8')`)",
                    )
                chars += len(text)
        if chars > self.max_prompt_chars:
            raise PromptTooLongError(
                f"the prompt's text has {chars} characters; no prompt over {self.max_prompt_chars} characters fits "
                f"this bundle's context of {self.max_length} tokens",
                where="prompt",
                fix="shorten the prompt",
            )

    def image_token_counts(self, images: list[ImageInput]) -> list[int]:
        """How many image-feature positions each image fills in the prompt (with tiling it depends on the image's
        size; with cross-attention, none: the features go to the decoder's cross-attention inputs)."""
        if self.manifest.preprocess.image_placement == "cross_attention":
            return [0] * len(images)
        sizes = self._checked_sizes(images)
        if not self.preprocessor.size_dependent:
            return [self.manifest.preprocess.tokens_per_image] * len(images)
        return [self.preprocessor.token_count(h, w) for h, w in sizes]

    def image_segments(self, images: list[ImageInput]) -> list[list[int]]:
        """The prompt token ids each image becomes (its image tokens, and any markers its tiling rule adds)."""
        return [self.preprocessor.image_segment(h, w) for h, w in self._checked_sizes(images)]

    def _checked_sizes(self, images: list[ImageInput]) -> list[tuple[int, int]]:
        """Each image's ``(height, width)``, refusing (:class:`ImageError`) a geometry whose preprocessing would be
        too large — when the request is built, before anything is resized."""
        sizes = [(pil.height, pil.width) for pil in map(load_image, images)]
        for height, width in sizes:
            self.preprocessor.check_geometry(height, width)
        return sizes

    def _encode(self, messages: list[Message], images: list[ImageInput]) -> list[int]:
        """Render and encode ``messages``, with the images' tokens placed as the bundle says (at placeholders, or
        before the prompt)."""
        self.check_prompt_text(messages)
        ids = self.tokenizer.encode(self._render(messages))
        return self.preprocessor.place_image_tokens(ids, self.image_segments(images))

    def _render(self, messages: list[Message]) -> str:
        if not self.preprocessor.images_in_text:
            messages = without_images(messages)
        return self.tokenizer.render(messages)

    def _texts_for(self, requests: list[Request]) -> list[str] | None:
        """For a text-conditioned vision graph: each image's text, its request's rendered prompt (else None)."""
        if self.vision_text is None:
            return None
        return [self._render(_messages(r)) for r in requests for _ in r.images]

    def _check_length(self, prompt_tokens: int, new_tokens: int) -> None:
        if prompt_tokens + new_tokens > self.max_length:
            raise PromptTooLongError(
                f"prompt of {prompt_tokens} tokens (images included) + {new_tokens} new tokens exceeds the bundle's "
                f"context of {self.max_length} tokens",
                where="prompt",
                fix="shorten the prompt, lower max_new_tokens, or re-export with a larger --max-length",
            )

    def _image_features(self, images: list[ImageInput], texts: list[str] | None = None) -> list[np.ndarray]:
        """Per image ``[tokens, hidden]``: cached features where the pixels were seen before, one encoder run over
        the views of the rest (duplicates within the call are encoded once).

        ``texts``: with a text-conditioned vision graph (``preprocess.vision_text``), each image's prompt; the
        features then depend on both, and so does the cache key."""
        if not images:
            return []
        prepared = [self.preprocessor.prepare(image) for image in images]
        keys = [self._feature_key(p) for p in prepared]
        text_ids: dict[str, list[int]] = {}
        if self.vision_text is not None:
            if texts is None or len(texts) != len(images):
                raise ConfigError(
                    "this bundle's vision encoder reads the prompt: pass one text per image",
                    where="_image_features(texts=...)",
                    fix="call it through generate() / generate_batch() / chat()",
                )
            encoded_texts = [self.vision_text.encode(t) for t in texts]
            keys = [f"{k}-t{pixel_key(np.asarray(ids, dtype=np.int64))}" for k, ids in zip(keys, encoded_texts)]
            text_ids = dict(zip(keys, encoded_texts))
        found = {k: f for k in dict.fromkeys(keys) if (f := self.vision_cache.get(k)) is not None}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        stats = self.last_stats
        stats.image_cache_hits += len(found)
        if missing:
            chosen = [prepared[keys.index(k)] for k in missing]
            if any(p.inputs for p in chosen):  # graphs with per-image inputs (native resolution): one call each
                outputs = [self.backend.encode_images(p.pixels, p.inputs) for p in chosen]
            else:
                extra = self.vision_text.batch([text_ids[k] for k in missing]) if text_ids else None
                encoded = self.backend.encode_images(np.concatenate([p.pixels for p in chosen]), extra)
                outputs = np.split(encoded, np.cumsum([len(p.pixels) for p in chosen])[:-1])
            for key, image, views in zip(missing, chosen, outputs):
                found[key] = self.preprocessor.pack(views, image)
                self.vision_cache.put(key, found[key])
            stats.images_encoded += len(missing)
        return [found[k] for k in keys]

    def _feature_key(self, image: PreparedImage) -> str:
        key = pixel_key(image.pixels)
        # Tiled features are unpadded by the original size, which the views alone do not determine.
        return f"{key}-{image.height}x{image.width}" if self.preprocessor.size_dependent else key

    def _embed(self, ids: list[int], image_features: list[np.ndarray]) -> np.ndarray:
        embeds = self._token_embeds(np.asarray(ids, dtype=np.int64))
        if image_features:
            positions = np.flatnonzero(np.asarray(ids) == self.manifest.preprocess.image_token_id)
            embeds[positions] = np.concatenate(image_features).reshape(-1, embeds.shape[-1])
        return embeds

    def _token_embeds(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self._embed_table[ids], dtype=self.backend.embed_dtype)

    # ---- positions -------------------------------------------------------------------------------------------------
    def _positions(self, ids: list[int], images: list[ImageInput]) -> np.ndarray | None:
        """Explicit ``[P, len(ids)]`` positions of a prompt (``manifest.positions``), or None for 1-D positions."""
        if self.positions is None:
            return None
        grid = getattr(self.preprocessor.tiling, "grid", None)
        if grid is None and images:
            raise BundleError(
                f"positions of kind {self.manifest.positions.get('kind')!r} need image grids, which preprocess.tiling "
                f"{self.manifest.preprocess.tiling!r} does not give",
                where="edgelvm.json",
                fix="re-export the bundle with `edgelvm export`",
            )
        grids = [grid(pil.height, pil.width) for pil in map(load_image, images)] if images else []
        return self.positions.prompt(ids, grids)

    def _step(
        self, rows: list[np.ndarray], cache: Any, positions: list[np.ndarray] | None, inputs: Any = None
    ) -> np.ndarray:
        if inputs is not None:  # the decoder graph's extra inputs (cross-attention: image states and mask), by name
            return self.backend.step(rows, cache, positions=positions, inputs=inputs)
        if positions is None:  # 1-D: the backend counts the real tokens (the interface every backend has)
            return self.backend.step(rows, cache)
        return self.backend.step(rows, cache, positions=positions)

    def _refuse_cross_attention(self, what: str) -> None:
        if self.cross is not None:
            raise ConfigError(
                f"{what} is not supported yet for bundles whose decoder cross-attends to the images "
                "(preprocess.image_placement 'cross_attention', e.g. Idefics)",
                where=what,
                fix="use generate() / generate_batch() (one stateless request each)",
            )

    # ---- the loop --------------------------------------------------------------------------------------------------
    def _generate(
        self, requests: list[Request], prompts: list[list[int]], config: GenerationConfig, control: Control
    ) -> Iterator[tuple[int, str]]:
        with self._lock:
            self.last_stats = stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
            started = time.perf_counter()
            # One encoder call for the whole batch: the same frame in several requests is encoded once.
            features = self._image_features([image for r in requests for image in r.images], self._texts_for(requests))
            per_request, start = [], 0
            for r in requests:
                per_request.append(features[start : start + len(r.images)])
                start += len(r.images)
            cross = None
            if self.cross is not None:  # features go to the decoder's cross-attention, not into the embeddings
                cross = self.cross.batch(prompts, per_request, self.backend.embed_dtype)
                per_request = [[] for _ in requests]
            rows = [self._embed(ids, feats) for ids, feats in zip(prompts, per_request)]
            positions = [self._positions(ids, r.images) for ids, r in zip(prompts, requests)]
            explicit = None if self.positions is None else positions
            stats.vision_ms = (time.perf_counter() - started) * 1e3
            interrupted = control.reason()  # the deadline / cancel between stages: after vision, before prefill
            if interrupted is not None:
                stats.finish_reasons = [interrupted] * len(requests)
                return
            cache, cached = self._shared_prefix_cache(rows, explicit) if cross is None else (None, 0)
            yield from self._decode(rows, cache, cached, config, control, positions=explicit, cross=cross)

    def _shared_prefix_cache(
        self, rows: list[np.ndarray], positions: list[np.ndarray] | None = None
    ) -> tuple[Any, int]:
        """A batch cache pre-filled with the longest prefix all rows share (bitwise-equal embeddings, so the same
        images too, and with explicit positions equal positions); ``(None, 0)`` when there is nothing worth
        sharing."""
        batch = len(rows)
        if self.manifest.attention == "prefix_lm":  # a prompt is one bidirectional block: never split its prefill
            return None, 0
        shared = _common_prefix(rows) if batch > 1 else 0
        if positions is not None and batch > 1:
            shared = min(shared, _common_prefix([p.T for p in positions]))
        shared = min(shared, min(len(r) for r in rows) - 1)  # every row needs ≥ 1 own position for its logits
        if shared < MIN_SHARED_PREFIX:
            return None, 0
        probe = self.backend.new_cache(1)
        if not probe.supports_reuse:
            return None, 0
        started = time.perf_counter()
        self._step([rows[0][:shared]], probe, None if positions is None else [positions[0][:, :shared]])
        cache = self.backend.new_cache(batch)
        cache.fill_from(probe)
        self.last_stats.prefill_ms += (time.perf_counter() - started) * 1e3
        self.last_stats.prefill_tokens += shared
        self.last_stats.reused_tokens += shared * (batch - 1)
        return cache, shared

    def _decode(
        self,
        rows: list[np.ndarray],
        cache: Any,
        cached: int,
        config: GenerationConfig,
        control: Control,
        on_fed: Any = None,
        positions: list[np.ndarray] | None = None,
        cross: Any = None,
    ) -> Iterator[tuple[int, str]]:
        """Prefill ``rows[r][cached:]`` after the ``cached`` positions already in ``cache``, then decode.

        ``on_fed(row, token)`` is told each sampled token once it is in the cache (chat sessions track them).
        ``positions``: each row's explicit ``[P, len(rows[r])]`` positions (None: 1-D, counted by the backend);
        generated tokens continue at the row's largest position + 1. ``cross``: the decoder's cross-attention inputs
        (:class:`~edgelvm.runtime.cross_attention.CrossBatch`), fed every step; None where features are spliced.
        """
        stats = self.last_stats
        batch = len(rows)
        cache = cache if cache is not None else self.backend.new_cache(batch)
        sampler = Sampler(config.sampling)
        eos_ids = np.fromiter(self._eos, dtype=np.int64)
        self.last_output_ids = [[] for _ in range(batch)]
        texts = [_RowText(StreamDecoder(self.tokenizer), tuple(config.stop)) for _ in range(batch)]
        reasons: list[str | None] = [None] * batch

        step_started = time.perf_counter()
        suffixes = [r[cached:] for r in rows]
        next_positions = None if positions is None else [self.positions.next_position(p) for p in positions]
        prefill_inputs = None if cross is None else cross.prefill(cached)  # cross-attention: every step
        logits = self._step(
            suffixes, cache, None if positions is None else [p[:, cached:] for p in positions], prefill_inputs
        )
        stats.prefill_ms += (time.perf_counter() - step_started) * 1e3
        stats.prefill_tokens += max(len(s) for s in suffixes)
        decode_started = time.perf_counter()
        for step in range(config.max_new_tokens):
            if step < config.min_new_tokens:
                logits[:, eos_ids] = -np.inf
            tokens = sampler(logits)
            stats.new_tokens += 1
            last_step = step == config.max_new_tokens - 1
            for row in range(batch):
                if reasons[row] is not None:
                    tokens[row] = self._pad_id
                    continue
                token = int(tokens[row])
                self.last_output_ids[row].append(token)
                if token in self._eos:
                    reasons[row], piece = "stop", texts[row].finish()
                else:
                    piece = texts[row].push(token)
                    if texts[row].stopped:
                        reasons[row] = "stop"
                    elif last_step:
                        reasons[row], piece = "length", piece + texts[row].finish()
                if piece:
                    yield row, piece
            interrupted = control.reason()
            if interrupted is not None:
                reasons = [r or interrupted for r in reasons]
            if all(r is not None for r in reasons):
                break
            step_positions = None
            if next_positions is not None:
                step_positions = [self.positions.decode(n + step) for n in next_positions]
            step_inputs = None if cross is None else cross.decode()
            logits = self._step(list(self._token_embeds(tokens)[:, None, :]), cache, step_positions, step_inputs)
            if on_fed is not None:
                for row in range(batch):
                    on_fed(row, int(tokens[row]))
        stats.decode_ms = (time.perf_counter() - decode_started) * 1e3
        stats.finish_reasons = [r or "length" for r in reasons]


class ChatSession:
    """A conversation over fixed images whose KV cache survives between turns.

    Each turn renders the whole conversation with the chat template (so the prompt is exactly what a stateless
    call would build), keeps the cached positions that match it, and prefills only the rest.
    """

    def __init__(self, vlm: VLM, images: list[ImageInput], system: str | None = None) -> None:
        self.vlm = vlm
        self.images = images
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self._cache: Any = None
        self._cached_ids: list[int] = []
        self._turn_lock = threading.Lock()  # one turn at a time: a second concurrent one is refused, not lost

    def ask(self, prompt: str, *, stream: bool = False, **options: Any) -> str | Iterator[str]:
        """One turn. A session answers one turn at a time: a turn started while another is running (another
        thread, or an unfinished stream) raises :class:`~edgelvm.errors.ConfigError` instead of losing a turn."""
        if not isinstance(prompt, str):
            raise ConfigError(
                f"the prompt must be a str, got {type(prompt).__name__}", where="ChatSession.ask", fix="pass text"
            )
        config = make_config(options)
        first_user_turn = not any(m["role"] == "user" for m in self.messages)
        images = [{"type": "image"}] * (len(self.images) if first_user_turn else 0)
        content = [*images, {"type": "text", "text": prompt}]
        messages = [*self.messages, {"role": "user", "content": content}]
        ids = self.vlm._encode(messages, self.images)
        self.vlm._check_length(len(ids), config.max_new_tokens)
        pieces = self._turn(messages, ids, config)
        if stream:
            return pieces
        return "".join(pieces)

    def _turn(self, messages: list[Message], ids: list[int], config: GenerationConfig) -> Iterator[str]:
        # A turn extends the conversation as it was when it started: two at once would both extend the same history
        # and one answer would be dropped. Concurrent use is refused (serialize turns in the caller, or use one
        # session per thread); the check is at the turn's start, i.e. the first piece of a stream.
        if not self._turn_lock.acquire(blocking=False):
            raise ConfigError(
                "this ChatSession is already answering a turn (in another thread, or a stream not yet exhausted)",
                where="ChatSession.ask",
                fix="ask one question at a time per session: wait for the previous answer (exhaust or close its "
                "stream), guard the session with a lock, or give each thread its own session",
            )
        try:
            yield from self._locked_turn(messages, ids, config)
        finally:
            self._turn_lock.release()

    def _locked_turn(self, messages: list[Message], ids: list[int], config: GenerationConfig) -> Iterator[str]:
        vlm = self.vlm
        with vlm._lock:
            vlm.last_stats = stats = GenerationStats(prompt_tokens=len(ids))
            reuse = 0
            # A text-conditioned vision encoder sees the whole conversation: its image features change every turn.
            if self._cache is not None and self._cache.supports_reuse and vlm.vision_text is None:
                reuse = _common_prefix_ids(self._cached_ids, ids)
                reuse = min(reuse, len(ids) - 1)
                self._cache.crop(reuse)
            else:
                self._cache = vlm.backend.new_cache(1)
            stats.reused_tokens = reuse
            started = time.perf_counter()
            image_id = vlm.manifest.preprocess.image_token_id
            if image_id in ids[reuse:]:
                texts = [vlm._render(messages)] * len(self.images) if vlm.vision_text is not None else None
                row = vlm._embed(ids, vlm._image_features(self.images, texts))
            else:  # the images are already in the cache: embed only the new text (rows are sliced at `reuse`)
                row = np.zeros((len(ids), vlm._embed_table.shape[1]), dtype=vlm.backend.embed_dtype)
                row[reuse:] = vlm._token_embeds(np.asarray(ids[reuse:], dtype=np.int64))
            stats.vision_ms = (time.perf_counter() - started) * 1e3
            # explicit positions of the whole conversation: the reused prefix's are the ones already in the cache
            positions = vlm._positions(ids, self.images)
            fed_ids = list(ids)

            def record(_row: int, token: int) -> None:
                fed_ids.append(token)

            answer = ""
            explicit = None if positions is None else [positions]
            turn = vlm._decode([row], self._cache, reuse, config, Control(), on_fed=record, positions=explicit)
            for _, piece in turn:
                answer += piece
                yield piece
            self._cached_ids = fed_ids
            self.messages = [*messages, {"role": "assistant", "content": answer}]


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


def _common_prefix(rows: list[np.ndarray]) -> int:
    length = min(len(r) for r in rows)
    same = np.ones(length, dtype=bool)
    for other in rows[1:]:
        same &= (other[:length] == rows[0][:length]).all(axis=-1)
    return int(length if same.all() else np.argmin(same))


def _common_prefix_ids(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


def _messages(request: Request) -> list[Message]:
    if request.messages:
        return request.messages
    if not isinstance(request.prompt, str):  # None or bytes used to become "" silently
        raise ConfigError(
            f"the prompt must be a str, got {type(request.prompt).__name__}",
            where="prompt",
            fix="pass the question as text (decode bytes first), or chat messages",
        )
    return [user_message(request.prompt, len(request.images))]


def _check_context_fits(manifest: Manifest, bundle_dir: Path) -> None:
    """Refuse at load a ``kv_cache.max_length`` whose KV cache cannot be allocated here (instead of a MemoryError at
    the first generate): over :data:`MAX_CONTEXT_LENGTH`, or a cache (2 buffers, the portable decoder's ping-pong)
    larger than this machine's physical memory."""
    kv = manifest.kv_cache
    where = bundle_dir / "edgelvm.json"
    if not isinstance(kv.max_length, int) or not 1 <= kv.max_length <= MAX_CONTEXT_LENGTH:
        raise BundleError(
            f"kv_cache.max_length {kv.max_length!r} is outside [1, {MAX_CONTEXT_LENGTH}]",
            where=where,
            fix="re-export the bundle with a sane --max-length",
        )
    try:
        itemsize = np.dtype(kv.dtype).itemsize
    except TypeError:
        itemsize = 4
    cache_bytes = 2 * 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * kv.max_length * itemsize
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: only the length bound applies
        return
    if cache_bytes > physical:
        raise BundleError(
            f"kv_cache.max_length {kv.max_length} needs a KV cache of {cache_bytes / 2**30:.1f} GiB, more than this "
            f"machine's {physical / 2**30:.1f} GiB of memory",
            where=where,
            fix="re-export the bundle with a smaller --max-length",
        )


def _as_list(images: Images) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]

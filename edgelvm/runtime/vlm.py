"""``VLM``: load a bundle, give it images and a prompt, get text (or a stream of text pieces).

Per batch the VLM builds a :class:`~edgelvm.runtime.generate.Plan` once — the prompt (chat template, image tokens
placed by ``runtime/images``), the images' features (through a cache), the embeddings (features spliced in, or not
for cross-attention decoders) and the family's per-step inputs (M-RoPE positions, cross-attention states) — and
hands it to the family-agnostic loop in ``runtime/generate.py``. A prefix shared by every request of a batch is
prefilled once and forked; a chat session keeps its KV cache and prefills only each turn's new tokens.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BundleError, ConfigError, PromptTooLongError
from edgelvm.manifest import Manifest, verify_bundle_files
from edgelvm.runtime.backend import Backend
from edgelvm.runtime.embeddings import EmbeddingTable
from edgelvm.runtime.generate import (
    AllInputs,
    Control,
    Decoding,
    GenerationConfig,
    GenerationStats,
    Plan,
    Request,
    generate,
    make_config,
    prefill,
    share_prefix,
)
from edgelvm.runtime.images import ImageEncoder, ImageInput, load_image, step_input_rules
from edgelvm.runtime.ort_backend import OrtBackend
from edgelvm.runtime.session_settings import SessionSettings
from edgelvm.runtime.speculative import DEFAULT_DRAFT_TOKENS, DraftRun, check_draft
from edgelvm.runtime.text import ChatTokenizer, Message, user_message, without_images

__all__ = ["VLM", "ChatSession", "Control", "GenerationConfig", "GenerationStats", "Request", "make_config"]

log = logging.getLogger(__name__)

Images = ImageInput | Sequence[ImageInput] | None
#: Prompt text is refused before it is tokenized when it has more than ``max_length`` × this many characters: no
#: prompt that long can fit the context (a BPE token rarely spans more than 16 characters), and tokenizing it would
#: cost seconds (a 20 MB prompt took 82 s). The cost of tokenizing is bounded with it.
MAX_CHARS_PER_TOKEN = 32
#: The largest ``kv_cache.max_length`` a manifest may declare (16M tokens); the KV cache it implies must also fit
#: this machine's memory (checked when the bundle is loaded, not at the first generate).
MAX_CONTEXT_LENGTH = 2**24


class VLM:
    """A loaded bundle.

    Thread safety: calls are serialised by an internal lock (a stream holds it until it is exhausted or closed),
    so one instance can be shared by threads; for queued, cancellable, time-limited requests use
    :class:`edgelvm.runtime.engine.Engine`.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Backend, *, vision_cache_mb: float = 64) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = ChatTokenizer(manifest.tokenizer, bundle_dir)
        self.encoder = ImageEncoder(manifest, bundle_dir, int(vision_cache_mb * 2**20))
        self.preprocessor, self.vision_text = self.encoder.preprocessor, self.encoder.vision_text
        self.vision_cache = self.encoder.cache
        # Decided once per bundle: the family's per-step input rules and where image features go.
        rules = step_input_rules(manifest, self.preprocessor)
        self.step_rules = list(rules.values())
        self.step_input_kinds = tuple(rules)  # "positions", "cross_attention", "deepstack", "image_blocks"
        self.positions, self.cross = rules.get("positions"), rules.get("cross_attention")
        self._splice_features = manifest.preprocess.image_placement != "cross_attention"
        _check_context_fits(manifest, bundle_dir)
        self._embed_table = EmbeddingTable(bundle_dir, manifest.graphs["embed"])
        self._eos = set(manifest.generation["eos_token_ids"])
        self._pad_id = int(manifest.generation["pad_token_id"])
        self._lock = threading.RLock()
        self.last_stats = GenerationStats()
        self.last_output_ids: list[list[int]] = []
        self.draft: VLM | None = None  # speculative decoding (use_draft)
        self.draft_tokens = DEFAULT_DRAFT_TOKENS
        self._draft_shares_vision = False  # the draft's vision graph and image rules are the target's own

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
        fp16_weights: str | None = None,
        draft: str | Path | VLM | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
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
        (:class:`~edgelvm.runtime.session_settings.SessionSettings`). ``fp16_weights``: an fp16 bundle on the CPU
        provider is ``upcast`` to fp32 at load (fast, twice the bytes) or kept ``mapped`` (converted each step);
        ``auto`` (default) upcasts when that fits in the memory available.
        ``draft``: a bundle (or a loaded :class:`VLM`) with the same tokenizer that proposes ``draft_tokens`` tokens
        per target step (speculative decoding, :meth:`use_draft`); a path is loaded with the same backend settings.
        """
        if draft is not None and spinning is None:
            # two sessions take turns on the same cores: a spinning pool would busy-wait through the other's steps
            # (measured on 2 cores: speculation ran at 0.5-0.7x the target alone with spinning, see docs/benchmarks)
            spinning = False
        bundle_dir = Path(bundle)
        manifest = Manifest.load(bundle_dir, expected_sha256=expected_sha256)
        verify_bundle_files(bundle_dir, manifest, check_hashes=verify or expected_sha256 is not None)
        if backend == "tensorrt":  # engines built on this device by `edgelvm build`
            from edgelvm.runtime.trt_backend import TrtBackend

            if decoder == "fused":
                raise ConfigError(
                    "the TensorRT backend runs engines built from the portable decoder, not the fused one",
                    where="decoder",
                    fix="use decoder='auto' or 'portable' with backend='tensorrt', or an onnxruntime backend",
                )

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
            if fp16_weights not in (None, "auto", "upcast", "mapped"):
                raise ConfigError(f"unknown fp16_weights {fp16_weights!r}", where="fp16_weights",
                                  fix="use auto, upcast or mapped")  # fmt: skip
            settings = SessionSettings.for_this_device(threads=threads, spinning=spinning, fp16_weights=fp16_weights)
            backend_impl = OrtBackend(bundle_dir, manifest, backend=backend, fused=fused, settings=settings)
        vlm = cls(bundle_dir, manifest, backend_impl, vision_cache_mb=vision_cache_mb)
        if draft is not None:
            if not isinstance(draft, VLM):
                draft = cls.load(draft, backend, threads=threads, verify=verify, vision_cache_mb=vision_cache_mb,
                                 spinning=spinning, fp16_weights=fp16_weights)  # fmt: skip
            vlm.use_draft(draft, draft_tokens)
        return vlm

    def use_draft(self, draft: VLM | None, tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        """Speculative decoding with ``draft`` proposing ``tokens`` tokens per target step (None: off). Refused, with
        the reason, where it cannot be exact: another tokenizer or vocabulary, a decoder with per-step inputs (M-RoPE
        positions, cross-attention), a cache that cannot crop (hybrid states, CUDA device caches, TensorRT), or a
        target decoder without multi-position logits (bundles exported before them)."""
        if draft is not None:
            check_draft(self, draft, tokens)
        self.draft, self.draft_tokens = draft, tokens
        self._draft_shares_vision = draft is not None and _same_vision(self.manifest, draft.manifest)

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
        if config.draft_tokens and self.draft is None:
            raise ConfigError(
                f"draft_tokens={config.draft_tokens} but no draft bundle is loaded",
                where="draft_tokens",
                fix="load one (VLM.load(target, draft=...) or vlm.use_draft(...)), or leave draft_tokens unset",
            )
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
        if not self._splice_features:
            raise ConfigError(
                "chat() is not supported yet for bundles whose decoder cross-attends to the images "
                "(preprocess.image_placement 'cross_attention', e.g. Idefics)",
                where="chat()",
                fix="use generate() / generate_batch() (one stateless request each)",
            )
        return ChatSession(self, [load_image(i) for i in _as_list(images)], system=system)

    def forced_logits(self, images: Images, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Teacher forcing: the logits ``[len(continuation), vocab]`` predicting each token of ``continuation``
        after the prompt (row ``i`` is computed with ``continuation[:i]`` already in the cache).

        Used by ``edgelvm eval --reference`` for top-1 agreement and KL against a teacher.
        """
        request = Request(prompt=prompt, images=[load_image(i) for i in _as_list(images)])
        ids = self.prompt_ids(request)
        self._check_length(len(ids), len(continuation))
        with self._lock:
            features = self._image_features(request.images, self._texts_for([request]))
            plan = self._plan([ids], [request.images], [features])
            cache = self.backend.new_cache(1)
            rows = [self.backend.step(plan.rows, cache, plan.inputs.prompt([0], 0))[0]]
            for step, token in enumerate(continuation[:-1]):
                embeds = self._token_embeds(np.array([token]))
                rows.append(self.backend.step([embeds], cache, plan.inputs.decode(step))[0])
        return np.stack(rows).astype(np.float32)

    # ---- prompt → plan -------------------------------------------------------------------------------------------
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
        """How many image-feature positions each image fills in the prompt (see ``ImageEncoder.token_counts``)."""
        return self.encoder.token_counts(images)

    def _encode(self, messages: list[Message], images: list[ImageInput]) -> list[int]:
        """Render and encode ``messages``, with the images' tokens placed as the bundle says."""
        self.check_prompt_text(messages)
        return self.encoder.place(self.tokenizer.encode(self._render(messages)), images)

    def _render(self, messages: list[Message]) -> str:
        if not self.preprocessor.images_in_text:
            messages = without_images(messages)
        return self.tokenizer.render(messages)

    def _texts_for(self, requests: list[Request]) -> list[str] | None:
        """For a text-conditioned vision graph: each image's text, its request's rendered prompt (else None)."""
        if not self.encoder.reads_text:
            return None
        return [self._render(_messages(r)) for r in requests for _ in r.images]

    def _check_length(self, prompt_tokens: int, new_tokens: int, who: str = "the bundle's") -> None:
        if prompt_tokens + new_tokens > self.max_length:
            raise PromptTooLongError(
                f"prompt of {prompt_tokens} tokens (images included) + {new_tokens} new tokens exceeds {who} "
                f"context of {self.max_length} tokens",
                where="prompt",
                fix="shorten the prompt, lower max_new_tokens, or re-export with a larger --max-length",
            )

    def _image_features(self, images: list[ImageInput], texts: list[str] | None = None) -> list[np.ndarray]:
        """Per image ``[tokens, hidden]`` (see :meth:`ImageEncoder.features`), counted in :attr:`last_stats`."""
        return self.encoder.features(self.backend, images, texts, self.last_stats)

    def _embed(self, ids: list[int], image_features: list[np.ndarray]) -> np.ndarray:
        embeds = self._token_embeds(np.asarray(ids, dtype=np.int64))
        if image_features:
            positions = np.flatnonzero(np.asarray(ids) == self.manifest.preprocess.image_token_id)
            width = embeds.shape[-1]  # a wider feature carries per-step inputs after the embedding (DeepStack)
            embeds[positions] = np.concatenate([f.reshape(-1, f.shape[-1])[:, :width] for f in image_features])
        return embeds

    def _token_embeds(self, ids: np.ndarray) -> np.ndarray:
        return self._embed_table.rows(ids, self.backend.embed_dtype)

    def _positions(self, ids: list[int], images: list[ImageInput]) -> np.ndarray:
        """Explicit ``[P, len(ids)]`` positions of a prompt (bundles with ``manifest.positions``: M-RoPE)."""
        return self.positions.image_positions(ids, images)

    def _step_inputs(self, prompts: list[list[int]], images: list[list[Any]], features: list[Any]) -> AllInputs:
        dtype = self.backend.embed_dtype
        return AllInputs([rule.inputs(prompts, images, features, dtype) for rule in self.step_rules])

    def _plan(self, prompts: list[list[int]], images: list[list[Any]], features: list[list[np.ndarray]]) -> Plan:
        """The batch's plan: embeddings (features spliced in, or sent to cross-attention) and per-step inputs."""
        spliced = features if self._splice_features else [[] for _ in prompts]
        rows = [self._embed(ids, f) for ids, f in zip(prompts, spliced)]
        inputs = self._step_inputs(prompts, images, features)
        return Plan(rows, inputs, shareable=self.manifest.attention != "prefix_lm")

    def _decoding(self, config: GenerationConfig, control: Control, batch: int, **options: Any) -> Decoding:
        self.last_output_ids = [[] for _ in range(batch)]
        return Decoding(
            self.backend, self._token_embeds, self.tokenizer, self._eos, self._pad_id, config, control,
            self.last_stats, self.last_output_ids, **options,
        )  # fmt: skip

    # ---- the loop ------------------------------------------------------------------------------------------------
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
            plan = self._plan(prompts, [r.images for r in requests], per_request)
            draft = self._start_draft(requests, config, stats, features=per_request)
            stats.vision_ms = (time.perf_counter() - started) * 1e3
            interrupted = control.reason()  # the deadline / cancel between stages: after vision, before prefill
            if interrupted is not None:
                stats.finish_reasons = [interrupted] * len(requests)
                return
            yield from generate(self._decoding(config, control, len(requests), draft=draft), plan)

    def _draft_tokens(self, config: GenerationConfig) -> int:
        """Tokens the draft proposes per step for this call (0: no speculation)."""
        if self.draft is None:
            return 0
        return self.draft_tokens if config.draft_tokens is None else config.draft_tokens

    def _start_draft(
        self, requests: list[Request], config: GenerationConfig, stats: GenerationStats, cache: Any = None,
        cached: int = 0, features: list[list[np.ndarray]] | None = None,
    ) -> DraftRun | None:  # fmt: skip
        """The draft's side of a generation: its own prompts (its image token counts), image features (its own
        cache) and prefill — ``cache`` (a chat's) already holding ``cached`` positions; None without speculation.
        ``features``: the target's, per request, used as they are when the draft's vision graph and image rules
        are byte for byte the target's (an INT4 draft that kept the vision encoder): its encoder would repeat them."""
        tokens = self._draft_tokens(config)
        if not tokens or self.draft is None:
            return None
        draft, started = self.draft, time.perf_counter()
        with draft._lock:
            prompts = [draft.prompt_ids(r) for r in requests]
            draft._check_length(max(len(p) for p in prompts), config.max_new_tokens, who="the draft's")
            own = GenerationStats()
            if features is None or not self._draft_shares_vision:
                images = [image for r in requests for image in r.images]
                flat = draft.encoder.features(draft.backend, images, draft._texts_for(requests), own)
                features, start = [], 0
                for r in requests:
                    features.append(flat[start : start + len(r.images)])
                    start += len(r.images)
            plan = draft._plan(prompts, [r.images for r in requests], features)
            if cache is None:
                cache, cached = share_prefix(draft.backend, plan, own)
            prefill(draft.backend, cache, plan, cached, own)
        stats.draft_images_encoded += own.images_encoded
        stats.draft_prefill_ms += (time.perf_counter() - started) * 1e3
        return DraftRun(draft.backend, draft._token_embeds, cache, tokens)


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
        self._draft_cache: Any = None  # speculative decoding: the draft's own conversation cache
        self._draft_ids: list[int] = []
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
            if self._cache is not None and self._cache.supports_reuse and not vlm.encoder.reads_text:
                # a hybrid decoder's states rewind only to where they were saved (the last prompt's end)
                reuse = self._cache.rewind_point(min(_common_prefix_ids(self._cached_ids, ids), len(ids) - 1))
                self._cache.crop(reuse)
            else:
                self._cache = vlm.backend.new_cache(1)
            stats.reused_tokens = reuse
            started = time.perf_counter()
            features: list[np.ndarray] = []  # only when the new positions hold images (per-step rules read them)
            if vlm.manifest.preprocess.image_token_id in ids[reuse:]:
                texts = [vlm._render(messages)] * len(self.images) if vlm.encoder.reads_text else None
                features = vlm._image_features(self.images, texts)
                row = vlm._embed(ids, features)
            else:  # the images are already in the cache: embed only the new text (rows are sliced at `reuse`)
                row = np.zeros((len(ids), vlm._embed_table.width), dtype=vlm.backend.embed_dtype)
                row[reuse:] = vlm._token_embeds(np.asarray(ids[reuse:], dtype=np.int64))
            stats.vision_ms = (time.perf_counter() - started) * 1e3
            # per-step inputs of the whole conversation: the reused prefix's are the ones already in the cache
            plan = Plan([row], vlm._step_inputs([ids], [self.images], [features]))
            fed_ids = list(ids)
            draft, draft_ids = self._draft_turn(messages, config, stats)
            run = vlm._decoding(config, Control(), 1, on_fed=lambda _row, token: fed_ids.append(token), draft=draft)
            answer = ""
            for _, piece in generate(run, plan, self._cache, reuse):
                answer += piece
                yield piece
            self._cached_ids, self._draft_ids = fed_ids, draft_ids
            self.messages = [*messages, {"role": "assistant", "content": answer}]

    def _draft_turn(self, messages: list[Message], config: GenerationConfig, stats: GenerationStats) -> tuple:
        """The draft's side of a turn, reusing its own cached conversation; ``(DraftRun or None, the ids its cache
        will hold)`` (the list grows as the draft keeps tokens)."""
        vlm = self.vlm
        if not vlm._draft_tokens(config) or vlm.draft is None:
            self._draft_cache = None  # a turn without the draft: its cache no longer follows the conversation
            return None, []
        request = Request(messages=messages, images=self.images)
        ids = vlm.draft.prompt_ids(request)
        if self._draft_cache is None or vlm.draft.encoder.reads_text:
            self._draft_cache, reuse = None, 0
        else:
            reuse = self._draft_cache.rewind_point(min(_common_prefix_ids(self._draft_ids, ids), len(ids) - 1))
            self._draft_cache.crop(reuse)
        draft = vlm._start_draft([request], config, stats, self._draft_cache, reuse)
        assert draft is not None
        self._draft_cache, fed = draft.cache, list(ids)
        draft.on_fed = lambda _row, token: fed.append(token)
        return draft, fed


def _same_vision(target: Manifest, draft: Manifest) -> bool:
    """Whether the draft's image features are the target's: the same vision graph file (sha256, external data
    included) and the same image rules (a text-conditioned vision graph never: its features depend on the prompt)."""
    graphs = target.graphs.get("vision"), draft.graphs.get("vision")
    if graphs[0] is None or graphs[1] is None or target.preprocess.vision_text or draft.preprocess.vision_text:
        return False
    files = [sorted((name, digest) for name, digest in m.files.items() if name.startswith(g.file))
             for m, g in ((target, graphs[0]), (draft, graphs[1]))]  # fmt: skip
    return bool(files[0]) and files[0] == files[1] and target.preprocess == draft.preprocess


def _common_prefix_ids(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
    local = sum(w is not None for w in kv.windows or [])  # sliding-window layers hold at most `window` positions
    positions = (kv.num_layers - local) * kv.max_length + local * min(kv.max_length, kv.window or kv.max_length)
    cache_bytes = 2 * (2 * positions * kv.num_kv_heads * kv.head_dim * itemsize + kv.state_bytes())
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

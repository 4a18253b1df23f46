"""The bundle contract: ``edgelvm.json``, its schema, validation and file integrity.

Why a module of its own: both sides read it — export writes it (torch side) and the runtime loads it (torch-free) —
so it must depend on nothing but the standard library. Everything the runtime needs to know about a model family is
here as plain data; the runtime never imports an adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import tempfile
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from edgelvm.errors import BundleError, ManifestError
from edgelvm.fsutil import current_umask

MANIFEST_NAME = "edgelvm.json"
#: Bumped in its major part whenever an older runtime could misread a newer bundle.
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1


@dataclass
class TensorSpec:
    """One graph input or output: its name, ONNX element type name (e.g. ``float32``) and shape (ints or dim names)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class GraphSpec:
    """A model part stored in the bundle.

    ``kind`` is ``onnx`` for a graph or ``table`` for a plain ``.npy`` array (the token embedding: a gather from a
    memory-mapped table is cheaper than any graph call and keeps the vocabulary out of the decoder's memory twice).
    """

    file: str
    kind: str = "onnx"
    precision: str = "fp32"
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    #: Largest absolute / relative error against PyTorch measured at export time, for provenance; ``scope`` (a
    #: string) when only a part of the graph was compared (large decoders: its first layers), else the whole graph.
    parity: dict[str, float | str] = field(default_factory=dict)
    #: A ``table`` stored as integer codes (:data:`TABLE_CODE_FIELDS`): ``file`` holds the codes ``uint8 [rows,
    #: blocks, block_size * bits / 8]`` (4 bits: two per byte, low nibble first), ``scales`` the ``float32 [rows,
    #: blocks]`` file, ``zero_points`` the ``uint8 [rows, blocks]`` file or None (symmetric: ``2 ** (bits - 1)``),
    #: ``width`` the row's true length. A row is ``(code - zero_point) * scale``, blocks concatenated, cut to width.
    codes: dict[str, Any] | None = None


#: The keys of a coded table's ``codes`` and their types.
TABLE_CODE_FIELDS = {"bits": int, "block_size": int, "width": int, "scales": str, "zero_points": (str, type(None))}


@dataclass
class PreprocessSpec:
    """How an image becomes ``pixel_values``; mirrors the HF image processor's PIL backend (see
    runtime/images/preprocess)."""

    resize_mode: str  # "shortest_edge" | "exact" | "none"
    size: dict[str, int]  # {"shortest_edge": n} or {"height": h, "width": w}
    resample: str  # PIL filter name: "bicubic", "bilinear", ...
    center_crop: dict[str, int] | None
    rescale_factor: float | None
    mean: list[float] | None
    std: list[float] | None
    convert_rgb: bool
    image_token: str
    image_token_id: int
    #: Tokens one vision-graph input yields: the whole image's count without tiling; with tiling, one view's
    #: (the image's count then depends on its size, see ``tiling_params``).
    tokens_per_image: int
    #: "none", or the name of a tiling rule the runtime implements (``runtime/images/preprocess.TILINGS``; one image
    #: becomes several views and its token count depends on its size); the rule's parameters are ``tiling_params``.
    tiling: str = "none"
    #: Added after format 1.0 and written only when set, so that untiled bundles still load in older runtimes
    #: (which refuse a tiled one: they do not know this field).
    tiling_params: dict[str, Any] | None = None
    #: Where an image's tokens go in the prompt (``runtime/images/preprocess.PLACEMENTS``): "placeholder" — each image
    #: placeholder in the rendered prompt expands to the image's tokens; "prefix" — one image per prompt, its tokens
    #: before the whole encoded prompt (BOS included) and no placeholder in the text (Q-Former models' processors).
    #: Written only when not "placeholder", like ``tiling_params``.
    image_placement: str = "placeholder"
    #: Set when the vision graph also reads the prompt (InstructBLIP's Q-Former): ``{"tokenizer": file in the
    #: bundle, "max_length": int, "inputs": [ids input name, mask input name]}``. The runtime tokenizes each
    #: request's rendered prompt with that tokenizer and feeds it with the request's images. Written only when set.
    vision_text: dict[str, Any] | None = None
    #: Set with ``image_placement = "cross_attention"`` (Flamingo-style models: image features are not spliced into
    #: the embeddings; the decoder graph cross-attends to them every step): ``{"inputs": [states input name, mask
    #: input name], "mask_rule": a rule of runtime/images/cross_attention.py, "reset_token_ids": [...],
    #: "feature_dim": D}``.
    #: The decoder then takes ``states [B, images, tokens_per_image, D]`` and ``mask [B, seq, images]`` (which
    #: image each position attends to). Written only when set.
    cross_attention: dict[str, Any] | None = None
    #: Set when image features also enter the first decoder layers (Qwen3-VL's DeepStack): ``{"input": decoder input
    #: name, "layers": L, "feature_dim": E}``. The vision graph then returns ``[tokens, (1 + L) * E]`` (the token
    #: embeddings, then L deepstack features) and the decoder takes ``input [B, seq, L, E]`` (zeros at text
    #: positions; ``runtime/images/deepstack.py``). Written only when set.
    deepstack: dict[str, Any] | None = None


@dataclass
class TokenizerSpec:
    file: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    special_tokens: dict[str, str]
    add_special_tokens: bool = True
    #: Text the model's processor puts around every rendered prompt (after the chat template, or the plain prompt
    #: when there is none), e.g. PaliGemma's BOS before and "\n" after. Written only when not empty.
    prompt_prefix: str = ""
    prompt_suffix: str = ""


#: The decoder graph's input giving the position of each key column of its sliding-window layers
#: (``KVCacheSpec.windows``): ``[batch, local past + seq]`` int64, -1 for an empty or padded column.
WINDOW_POSITIONS = "window_positions"

#: The portable decoder graph's input ``[K]`` int64 (values ignored) asking for the logits of each row's last K
#: positions of the step: ``logits [batch * K, vocab]``, row-major (speculative decoding verifies K tokens in one
#: step). It has a default of one element (an ONNX initializer of the same name), so a caller that does not feed it
#: gets the ``[batch, vocab]`` of before. Listed in the decoder's ``inputs`` since it exists: a decoder without it
#: returns the last position's logits only. (The fused decoder's ``logits_index`` has always taken any number of flat
#: indices.)
LOGITS_KEEP = "logits_keep"

#: The kinds of fixed-size per-sequence state a decoder layer may carry besides keys and values.
STATE_KINDS = ("conv", "recurrent")


@dataclass
class StateSpec:
    """One decoder layer's fixed-size per-sequence state ``[batch, *shape]`` (hybrid decoders: a short
    convolution's last inputs, ``kind = "conv"``; a linear-attention layer's recurrent matrix, ``"recurrent"``).
    Unlike keys and values it does not grow with the sequence: each step reads it (``past``) and returns it updated
    (``present``), zeros start a sequence, and every position fed — padding included — passes through it."""

    layer: int
    kind: str
    shape: list[int]
    dtype: str


@dataclass
class KVCacheSpec:
    """Per-layer key/value tensors ``[batch, kv_heads, seq, head_dim]``, named by the two format strings.

    Hybrid decoders (linear-attention or short-convolution layers between attention layers) set ``layers``: the
    decoder layer of each of the ``num_layers`` key/value pairs, and ``states``: the other layers' fixed-size states,
    named with the same format strings (``kind`` = the state's kind), after the key/value tensors in the graph's
    inputs and outputs. Both are written only when set: an older runtime refuses such a bundle (it does not know the
    fields) instead of misreading it.

    Decoders with sliding-window (local) layers set ``windows``: per key/value pair, the layer's window (None for a
    global layer). A local layer's past then holds at most ``window - 1`` columns (the most recent positions of each
    row, keys after RoPE), not the whole context, and the decoder graph takes :data:`WINDOW_POSITIONS` ``[batch,
    local past + seq]``: each local column's position (-1: empty or padding), from which it masks those layers.
    Written only when set (same compatibility rule as ``layers``)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    max_length: int
    layout: str = "per_layer_bhsd"
    past_name: str = "past_key_values.{layer}.{kind}"
    present_name: str = "present.{layer}.{kind}"
    layers: list[int] | None = None
    states: list[StateSpec] | None = None
    windows: list[int | None] | None = None

    @property
    def window(self) -> int | None:
        """The local layers' sliding window (one for all of them), or None when every layer keeps the whole
        context."""
        sizes = {w for w in self.windows or [] if w is not None}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def kv_layers(self) -> list[int]:
        """The decoder layer of each key/value pair."""
        return list(self.layers) if self.layers is not None else list(range(self.num_layers))

    def io_names(self) -> tuple[list[str], list[str]]:
        """The decoder graph's cache inputs and outputs in order: each KV layer's key and value, then the states."""
        kinds = [(i, k) for i in self.kv_layers for k in ("key", "value")]
        kinds += [(s.layer, s.kind) for s in self.states or []]
        return ([self.past_name.format(layer=i, kind=k) for i, k in kinds],
                [self.present_name.format(layer=i, kind=k) for i, k in kinds])  # fmt: skip

    def state_bytes(self, batch: int = 1) -> int:
        """Bytes of the states of ``batch`` sequences (constant in sequence length)."""
        itemsize = {"float32": 4, "float16": 2}
        return batch * sum(math.prod(s.shape) * itemsize[s.dtype] for s in self.states or [])


@dataclass
class Manifest:
    family: str
    graphs: dict[str, GraphSpec]
    preprocess: PreprocessSpec
    tokenizer: TokenizerSpec
    kv_cache: KVCacheSpec
    positions: dict[str, Any]
    generation: dict[str, Any]
    created_from: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    #: Device target chosen at export (``--target``): profile name, limits, fit check, predicted tokens/s.
    target: dict[str, Any] | None = None
    #: How the decoder graph masks attention (``ATTENTION_KINDS``): "causal"; or "prefix_lm" — all real tokens of
    #: one decoder step attend to each other (and to the cache), so a prompt prefilled in ONE step from an empty
    #: cache is one bidirectional block (PaliGemma's image + prompt prefix) and one-token decode steps are causal.
    #: The runtime then never splits a prompt's prefill (no shared batch prefix, no chat-cache reuse). Written
    #: only when not "causal" (a runtime older than the field ignores it: it would split prefills).
    #: "image_bidirectional" (Gemma 3): causal, except that an image's tokens attend to each other; the decoder
    #: graph takes ``image_blocks [batch, seq]`` and the runtime feeds each image's tokens in one step
    #: (``runtime/images/image_blocks.py``).
    attention: str = "causal"
    format_version: str = FORMAT_VERSION
    edgelvm_version: str = ""
    #: Image-token reduction applied inside the vision graph at export (``--image-tokens``;
    #: ``models/token_reduction.TokenReduction``): ``{"method", "tokens_per_image", "full_tokens_per_image",
    #: "score", "vision_layer", "order"}``. A record for people and tools (``edgelvm inspect``): the runtime places
    #: ``preprocess.tokens_per_image`` tokens, which is already the reduced count, so an older runtime that ignores
    #: this field runs such a bundle correctly. Written only when set; absent means no reduction.
    image_token_reduction: dict[str, Any] | None = None

    # ---- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["preprocess"].get("tiling_params") is None:
            data["preprocess"].pop("tiling_params", None)
        if data["preprocess"].get("image_placement") == "placeholder":
            data["preprocess"].pop("image_placement", None)
        for key in ("prompt_prefix", "prompt_suffix"):
            if not data["tokenizer"].get(key):
                data["tokenizer"].pop(key, None)
        if data.get("attention") == "causal":
            data.pop("attention")
        if data.get("image_token_reduction") is None:
            data.pop("image_token_reduction", None)
        if data["preprocess"].get("vision_text") is None:
            data["preprocess"].pop("vision_text", None)
        if data["preprocess"].get("cross_attention") is None:
            data["preprocess"].pop("cross_attention", None)
        if data["preprocess"].get("deepstack") is None:
            data["preprocess"].pop("deepstack", None)
        for key in ("layers", "states", "windows"):  # written only when set: plain KV bundles read in older runtimes
            if data["kv_cache"].get(key) is None:
                data["kv_cache"].pop(key, None)
        for graph in data["graphs"].values():  # written only when set: a float table reads in older runtimes
            if graph.get("codes") is None:
                graph.pop("codes", None)
        head = {key: data.pop(key) for key in ("format_version", "edgelvm_version", "family", "created_from")}
        return {**head, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path = MANIFEST_NAME) -> Manifest:
        """Build from parsed JSON, checking every field's presence and type first: a malformed manifest raises
        :class:`ManifestError` naming the field (e.g. ``graphs.vision.file``), never a bare Python error."""
        if not isinstance(data, dict):
            raise ManifestError("top level must be a JSON object", where=where, fix="re-export the bundle")
        _check_version(data, where)
        sections = _check_top(data, where)
        _check_any_sections(data, where)
        graphs = data["graphs"]
        if not isinstance(graphs, dict):
            raise _field_error("graphs", "must be an object of named graphs", where)
        built = {name: _build_graph(g, f"graphs.{name}", where) for name, g in graphs.items()}
        for name, graph in built.items():
            _check_rel_path(graph.file, f"graphs.{name}.file", where)
        for name in REQUIRED_GRAPHS:
            if name not in built:
                raise ManifestError(f"required field 'graphs.{name}' is missing", where=where, fix=_FIX)
            if (built[name].kind == "table") != (name == "embed"):
                kind = "'table'" if name == "embed" else "an ONNX graph kind (not 'table')"
                raise _field_error(f"graphs.{name}.kind", f"must be {kind}, got {built[name].kind!r}", where)
        for name, graph in built.items():
            if name not in ("vision", "decoder", "decoder_ort"):
                continue
            if graph.kind == "table":
                raise _field_error(f"graphs.{name}.kind", "must be an ONNX graph kind (not 'table')", where)
            for io in ("inputs", "outputs"):  # the runtime reads the first input's and output's type
                specs = getattr(graph, io)
                if not specs:
                    raise _field_error(f"graphs.{name}.{io}", "must list the graph's tensors, got none", where)
                if specs[0].dtype not in GRAPH_IO_DTYPES:
                    raise _field_error(
                        f"graphs.{name}.{io}[0].dtype", f"must be one of {', '.join(GRAPH_IO_DTYPES)}", where
                    )
            if name != "vision" and not isinstance((graph.outputs[0].shape or ["?"])[-1], int):
                raise _field_error(f"graphs.{name}.outputs[0].shape", "must end with the vocabulary size", where)
        if sections["kv_cache"]["dtype"] not in ("float32", "float16"):
            raise _field_error("kv_cache.dtype", "must be float32 or float16", where)
        if sections["preprocess"]["resample"] not in RESAMPLE_FILTERS:
            raise _field_error("preprocess.resample", f"must be one of {', '.join(RESAMPLE_FILTERS)}", where)
        tokenizer = TokenizerSpec(**sections["tokenizer"])
        _check_rel_path(tokenizer.file, "tokenizer.file", where)
        files = data.get("files", {})
        for rel, digest in files.items():
            _check_rel_path(rel, f"files[{rel!r}]", where)
            if not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise _field_error(f"files[{rel!r}]", f"must be a lowercase hex sha256, got {digest!r}", where)
        return cls(
            family=data["family"],
            graphs=built,
            preprocess=PreprocessSpec(**sections["preprocess"]),
            tokenizer=tokenizer,
            kv_cache=_build_kv_cache(sections["kv_cache"], where),
            positions=data["positions"],
            generation=data["generation"],
            created_from=data.get("created_from", {}),
            files=dict(files),
            target=data.get("target"),
            attention=_attention_kind(data.get("attention", "causal"), where),
            format_version=data["format_version"],
            edgelvm_version=data.get("edgelvm_version", ""),
            image_token_reduction=data.get("image_token_reduction"),
        )

    @classmethod
    def load(cls, bundle_dir: str | Path, *, expected_sha256: str | None = None) -> Manifest:
        """Read ``bundle_dir/edgelvm.json``. ``expected_sha256``: the manifest's own digest, pinned by the user
        (the hashes inside a manifest only protect the files it lists; pinning the manifest pins the whole bundle)."""
        path = Path(bundle_dir) / MANIFEST_NAME
        if not Path(bundle_dir).is_dir():
            raise BundleError(
                "bundle directory does not exist", where=bundle_dir, fix="pass the directory `edgelvm export` wrote"
            )
        if not path.is_file():
            raise BundleError(
                f"{MANIFEST_NAME} is missing: this is not an edgelvm bundle (or it is incomplete)",
                where=bundle_dir,
                fix="pass the directory written by `edgelvm export -o DIR`, or re-export",
            )
        raw = path.read_bytes()  # read once: the bytes hashed are the bytes parsed
        if expected_sha256 is not None:
            actual = hashlib.sha256(raw).hexdigest()
            if actual != expected_sha256.strip().lower():
                raise BundleError(
                    f"{MANIFEST_NAME} has sha256 {actual}, not the pinned {expected_sha256.strip()}",
                    where=path,
                    fix="use the bundle the digest was taken from, or pin this one's digest "
                    f"(`sha256sum {path}`) if you trust where it came from",
                )
        try:
            data = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ManifestError(f"not valid JSON ({err})", where=path, fix="re-export the bundle") from None
        if not isinstance(data, dict):
            raise ManifestError("top level must be a JSON object", where=path, fix="re-export the bundle")
        return cls.from_dict(data, where=path)


# ---- field checks: every manifest field's presence and JSON type, named on failure --------------------------------
#: Dataclass-typed sections of the manifest.
_SECTIONS: dict[str, type] = {"preprocess": PreprocessSpec, "tokenizer": TokenizerSpec, "kv_cache": KVCacheSpec}
_FIX = "re-export the bundle with `edgelvm export` (do not edit edgelvm.json by hand)"


def _field_error(name: str, problem: str, where: str | Path) -> ManifestError:
    return ManifestError(f"field {name!r} {problem}", where=where, fix=_FIX)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _type_problem(value: Any, hint: Any) -> str | None:
    """None when ``value`` (parsed JSON) fits the annotation ``hint``, else what is wrong (with a sub-path)."""
    if hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, arg) for arg in args]
        if any(p is None for p in problems):
            return None
        names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        return f"must be {names}, got {_json_type(value)}"
    if origin is list:
        if not isinstance(value, list):
            return f"must be an array, got {_json_type(value)}"
        for i, item in enumerate(value):
            if (problem := _type_problem(item, args[0] if args else Any)) is not None:
                return f"[{i}] {problem}"
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return f"must be an object, got {_json_type(value)}"
        for key, item in value.items():
            if (problem := _type_problem(item, args[1] if args else Any)) is not None:
                return f"[{key!r}] {problem}"
        return None
    if hint is type(None):
        return None if value is None else f"must be null, got {_json_type(value)}"
    if is_dataclass(hint):  # its fields are checked when it is built
        return None if isinstance(value, dict) else f"must be an object, got {_json_type(value)}"
    if hint is bool:
        return None if isinstance(value, bool) else f"must be a boolean, got {_json_type(value)}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {_json_type(value)}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {_json_type(value)}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {_json_type(value)}"
    return None if isinstance(value, hint) else f"must be {hint.__name__}, got {_json_type(value)}"


def _check_fields(cls: type, data: Any, prefix: str, where: str | Path) -> dict[str, Any]:
    """``data`` as keyword arguments for dataclass ``cls``: an object, no unknown fields, every required one, each
    of its annotated type."""
    section = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise _field_error(section, f"must be an object, got {_json_type(data)}", where)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ManifestError(
                f"field {prefix}{key!r} is not one this edgelvm knows",
                where=where,
                fix="upgrade edgelvm (`pip install -U edgelvm`), or re-export the bundle with this version",
            )
    for name, spec in known.items():
        required = spec.default is MISSING and spec.default_factory is MISSING
        if name not in data:
            if required:
                raise ManifestError(f"required field {prefix + name!r} is missing", where=where, fix=_FIX)
            continue
        problem = _type_problem(data[name], hints[name])
        if problem is not None:
            raise _field_error(prefix + name, problem, where)
    return data


#: Top-level fields the dataclass types as ``dict[str, Any]`` / sections with their own dataclass: checked by hand.
_TOP_HINTS: dict[str, Any] = {
    "family": str,
    "positions": dict[str, Any],
    "generation": dict[str, Any],
    "created_from": dict[str, Any],
    "files": dict[str, str],
    "target": dict[str, Any] | None,
    "format_version": str,
    "edgelvm_version": str,
    "image_token_reduction": dict[str, Any] | None,
}


def _check_top(data: dict[str, Any], where: str | Path) -> dict[str, dict[str, Any]]:
    """Required top-level fields and their types; the dataclass-typed sections checked field by field. Unknown
    top-level fields are ignored (newer optional fields, e.g. ``attention``, are designed to be)."""
    for key in ("family", "graphs", "preprocess", "tokenizer", "kv_cache", "positions", "generation"):
        if key not in data:
            raise ManifestError(f"required field {key!r} is missing", where=where, fix=_FIX)
    for key, hint in _TOP_HINTS.items():
        if key in data and (problem := _type_problem(data[key], hint)) is not None:
            raise _field_error(key, problem, where)
    return {name: _check_fields(section, data[name], f"{name}.", where) for name, section in _SECTIONS.items()}


def _check_any_sections(data: dict[str, Any], where: str | Path) -> None:
    """The free-form sections' fields that the runtime reads directly."""
    generation = data["generation"]
    for key, hint in (("eos_token_ids", list[int]), ("pad_token_id", int)):
        if key not in generation:
            raise ManifestError(f"required field 'generation.{key}' is missing", where=where, fix=_FIX)
        if (problem := _type_problem(generation[key], hint)) is not None:
            raise _field_error(f"generation.{key}", problem, where)
    preprocess = data["preprocess"]
    vision_text = preprocess.get("vision_text")
    if vision_text is not None:
        if not isinstance(vision_text.get("tokenizer"), str):
            raise _field_error("preprocess.vision_text.tokenizer", "must be a string (a file in the bundle)", where)
        _check_rel_path(vision_text["tokenizer"], "preprocess.vision_text.tokenizer", where)
    params = preprocess.get("tiling_params")
    if params is not None and params.get("newline") is not None:
        if not isinstance(params["newline"], str):
            raise _field_error("preprocess.tiling_params.newline", "must be a string (a file in the bundle)", where)
        _check_rel_path(params["newline"], "preprocess.tiling_params.newline", where)


def _build_kv_cache(section: dict[str, Any], where: str | Path) -> KVCacheSpec:
    """The cache section, hybrid states checked field by field (their kinds, shapes and layers)."""
    states = section.get("states")
    built = None
    if states is not None:
        built = [
            StateSpec(**_check_fields(StateSpec, state, f"kv_cache.states[{i}].", where))
            for i, state in enumerate(states)
        ]
        for i, state in enumerate(built):
            if state.kind not in STATE_KINDS:
                raise _field_error(f"kv_cache.states[{i}].kind", f"must be one of {', '.join(STATE_KINDS)}", where)
            if state.dtype not in ("float32", "float16"):
                raise _field_error(f"kv_cache.states[{i}].dtype", "must be float32 or float16", where)
            if not state.shape or any(d < 1 for d in state.shape):
                raise _field_error(f"kv_cache.states[{i}].shape", "must be positive sizes", where)
    layers = section.get("layers")
    if layers is not None and len(layers) != section["num_layers"]:
        raise _field_error("kv_cache.layers", f"must name num_layers ({section['num_layers']}) layers", where)
    windows = section.get("windows")
    if windows is not None:
        sizes = {w for w in windows if w is not None}
        if len(windows) != section["num_layers"] or len(sizes) != 1 or min(sizes) < 2:
            raise _field_error(
                "kv_cache.windows", f"must give num_layers ({section['num_layers']}) entries: one window (>= 2) for "
                "the local layers, null for the global ones", where
            )  # fmt: skip
    return KVCacheSpec(**{**section, "states": built})


def _build_graph(g: Any, prefix: str, where: str | Path) -> GraphSpec:
    spec = dict(_check_fields(GraphSpec, g, prefix + ".", where))
    for io in ("inputs", "outputs"):
        specs = spec.get(io, [])
        spec[io] = [
            TensorSpec(**_check_fields(TensorSpec, t, f"{prefix}.{io}[{i}].", where)) for i, t in enumerate(specs)
        ]
    codes = spec.get("codes")
    if codes is not None:
        for key, kind in TABLE_CODE_FIELDS.items():
            if not isinstance(codes, dict) or not isinstance(codes.get(key, ...), kind):
                raise _field_error(f"{prefix}.codes.{key}", f"must be {getattr(kind, '__name__', 'a string or null')}",
                                   where)  # fmt: skip
        if codes["bits"] not in (4, 8) or spec.get("kind") != "table":
            raise _field_error(f"{prefix}.codes", "only tables are coded, with 4 or 8 bits", where)
        for key in ("scales", "zero_points"):
            if codes[key] is not None:
                _check_rel_path(codes[key], f"{prefix}.codes.{key}", where)
    return GraphSpec(**spec)


#: Element types of a graph's first input / output that the runtime feeds and reads.
GRAPH_IO_DTYPES = ("float32", "float16", "int64")
#: ``preprocess.resample`` values (PIL filters, as runtime/images/preprocess maps them).
RESAMPLE_FILTERS = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")
#: Graphs every bundle has (the runtime opens them by these names): the embedding is a ``table`` (a ``.npy``
#: array), the others ONNX graphs (kind ``onnx``, or a variant such as ``onnx-ort-gqa``).
REQUIRED_GRAPHS = ("vision", "embed", "decoder")


def _check_rel_path(rel: Any, name: str, where: str | Path) -> str:
    """A path inside the bundle, as the manifest must spell it: relative, '/'-separated, no '.', '..' or empty parts
    (so that one file has one spelling and none can name a file outside the bundle)."""
    if not isinstance(rel, str):
        raise _field_error(name, f"must be a string (a file in the bundle), got {_json_type(rel)}", where)
    parts = rel.split("/")
    bad = (
        not rel
        or "\\" in rel
        or "\0" in rel
        or rel.startswith("/")
        or (len(rel) > 1 and rel[1] == ":")  # a Windows drive
        or any(part in ("", ".", "..") for part in parts)
    )
    if bad:
        raise ManifestError(
            f"field {name!r} names {rel!r}, which is not a plain relative path inside the bundle (absolute paths, "
            "'..', '.', empty parts and backslashes are refused)",
            where=where,
            fix="use a bundle written by `edgelvm export`; a bundle may only name files inside its own directory",
        )
    return rel


#: ``Manifest.attention`` values this runtime implements.
ATTENTION_KINDS = ("causal", "prefix_lm", "image_bidirectional")


def _attention_kind(kind: Any, where: str | Path) -> str:
    if kind not in ATTENTION_KINDS:
        raise ManifestError(
            f"attention {kind!r} is not one this edgelvm implements ({', '.join(ATTENTION_KINDS)})",
            where=where,
            fix="upgrade edgelvm (`pip install -U edgelvm`), or re-export the bundle with this version",
        )
    return str(kind)


def _check_version(data: dict[str, Any], where: str | Path) -> None:
    version = data.get("format_version")
    if not isinstance(version, str) or not version.split(".")[0].isdigit():
        raise ManifestError(
            f"field 'format_version' is missing or malformed ({version!r})",
            where=where,
            fix=f"re-export the bundle; this edgelvm writes format_version {FORMAT_VERSION}",
        )
    major = int(version.split(".")[0])
    if major != SUPPORTED_MAJOR:
        newer = major > SUPPORTED_MAJOR
        raise ManifestError(
            f"format_version {version} is not supported (this edgelvm reads {SUPPORTED_MAJOR}.x)",
            where=where,
            fix="upgrade edgelvm (`pip install -U edgelvm`)"
            if newer
            else "re-export the bundle with this edgelvm version",
        )


# ---- file integrity ------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_bundle_files(bundle_dir: str | Path) -> dict[str, str]:
    """sha256 of every file in the bundle (recursively) except the manifest itself (and the staging owner note
    ``.edgelvm-partial.json`` that ``fsutil`` removes at the swap), keyed by relative posix path."""
    root = Path(bundle_dir)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.name not in (MANIFEST_NAME, ".edgelvm-partial.json")
        and "engines" not in p.relative_to(root).parts
    }


def bundle_references(manifest: Manifest) -> dict[str, str]:
    """Every file the runtime opens, as named by the manifest: ``{relative path: the field naming it}`` (external
    data files of ONNX graphs are found by :func:`onnx_external_data` and are not included)."""
    refs: dict[str, str] = {}
    for name, graph in manifest.graphs.items():
        refs.setdefault(graph.file, f"graphs.{name}.file")
        for key in ("scales", "zero_points"):
            if graph.codes and graph.codes.get(key):
                refs.setdefault(graph.codes[key], f"graphs.{name}.codes.{key}")
    refs.setdefault(manifest.tokenizer.file, "tokenizer.file")
    vision_text = manifest.preprocess.vision_text or {}
    if isinstance(vision_text.get("tokenizer"), str):
        refs.setdefault(vision_text["tokenizer"], "preprocess.vision_text.tokenizer")
    params = manifest.preprocess.tiling_params or {}
    if isinstance(params.get("newline"), str):
        refs.setdefault(params["newline"], "preprocess.tiling_params.newline")
    return refs


def verify_bundle_files(bundle_dir: str | Path, manifest: Manifest, *, check_hashes: bool = True) -> None:
    """The bundle's trust check, before the runtime opens anything:

    - every path the manifest names (``files`` keys, graphs, tokenizers, arrays, external data of ONNX graphs) is a
      plain relative path that resolves inside the bundle directory, symlinks included;
    - every file the runtime will open is listed in ``files`` (so removing an entry, or ``"files": {}``, does not
      turn verification off) and exists;
    - with ``check_hashes``, every listed file has its recorded sha256.

    Raises :class:`BundleError` naming the first file that fails. The hashes detect corruption and careless edits;
    they cannot detect a deliberate edit of the manifest itself (see ``Manifest.load(expected_sha256=...)``).
    """
    given = Path(bundle_dir)
    root = given.resolve()
    where = given / MANIFEST_NAME
    for rel in manifest.files:
        _check_rel_path(rel, f"files[{rel!r}]", where)
    for rel, name in bundle_references(manifest).items():
        _check_rel_path(rel, name, where)
        if rel not in manifest.files:
            raise BundleError(
                f"{name} names {rel!r}, which is not listed in {MANIFEST_NAME}'s 'files' (it would be loaded "
                "without its sha256 being checked)",
                where=given,
                fix="copy the complete bundle again or re-export it; do not edit edgelvm.json by hand",
            )
    for rel, expected in manifest.files.items():
        path = _resolve_inside(root, rel, given)
        if check_hashes and sha256_file(path) != expected:
            raise BundleError(
                f"file {rel!r} does not match its sha256 in {MANIFEST_NAME} (modified or corrupted)",
                where=root,
                fix="copy the bundle again or re-export it; do not edit bundle files in place",
            )
    for name, graph in manifest.graphs.items():
        if graph.kind == "table":
            continue
        for location in onnx_external_data(_resolve_inside(root, graph.file, given)):
            rel = posixpath.join(posixpath.dirname(graph.file), location)
            field_name = f"external data of graphs.{name} ({graph.file})"
            _check_rel_path(location, field_name, given)
            if rel not in manifest.files:
                raise BundleError(
                    f"{field_name} names {location!r}, which is not listed in {MANIFEST_NAME}'s 'files' (it would "
                    "be loaded without its sha256 being checked)",
                    where=given,
                    fix="copy the complete bundle again or re-export it",
                )


def _resolve_inside(root: Path, rel: str, given: Path) -> Path:
    """``root / rel`` with symlinks resolved; it must be a regular file inside ``root``."""
    path = root / rel
    if not path.is_file():
        raise BundleError(
            f"file {rel!r} listed in {MANIFEST_NAME} is missing",
            where=given,
            fix="copy the complete bundle directory again, or re-export it",
        )
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise BundleError(
            f"file {rel!r} is a symbolic link to {resolved}, outside the bundle",
            where=given,
            fix="copy the bundle with its files (e.g. `cp -rL`), not links to files elsewhere",
        )
    return resolved


# ---- ONNX external data, without the onnx package (the runtime does not depend on it) -------------------------------
# Field numbers from onnx.proto: which length-delimited fields of each message can lead to a TensorProto.
_PROTO_PATHS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},  # TensorProto.external_data: StringStringEntryProto {key = 1, value = 2}
    "entry": {},
}


def onnx_external_data(path: str | Path) -> set[str]:
    """The ``location`` of every external-data tensor in the ONNX model at ``path`` (as written: relative to the
    model's directory)."""
    return {location for location, _, _ in onnx_external_regions(path)}


def onnx_external_regions(path: str | Path) -> list[tuple[str, int, int]]:
    """``(location, offset, length)`` of every external-data tensor in the ONNX model at ``path`` (length -1: to the
    end of the file). Reads the protobuf wire format directly, skipping tensor payloads without copying them."""
    import mmap

    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                found: list[tuple[str, int, int]] = []
                _scan(buf, 0, size, "model", found, 0)
                return found
            except (ValueError, IndexError, UnicodeDecodeError, RecursionError):
                raise BundleError(
                    "not a readable ONNX file (its protobuf structure is malformed)",
                    where=path,
                    fix="copy the bundle again or re-export it",
                ) from None
            finally:
                buf.release()


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _scan(
    buf: memoryview,
    pos: int,
    end: int,
    message: str,
    found: list[tuple[str, int, int]],
    depth: int,
    fields: dict[str, str] | None = None,
) -> None:
    """Walk one message; a tensor's external-data entries go to its own ``fields``, and a tensor with a location is
    appended to ``found``."""
    if depth > 64:
        raise ValueError("nested too deeply")
    paths = _PROTO_PATHS[message]
    entry: dict[int, str] = {}
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            start, pos = pos, pos + length
            if pos > end:
                raise ValueError("field past the end of its message")
            if message == "entry" and number in (1, 2):
                entry[number] = bytes(buf[start:pos]).decode("utf-8")
            elif number in paths and paths[number] == "tensor":
                tensor: dict[str, str] = {}
                _scan(buf, start, pos, "tensor", found, depth + 1, tensor)
                if "location" in tensor:
                    found.append((tensor["location"], int(tensor.get("offset") or 0), int(tensor.get("length") or -1)))
            elif number in paths:
                _scan(buf, start, pos, paths[number], found, depth + 1, fields)
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field past the end of its message")
    if message == "entry" and fields is not None and 1 in entry:
        fields[entry[1]] = entry.get(2, "")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file so that readers see either the old or the new content, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give what open(path, 'w') would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

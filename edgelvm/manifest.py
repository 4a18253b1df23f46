"""The bundle contract: ``edgelvm.json``, its schema, validation and file integrity.

Why a module of its own: both sides read it — export writes it (torch side) and the runtime loads it (torch-free) —
so it must depend on nothing but the standard library. Everything the runtime needs to know about a model family is
here as plain data (DESIGN.md §4); the runtime never imports an adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelvm.errors import BundleError, ManifestError

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
    #: Largest absolute / relative error against PyTorch measured at export time, for provenance.
    parity: dict[str, float] = field(default_factory=dict)


@dataclass
class PreprocessSpec:
    """How an image becomes ``pixel_values``; mirrors the HF image processor's PIL backend (see runtime/preprocess)."""

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
    #: "none", or the name of a tiling rule the runtime implements (``runtime/preprocess.TILINGS``; one image
    #: becomes several views and its token count depends on its size); the rule's parameters are ``tiling_params``.
    tiling: str = "none"
    #: Added after format 1.0 and written only when set, so that untiled bundles still load in older runtimes
    #: (which refuse a tiled one: they do not know this field).
    tiling_params: dict[str, Any] | None = None
    #: Where an image's tokens go in the prompt (``runtime/preprocess.PLACEMENTS``): "placeholder" — each image
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
    #: input name], "mask_rule": a rule of runtime/cross_attention.py, "reset_token_ids": [...], "feature_dim": D}``.
    #: The decoder then takes ``states [B, images, tokens_per_image, D]`` and ``mask [B, seq, images]`` (which
    #: image each position attends to). Written only when set.
    cross_attention: dict[str, Any] | None = None


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


@dataclass
class KVCacheSpec:
    """Per-layer key/value tensors ``[batch, kv_heads, seq, head_dim]``, named by the two format strings."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    max_length: int
    layout: str = "per_layer_bhsd"
    past_name: str = "past_key_values.{layer}.{kind}"
    present_name: str = "present.{layer}.{kind}"


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
    attention: str = "causal"
    format_version: str = FORMAT_VERSION
    edgelvm_version: str = ""

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
        if data["preprocess"].get("vision_text") is None:
            data["preprocess"].pop("vision_text", None)
        if data["preprocess"].get("cross_attention") is None:
            data["preprocess"].pop("cross_attention", None)
        head = {key: data.pop(key) for key in ("format_version", "edgelvm_version", "family", "created_from")}
        return {**head, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path = MANIFEST_NAME) -> Manifest:
        _check_version(data, where)
        try:
            graphs = {
                name: GraphSpec(
                    **{
                        **g,
                        "inputs": [TensorSpec(**t) for t in g.get("inputs", [])],
                        "outputs": [TensorSpec(**t) for t in g.get("outputs", [])],
                    }
                )
                for name, g in data["graphs"].items()
            }
            return cls(
                family=data["family"],
                graphs=graphs,
                preprocess=PreprocessSpec(**data["preprocess"]),
                tokenizer=TokenizerSpec(**data["tokenizer"]),
                kv_cache=KVCacheSpec(**data["kv_cache"]),
                positions=data["positions"],
                generation=data["generation"],
                created_from=data.get("created_from", {}),
                files=data.get("files", {}),
                target=data.get("target"),
                attention=_attention_kind(data.get("attention", "causal"), where),
                format_version=data["format_version"],
                edgelvm_version=data.get("edgelvm_version", ""),
            )
        except KeyError as err:
            raise ManifestError(
                f"required field {err.args[0]!r} is missing",
                where=where,
                fix="re-export the bundle with `edgelvm export`; do not edit edgelvm.json by hand",
            ) from None
        except TypeError as err:
            raise ManifestError(
                f"a section has unexpected or missing fields ({err})",
                where=where,
                fix="re-export the bundle with this edgelvm version (`edgelvm export`)",
            ) from None

    @classmethod
    def load(cls, bundle_dir: str | Path) -> Manifest:
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
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(f"not valid JSON ({err})", where=path, fix="re-export the bundle") from None
        if not isinstance(data, dict):
            raise ManifestError("top level must be a JSON object", where=path, fix="re-export the bundle")
        return cls.from_dict(data, where=path)


#: ``Manifest.attention`` values this runtime implements.
ATTENTION_KINDS = ("causal", "prefix_lm")


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
    """sha256 of every file in the bundle (recursively) except the manifest itself, keyed by relative posix path."""
    root = Path(bundle_dir)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and "engines" not in p.relative_to(root).parts
    }


def verify_bundle_files(bundle_dir: str | Path, manifest: Manifest, *, check_hashes: bool = True) -> None:
    """Every listed file exists and (optionally) has its recorded sha256; raise naming the first that does not."""
    root = Path(bundle_dir)
    for rel, expected in manifest.files.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(
                f"file {rel!r} listed in {MANIFEST_NAME} is missing",
                where=root,
                fix="copy the complete bundle directory again, or re-export it",
            )
        if check_hashes and sha256_file(path) != expected:
            raise BundleError(
                f"file {rel!r} does not match its sha256 in {MANIFEST_NAME} (modified or corrupted)",
                where=root,
                fix="copy the bundle again or re-export it; do not edit bundle files in place",
            )


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file so that readers see either the old or the new content, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; bundles are shared read-only artifacts
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""``export(model, out_dir, ExportConfig(...)) -> ExportReport``: checkpoint → self-describing bundle.

The bundle is assembled in a temporary sibling directory and renamed into place only when every graph has passed
its parity check and the manifest (with the sha256 of every file) is written: a failed export leaves no
half-written bundle and, with ``force``, the previous bundle stays until the new one is complete.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgelvm import __version__
from edgelvm.devices.fit import plan_for_target
from edgelvm.devices.profiles import load_profile
from edgelvm.errors import ConfigError, ExportError, UnsupportedModelError
from edgelvm.export.external_data import ContentIndex
from edgelvm.fsutil import make_staging, prepare_output, swap_into_place
from edgelvm.manifest import MANIFEST_NAME, Manifest, hash_bundle_files, write_text_atomic
from edgelvm.models import adapter_for_model_type, load_model, read_model_type
from edgelvm.models.registry import read_config_json
from edgelvm.models.token_reduction import check_family, reduce_image_tokens
from edgelvm.plan import footprint_from_config, footprint_of_adapter, kv_dtype_for, quantized_precisions

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16"]


@dataclass
class ExportConfig:
    """What to export and how.

    ``max_length``: context the runtime preallocates its KV cache for (prompt incl. image tokens + new tokens);
    default: the model's ``max_position_embeddings`` capped at 4096.
    """

    dtype: Precision = "fp32"
    max_length: int | None = None
    force: bool = False
    #: Device profile name (``edgelvm devices``): checks precision support and memory fit before exporting, and
    #: writes the plan (limits, budget, roofline-predicted tokens/s) into the manifest's ``target`` section.
    target: str | None = None
    profiles_dir: str | Path | None = None
    #: ``auto``: the portable traced decoder plus, where the text model allows (fp32, Llama family), the ONNX
    #: Runtime–fused one (in-place KV cache, GroupQueryAttention) that the ORT backend prefers; ``portable``: only
    #: the traced one (smaller bundle; what TensorRT builds from); ``fused``: require the fused one too.
    decoder: Literal["auto", "portable", "fused"] = "auto"
    #: MatMulNBits ``accuracy_level`` for an INT4 checkpoint's fused decoder: 0 = fp32 compute (default), 4 = int8
    #: activations (faster on CPU; can flip top tokens — onnxruntime #29849, measured in benchmarks/quant_shapes.py).
    int4_accuracy_level: int = 0
    #: Decoders with more weight bytes than this are parity-checked on their first layers (a part of the shipped
    #: graph: ONNX Runtime maps only those layers' bytes), the rest whole; the manifest's ``parity.scope`` says
    #: which. None: ``onnx_graphs.PARITY_WHOLE_BYTES`` (1 GiB).
    parity_whole_bytes: int | None = None
    #: Image tokens the vision graph keeps per image (``--image-tokens``): an int is a count, a float in (0, 1] a
    #: fraction of the tower's tokens; chosen by the tower's own attention (VisionZip's dominant tokens,
    #: ``models/token_reduction.py``), in raster order. None (default): every token, today's graph. Families whose
    #: image tokens cannot be dropped are refused (``UnsupportedModelError``).
    image_tokens: int | float | None = None


@dataclass
class ExportReport:
    bundle_dir: Path
    manifest: Manifest
    seconds: float
    sizes: dict[str, int] = field(default_factory=dict)

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for name, graph in self.manifest.graphs.items():
            parity = graph.parity
            err = f"{parity['max_rel']:.1e} rel / {parity['max_abs']:.1e} abs" if parity else "exact copy"
            if parity.get("scope"):
                err += f" ({parity['scope']})"
            rows.append((name, graph.file, f"{self.sizes.get(graph.file, 0) / 1e6:.1f} MB", err))
        return rows


def _prepare_output(out_dir: Path, force: bool, model: Any = None) -> Path:
    sources = [model if isinstance(model, (str, Path)) else None, getattr(model, "source", None)]
    return prepare_output(out_dir, force=force, inputs=sources, option="-o", error=ExportError)


def export(model: Any, out_dir: str | Path, config: ExportConfig | None = None) -> ExportReport:
    """Export ``model`` (a checkpoint path / hub id, or a loaded :class:`~edgelvm.models.base.VLMAdapter`)."""
    from edgelvm.export.onnx_graphs import export_decoder, export_embedding_table, export_vision
    from edgelvm.export.quantized import quantization_recipe, quantized_graph_rewrites, quantized_table

    config = config or ExportConfig()
    if config.dtype not in ("fp32", "fp16"):
        raise ConfigError(f"unsupported dtype {config.dtype!r}", where="--dtype", fix="use fp32 or fp16")
    if config.int4_accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(
            f"int4 accuracy level {config.int4_accuracy_level} is not one of 0-4",
            where="--int4-accuracy-level",
            fix="use 0 (fp32 compute) or 4 (int8 activations)",
        )
    if config.decoder not in ("auto", "portable", "fused"):
        raise ConfigError(
            f"unsupported decoder {config.decoder!r}", where="--decoder", fix="use auto, portable or fused"
        )
    out_dir = Path(out_dir)
    dest = _prepare_output(out_dir, config.force, model)  # out_dir with symlinks resolved: what is replaced
    started = time.perf_counter()

    if config.target and isinstance(model, (str, Path)):  # refuse from the config, before loading any weights
        _plan_target_from_config(model, config)
    if config.image_tokens is not None and isinstance(model, (str, Path)) and Path(model).is_dir():
        check_family(adapter_for_model_type(read_model_type(model), where=model).family)  # before loading weights
    adapter = (
        load_model(model, dtype="float16" if config.dtype == "fp16" else "float32")
        if isinstance(model, (str, Path))
        else model
    )
    adapter, reduction = reduce_image_tokens(adapter, config.image_tokens)  # (adapter, None) when off
    max_length = config.max_length or min(adapter.max_positions(), 4096)
    if max_length < 2 or max_length > adapter.max_positions():
        raise ConfigError(
            f"max_length {max_length} is outside [2, {adapter.max_positions()}] (the model's max_position_embeddings)",
            where="--max-length",
            fix=f"pick a value up to {adapter.max_positions()}",
        )
    kv_dtype = "float16" if config.dtype == "fp16" else "float32"
    kv = adapter.kv_cache_spec(max_length=max_length, dtype=kv_dtype)
    target = _plan_target(adapter, kv, config) if config.target else None  # fail fast: before minutes of tracing
    rewrites = quantized_graph_rewrites(adapter)  # {} for a float checkpoint; a missing sidecar fails here
    quantized = quantization_recipe(adapter)

    staging = make_staging(dest)  # also removes what killed runs to this output left behind
    try:
        graphs = {}
        # Where each large tensor already lies in the bundle: a tied LM head points at the embedding table, the
        # fused decoder at the portable decoder's matrices (export/external_data.py) — nothing is stored twice.
        index = ContentIndex()
        log.info("exporting vision encoder")
        graphs["vision"] = export_vision(adapter, staging / "vision.onnx", config.dtype, rewrites.get("vision"))
        log.info("writing token embedding table")
        graphs["embed"] = export_embedding_table(
            adapter, staging / "embed.npy", config.dtype, index, quantized_table(adapter)
        )
        log.info("exporting decoder")
        graphs["decoder"] = export_decoder(
            adapter,
            staging / "decoder.onnx",
            config.dtype,
            kv,
            rewrites.get("decoder"),
            index,
            config.parity_whole_bytes,
        )
        fused = _export_fused(adapter, staging / "decoder_ort.onnx", kv, config, index)
        if fused is not None:
            graphs["decoder_ort"] = fused
        adapter.processor.tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
        for name, array in adapter.bundle_arrays().items():  # read by the runtime, named in the manifest
            np.save(staging / name, array)
        for name, tokenizer in adapter.bundle_tokenizers().items():  # likewise (e.g. a Q-Former's tokenizer)
            tokenizer.backend_tokenizer.save(str(staging / name))

        manifest = Manifest(
            family=adapter.family,
            graphs=graphs,
            preprocess=adapter.preprocess_spec(),
            tokenizer=adapter.tokenizer_spec("tokenizer.json"),
            kv_cache=kv,
            positions=adapter.positions_spec(),
            attention=adapter.attention_kind(),
            generation=adapter.generation_spec(),
            created_from={
                "source": str(adapter.source),
                "model_type": adapter.config.model_type,
                "text_model_type": adapter.text_config.model_type,
                "vision_model_type": getattr(getattr(adapter.config, "vision_config", None), "model_type", None),
                "recipe": [
                    *([{**quantized, "graphs": {k: r.summary for k, r in rewrites.items()}}] if quantized else []),
                    {
                        "stage": "export",
                        "dtype": config.dtype,
                        "max_length": max_length,
                        "opset": 20,
                        **({"image_tokens": reduction.tokens_per_image} if reduction else {}),
                    },
                ],
                "calibration_sha256": quantized.get("calibration_sha256") if quantized else None,
                "toolchain": toolchain_versions(),
            },
            edgelvm_version=__version__,
            target=target.to_manifest() if target is not None else None,
            image_token_reduction=reduction.to_manifest() if reduction is not None else None,
        )
        manifest.files = hash_bundle_files(staging)
        write_text_atomic(staging / MANIFEST_NAME, manifest.to_json())
        sizes = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        swap_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(bundle_dir=out_dir, manifest=manifest, seconds=time.perf_counter() - started, sizes=sizes)


def toolchain_versions() -> dict[str, str]:
    """The versions that traced the graphs, for the manifest: a processor's prompt or a graph's ops can change with
    a transformers or torch release, and a bundle should say what made it."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _export_fused(adapter: Any, path: Path, kv: Any, config: ExportConfig, index: ContentIndex) -> Any:
    from edgelvm.export.onnx_graphs import export_fused_decoder

    if config.decoder == "portable":
        return None
    try:
        if config.dtype != "fp32":
            raise UnsupportedModelError(
                f"dtype {config.dtype} (the fused decoder is fp32 for now)",
                fix="export with --dtype fp32 or --decoder portable",
            )
        log.info("building the fused ONNX Runtime decoder")
        return export_fused_decoder(adapter, path, kv, config.int4_accuracy_level, index, config.parity_whole_bytes)
    except UnsupportedModelError as err:
        if config.decoder == "fused":
            raise
        log.info("no fused decoder: %s", err.problem)
        return None
    except ExportError as err:  # it failed its parity check: a bug, but the portable bundle is still complete
        if config.decoder == "fused":
            raise
        log.warning("skipping the fused decoder, it failed its check against PyTorch: %s", err.problem)
        path.unlink(missing_ok=True)
        return None


def _plan_target(adapter: Any, kv: Any, config: ExportConfig) -> Any:
    """Fit check for ``config.target`` with the byte counts of what this export will write: the loaded graphs'
    parameters (the embedding table excluded: the runtime memory-maps it) in ``config.dtype``."""
    footprint = footprint_of_adapter(adapter)
    layers, head = quantized_precisions(adapter.config, config.dtype)
    arguments = footprint.fit_arguments(precision=layers, vision_precision=config.dtype, max_length=kv.max_length,
                                        kv_dtype=kv.dtype, head_precision=head)  # fmt: skip
    plan = plan_for_target(load_profile(config.target, config.profiles_dir), **arguments)
    log.info("target %s:\n%s", config.target, plan.summary())
    return plan


def _plan_target_from_config(model: str | Path, config: ExportConfig) -> Any:
    """The same fit check from the checkpoint's config alone (``edgelvm plan``'s numbers), so that a model that
    cannot fit is refused in about a second instead of after loading its weights."""
    profile = load_profile(config.target, config.profiles_dir)  # an unknown name fails before the config is read
    footprint = footprint_from_config(model)
    if footprint.notes:  # the weights disagree with the config (e.g. pruned): only the loaded model's count holds
        log.info("fit check from the config skipped: %s", "; ".join(footprint.notes))
        return None
    max_length = footprint.check_max_length(config.max_length or footprint.default_max_length())
    layers, head = quantized_precisions(read_config_json(Path(model)) if Path(model).is_dir() else {}, config.dtype)
    arguments = footprint.fit_arguments(precision=layers, vision_precision=config.dtype, max_length=max_length,
                                        kv_dtype=kv_dtype_for(config.dtype), head_precision=head)  # fmt: skip
    return plan_for_target(profile, **arguments)

"""``quantize(model, calib_data, QuantConfig) -> QuantReport``: INT4 weight-only LLM, INT8 W8A8 vision encoder.

The quantized checkpoint is a normal Hugging Face checkpoint whose quantized weights are the *dequantized* values
(and, after AWQ, whose norms carry the folded scales), so PyTorch computes the quantized model's weights exactly.
Next to it:
- ``int4.safetensors``: the language model's block-wise INT4 codes and scales (:class:`~edgelvm.quantize.int4.
  Int4Weight`), by ``layers.{i}.<path>``;
- ``int8.safetensors``: the vision encoder's INT8 codes, per-channel weight scales and per-tensor input scales
  (:class:`~edgelvm.quantize.int8.Int8Linear`), by their path in the export-facing vision module;
- ``config.edgelvm_quantization``: what was done (methods, group size, observer, calibration hash);
- ``quant_report.json``: per-layer weight and output error, bytes before / after, what stayed in float and why.

``edgelvm export`` turns that one representation into two writers' graphs: ``MatMulNBits`` in the ONNX Runtime
decoder and block-wise ``DequantizeLinear`` (INT4) in the portable one (what TensorRT builds); explicit QDQ in the
vision graph (ONNX Runtime runs it, TensorRT's INT8 path consumes it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import ConfigError

log = logging.getLogger(__name__)

RECORD = "edgelvm_quantization"
SIDECAR = "int4.safetensors"
VISION_SIDECAR = "int8.safetensors"
LLM_METHODS = ("none", "rtn", "awq", "gptq", "smoothquant")
LLM_INT8_SIDECAR = "int8_llm.safetensors"
VISION_METHODS = ("none", "int8")
SWEEP_IMAGES = 64  # images the observer sweep scores each candidate on


@dataclass
class QuantConfig:
    out: str | Path = "quantized"
    #: Language model, INT4 weight-only: ``rtn`` (no data), ``awq`` (activation-aware scales + clipping), ``gptq``;
    #: or ``smoothquant``: W8A8 (smoothed activations, per-channel weights; portable decoder only).
    llm: str = "awq"
    group_size: int = 128
    symmetric: bool = True
    #: Vision encoder + projector: ``int8`` (W8A8) or ``none``.
    vision: str = "int8"
    #: Activation observer for the vision INT8 ranges; ``auto`` tries every one and keeps the best features.
    calibrator: str = "auto"
    #: With ``calibrator="auto"``: score the observers by the task — teacher-forced answer-token accuracy on these
    #: records (jsonl dataset or list; up to ``calib_limit``) — instead of feature cosine on the calibration images.
    eval_data: Any = None
    calib_limit: int = 256
    batch_size: int = 16
    awq_clip: bool = True
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    smoothquant_alpha: float = 0.5
    #: Memory for the language model's Gram matrices (float64 ``K×K`` per layer input). When all layers' do not fit,
    #: the layers are calibrated and quantized in consecutive groups, one calibration pass each — later groups then
    #: see the outputs of already-quantized earlier layers (as GPTQ's sequential variant does). A 7B Llama needs
    #: ~1.4 GB per layer: the default 4 GB makes 2-layer passes.
    stats_memory_gb: float = 4.0
    seed: int = 0
    force: bool = False
    progress: bool = False

    def validate(self) -> None:
        from edgelvm.calibration.observers import check_observer
        from edgelvm.quantize.int4 import check_block_size

        if self.llm not in LLM_METHODS:
            raise ConfigError(f"unknown llm method {self.llm!r}", where="--llm", fix=f"use {', '.join(LLM_METHODS)}")
        if self.vision not in VISION_METHODS:
            raise ConfigError(
                f"unknown vision method {self.vision!r}", where="--vision", fix=f"use {', '.join(VISION_METHODS)}"
            )
        if self.llm == "none" and self.vision == "none":
            raise ConfigError("nothing to quantize", where="--llm / --vision", fix="choose --llm or --vision")
        check_block_size(self.group_size)
        check_observer(self.calibrator)
        if not 0.0 < self.smoothquant_alpha < 1.0:
            raise ConfigError(f"smoothquant_alpha {self.smoothquant_alpha} not in (0, 1)", where="--smoothquant-alpha",
                              fix="use e.g. 0.5 (the paper's default for most models)")  # fmt: skip
        if self.stats_memory_gb <= 0:
            raise ConfigError(f"stats_memory_gb {self.stats_memory_gb} <= 0", where="--stats-memory-gb",
                              fix="give the memory (GB) the Gram matrices may take, e.g. 4")  # fmt: skip
        if not 0.0 < self.gptq_damp < 1.0:
            raise ConfigError(f"gptq_damp {self.gptq_damp} not in (0, 1)", where="--gptq-damp", fix="use e.g. 0.01")

    @property
    def needs_calibration(self) -> bool:
        return self.llm in ("awq", "gptq", "smoothquant") or self.vision == "int8"


@dataclass
class QuantReport:
    out: str
    method: str  # the LLM method (kept for readers of the first format)
    group_size: int
    vision: str = "none"
    calibrator: str | None = None
    observer_scores: dict[str, float] = field(default_factory=dict)
    observer_metric: str | None = None
    calibration_passes: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    #: name, side, bits, K, N, relative weight error, relative output error on the calibration tokens (when known)
    layers: list[dict[str, Any]] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = [row for row in self.layers if row["side"] == "text"]
        vision = [row for row in self.layers if row["side"] == "vision"]
        lines = [
            f"weights {self.weight_bytes_before / 1e6:.2f} MB -> {self.weight_bytes_after / 1e6:.2f} MB "
            f"({len(text)} LLM layers {self.method} INT4 g{self.group_size}, {len(vision)} vision layers {self.vision})"
        ]
        for rows, label in ((text, "LLM"), (vision, "vision")):
            errs = [r["output_error"] for r in rows if r.get("output_error") is not None]
            if errs:
                lines.append(f"{label} output error (calibration): mean {np.mean(errs):.4f}, max {max(errs):.4f}")
        if self.calibrator:
            lines.append(f"vision observer: {self.calibrator} (by {self.observer_metric}): " + ", ".join(
                f"{k} {v:.5f}" for k, v in self.observer_scores.items()))  # fmt: skip
        return "\n".join(lines)


def text_linears(adapter: Any) -> dict[str, Any]:
    """``layers.{i}.<path>`` -> Linear, for every linear layer inside the language model's decoder layers."""
    import torch

    out = {}
    for i, layer in enumerate(adapter.layer_stacks()["text"]):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"layers.{i}.{name}"] = module
    return out


def quantize(model: str | Path | Any, calib_data: Any = None, config: QuantConfig | None = None) -> QuantReport:
    """Quantize ``model`` (checkpoint path or loaded adapter) with calibration records ``calib_data`` (a jsonl
    dataset, a list of records, or ``"shapes"``; not needed for ``llm="rtn", vision="none"``)."""
    from edgelvm.calibration.dataset import load_calibration_set
    from edgelvm.models import load_model

    started = time.perf_counter()
    cfg = config or QuantConfig()
    cfg.validate()
    out = Path(cfg.out)
    from edgelvm.fsutil import prepare_output

    sources = [model if isinstance(model, (str, Path)) else None, getattr(model, "source", None)]
    if isinstance(calib_data, (str, Path)):
        sources.append(calib_data)
    out = prepare_output(out, force=cfg.force, inputs=sources)
    calib = None
    if cfg.needs_calibration and calib_data is None:
        raise ConfigError(
            f"--llm {cfg.llm} / --vision {cfg.vision} need calibration data",
            where="--calib",
            fix="pass --calib DATA (a jsonl dataset, or 'shapes'), or use --llm rtn --vision none",
        )
    if calib_data is not None:  # RTN needs none, but with it the report has each layer's output error
        calib = load_calibration_set(calib_data, cfg.calib_limit, cfg.seed)  # fails on an empty set, before loading
    adapter = model if hasattr(model, "processor") else load_model(str(model))
    adapter.check_stage("quantize", cfg, calib_data)  # a family that cannot be quantized so says it before any work
    if getattr(adapter.config, RECORD, None):
        raise ConfigError("the checkpoint is already quantized", where=adapter.source or None,
                          fix="quantize the float checkpoint it came from")  # fmt: skip

    report = QuantReport(out=str(out), method=cfg.llm, group_size=cfg.group_size, vision=cfg.vision)
    report.kept_float = ["token embedding (a memory-mapped table)", "lm_head (logit precision)"]
    record: dict[str, Any] = {}
    int4: dict[str, Any] = {}
    int8: dict[str, Any] = {}
    text = text_linears(adapter) if cfg.llm != "none" else {}
    vision = _vision_modules(adapter) if cfg.vision == "int8" else {}
    vision_stats = None
    sweep_inputs = None
    if calib is not None:
        report.calibration = calib.describe()
        if vision:
            sweep_inputs = _sweep_inputs(adapter, calib, cfg.batch_size)  # float references, before any change
    llm_int8: dict[str, Any] = {}
    passes = _layer_passes(text, cfg.stats_memory_gb) if calib is not None else [text]
    for index, chunk in enumerate(passes):
        stats = None
        if calib is not None:  # the vision statistics ride along with the first pass (the float model's)
            stats = _calibrate(adapter, calib, chunk, vision if index == 0 else {}, cfg, index, len(passes))
            report.calibration_passes += 1
            if index == 0:
                vision_stats = stats
        if chunk and cfg.llm == "smoothquant":
            from edgelvm.quantize.smoothquant import smooth_and_quantize

            llm_int8.update(smooth_and_quantize(adapter, chunk, stats, cfg.smoothquant_alpha, report))
        elif chunk:
            from edgelvm.quantize.llm_int4 import quantize_llm

            int4.update(quantize_llm(adapter, chunk, stats, cfg, report))
        if stats is not None:
            stats.grams.clear()  # free this pass's Gram matrices (the vision histograms stay)
    if text and cfg.llm == "smoothquant":
        record["llm"] = {"method": "smoothquant", "bits": 8, "alpha": cfg.smoothquant_alpha, "file": LLM_INT8_SIDECAR}
    elif text:
        record["llm"] = {"method": cfg.llm, "bits": 4, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                         "file": SIDECAR}  # fmt: skip
    else:
        report.kept_float.append("language model (--llm none)")
    if vision:
        int8 = _quantize_vision(adapter, vision, vision_stats, sweep_inputs, cfg, report)
        record["vision"] = {"method": "int8", "calibrator": report.calibrator, "file": VISION_SIDECAR}
    else:
        report.kept_float.append("vision encoder and projector (--vision none)")
    if calib is not None:
        record["calibration_sha256"] = calib.sha256
    setattr(adapter.config, RECORD, record)
    report.seconds = round(time.perf_counter() - started, 2)
    _write(adapter, out, {SIDECAR: int4_tensors(int4), VISION_SIDECAR: int8_tensors(int8),
                          LLM_INT8_SIDECAR: int8_tensors(llm_int8)}, report)  # fmt: skip
    return report


def _layer_passes(text: dict[str, Any], memory_gb: float) -> list[dict[str, Any]]:
    """The language model's linears in consecutive groups of whole decoder layers whose Gram matrices (float64,
    counted per linear: an over-estimate where q/k/v share one) fit ``memory_gb``; at least one layer per group."""
    by_layer: dict[str, dict[str, Any]] = {}
    for name, module in text.items():
        by_layer.setdefault(".".join(name.split(".")[:2]), {})[name] = module  # "layers.{i}"
    budget = memory_gb * 1e9
    passes: list[dict[str, Any]] = [{}]
    used = 0.0
    for layer in by_layer.values():
        need = sum(8.0 * m.in_features**2 for m in layer.values())
        if passes[-1] and used + need > budget:
            passes.append({})
            used = 0.0
        passes[-1].update(layer)
        used += need
    return passes


def _calibrate(adapter: Any, calib: Any, text: dict, vision: dict, cfg: QuantConfig, index: int, total: int) -> Any:
    from edgelvm.calibration.stats import collect_stats

    label = "calibration" if total == 1 else f"calibration pass {index + 1}/{total}"
    return _with_progress(cfg, len(calib), label, lambda tick: collect_stats(
        adapter, calib, {**text, **vision}, gram=set(text), text=set(text), batch_size=cfg.batch_size, progress=tick,
    ))  # fmt: skip


def _vision_modules(adapter: Any) -> dict[str, Any]:
    from edgelvm.quantize.vision_int8 import vision_linears

    return {f"vision:{name}": m for name, m in vision_linears(adapter).items()}


def _sweep_inputs(adapter: Any, calib: Any, batch_size: int) -> tuple[list[Any], list[Any]]:
    """About ``SWEEP_IMAGES`` calibration images as the vision encoder's keyword inputs, and its float outputs."""
    import torch

    from edgelvm.calibration.dataset import iter_batches

    encoder = adapter.vision_encoder()
    calls, refs, n = [], [], 0
    with torch.no_grad():
        for inputs, _rows in iter_batches(adapter, calib, batch_size):
            if n >= SWEEP_IMAGES:
                break
            for call in adapter.vision_inputs(inputs):
                calls.append(call)
                refs.append(encoder(**call).float())
                n += next(iter(call.values())).shape[0]
    return calls, refs


def _quantize_vision(
    adapter: Any, vision: dict[str, Any], stats: Any, sweep_inputs: Any, cfg: QuantConfig, report: QuantReport
) -> dict[str, Any]:
    from edgelvm.calibration.observers import OBSERVERS
    from edgelvm.quantize import vision_int8 as v8

    if not sweep_inputs or not sweep_inputs[0]:
        from edgelvm.errors import DatasetError

        raise DatasetError(
            "the calibration set has no images, so the vision encoder cannot be calibrated",
            where=report.calibration.get("source"),
            fix="use records with images, or --vision none",
        )
    modules = {name.split(":", 1)[1]: m for name, m in vision.items()}
    originals = {name: m.weight.detach().float().clone() for name, m in modules.items()}
    weights = v8.quantize_weights(modules)
    stats_by_name = stats.with_prefix("vision:")
    candidates = OBSERVERS if cfg.calibrator == "auto" else (cfg.calibrator,)
    if cfg.eval_data is not None and len(candidates) > 1:
        from edgelvm.calibration.dataset import load_calibration_set

        eval_set = load_calibration_set(cfg.eval_data, cfg.calib_limit, cfg.seed)
        sweep = v8.sweep_observers_on_answers(adapter, modules, stats_by_name, eval_set, cfg.batch_size, candidates)
    else:
        sweep = v8.sweep_observers(adapter, modules, stats_by_name, *sweep_inputs, candidates=candidates)
    report.calibrator, report.observer_scores, report.observer_metric = sweep.chosen, sweep.scores, sweep.metric
    scales = v8.input_scales_for(stats_by_name, list(modules), sweep.chosen)
    for name, linear in modules.items():
        w = originals[name]
        deq = linear.weight.detach().float()
        report.layers.append({
            "name": name, "side": "vision", "bits": 8, "K": int(w.shape[1]), "N": int(w.shape[0]),
            "weight_error": round(float((deq - w).norm() / (w.norm() + 1e-12)), 6),
            "output_error": None, "input_scale": scales[name],
        })  # fmt: skip
        report.weight_bytes_before += w.numel() * 4
        report.weight_bytes_after += w.numel() + w.shape[0] * 4
    report.kept_float.extend(f"vision {what}: {why}" for what, why in v8.KEPT_FLOAT.items())
    return v8.records(weights, scales)


def _with_progress(cfg: QuantConfig, total: int, label: str, work: Any) -> Any:
    if not cfg.progress:
        return work(None)
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=total)
        return work(lambda n: progress.advance(task, n))


def _write(adapter: Any, out: Path, sidecars: dict[str, dict[str, np.ndarray]], report: QuantReport) -> None:
    from safetensors.numpy import save_file

    from edgelvm.fsutil import write_dir_atomically
    from edgelvm.prune.surgery import save_checkpoint_files

    def write(stage: Path) -> None:
        save_checkpoint_files(adapter.model, adapter.processor, stage, getattr(adapter, "source", None))
        for name, tensors in sidecars.items():
            if tensors:
                save_file(tensors, str(stage / name))
        (stage / "quant_report.json").write_text(json.dumps(report.to_dict(), indent=2))

    write_dir_atomically(out, write, stage="quantize")


def int4_tensors(weights: dict[str, Any]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name, q in weights.items():
        tensors[f"{name}.packed"] = q.packed
        tensors[f"{name}.scales"] = q.scales
        if q.zero_points is not None:
            tensors[f"{name}.zero_points"] = q.zero_points
        tensors[f"{name}.shape"] = np.array([q.k, q.n, q.block_size], dtype=np.int64)
    return tensors


def int8_tensors(layers: dict[str, Any]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name, layer in layers.items():
        tensors[f"{name}.codes"] = np.ascontiguousarray(layer.codes)
        tensors[f"{name}.weight_scales"] = np.ascontiguousarray(layer.weight_scales)
        tensors[f"{name}.input_scale"] = np.array([layer.input_scale], np.float32)
    return tensors


def load_int4(source: str | Path) -> dict[str, Any]:
    """The INT4 weights of a quantized checkpoint, by ``layers.{i}.<path>`` name."""
    from safetensors.numpy import load_file

    from edgelvm.quantize.int4 import Int4Weight

    tensors = load_file(str(Path(source) / SIDECAR))
    out = {}
    for key in tensors:
        if key.endswith(".shape"):
            name = key[: -len(".shape")]
            k, n, block = (int(x) for x in tensors[key])
            zp = tensors.get(f"{name}.zero_points")
            out[name] = Int4Weight(tensors[f"{name}.packed"], tensors[f"{name}.scales"], zp, k, n, block)
    return out


def fused_decoder_int4(config: Any, source: str | Path | None) -> dict[str, Any] | None:
    """The INT4 weights the fused decoder writes as MatMulNBits (None for a float language model); a W8A8 language
    model has no fused form (UnsupportedModelError: export then writes only the portable, QDQ decoder)."""
    from edgelvm.errors import UnsupportedModelError

    llm = (getattr(config, RECORD, None) or {}).get("llm")
    if not llm:
        return None
    if llm.get("bits") != 4:
        raise UnsupportedModelError(
            f"a W{llm.get('bits')}A{llm.get('bits')} ({llm.get('method')}) language model: the fused decoder has "
            "INT4 weight-only and float forms only",
            fix="it runs as QDQ in the portable decoder, which export writes",
        )
    if not source:
        raise ConfigError("an INT4 checkpoint loaded without its directory", where="model",
                          fix="export the directory `edgelvm quantize` wrote")  # fmt: skip
    return load_int4(source)


def load_int8(source: str | Path, file: str = VISION_SIDECAR) -> dict[str, Any]:
    """The INT8 layers of a quantized checkpoint: the vision encoder's by their path in the export-facing vision
    module (``int8.safetensors``), or SmoothQuant's language-model layers by ``layers.{i}.<path>``."""
    from safetensors.numpy import load_file

    from edgelvm.quantize.int8 import Int8Linear

    tensors = load_file(str(Path(source) / file))
    names = [key[: -len(".codes")] for key in tensors if key.endswith(".codes")]
    return {
        n: Int8Linear(tensors[f"{n}.codes"], tensors[f"{n}.weight_scales"], float(tensors[f"{n}.input_scale"][0]))
        for n in names
    }

"""``quantize(model, calib_data, [AWQConfig(group_size=64), Int8VisionConfig()], out=...) -> QuantReport``.

Two layers. :func:`quantize_model` is the library verb: a loaded model (adapter), the method configs
(:mod:`edgelvm.quantize.methods`, one per part: language model, vision encoder) and the calibration set already
loaded; each config is applied by the handler registered for its type (:mod:`edgelvm.quantize.handlers`), so this
module names no method. :func:`quantize` is the path-level boundary the CLI calls: it checks the output, loads the
data and the model once, runs the verb and writes the checkpoint.

The quantized checkpoint is a normal Hugging Face checkpoint whose quantized weights are the *dequantized* values
(and, after AWQ, whose norms carry the folded scales), so PyTorch computes the quantized model's weights exactly.
Next to it (:mod:`edgelvm.models.checkpoint.quantized`): ``int4.safetensors`` (the language model's block-wise
INT4 codes and scales by ``layers.{i}.<path>``), ``int8.safetensors`` (the vision encoder's INT8 codes, per-channel
weight scales and per-tensor input scales, by their path in the export-facing vision module),
``int8_llm.safetensors`` (SmoothQuant), ``config.edgelvm_quantization`` (what was done) and ``quant_report.json``
(per-layer weight and output error, bytes before / after, what stayed in float and why).

``edgelvm export`` turns that one representation into two writers' graphs: ``MatMulNBits`` in the ONNX Runtime
decoder and block-wise ``DequantizeLinear`` (INT4) in the portable one (what TensorRT builds); explicit QDQ in the
vision graph (ONNX Runtime runs it, TensorRT's INT8 path consumes it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.calibration.dataset import CalibrationSet, load_calibration_set
from edgelvm.errors import ConfigError
from edgelvm.fsutil import prepare_output, write_dir_atomically
from edgelvm.models import load_model
from edgelvm.models.checkpoint.quantized import RECORD
from edgelvm.models.checkpoint.save import save_checkpoint_files
from edgelvm.quantize.handlers import Handler, handler_for
from edgelvm.quantize.methods import METHODS, Int8VisionConfig, MethodConfig, ObserverSweep

log = logging.getLogger(__name__)

PARTS = tuple(METHODS)  # ("llm", "vision"): the record and the report list them in this order
KEPT_FLOAT_WITHOUT = {"llm": "language model (--llm none)", "vision": "vision encoder and projector (--vision none)"}


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
    #: a quantized LM head (or a tied one computing with an INT8 table): format, top-1 agreement with the float head
    #: and both heads' answer-token accuracy on the calibration answers (:mod:`edgelvm.quantize.lm_head`)
    lm_head: dict[str, Any] | None = None

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
        head = self.lm_head or {}
        if head.get("top1_agreement") is not None:
            lines.append(
                f"LM head {head['format']}: top-1 agreement with the float head {head['top1_agreement']:.2%} on "
                f"{head['scored_positions']} answer positions (answer accuracy {head['answer_accuracy_float']:.2%} "
                f"-> {head['answer_accuracy_quantized']:.2%})"
            )
        if self.calibrator:
            lines.append(f"vision observer: {self.calibrator} (by {self.observer_metric}): " + ", ".join(
                f"{k} {v:.5f}" for k, v in self.observer_scores.items()))  # fmt: skip
        return "\n".join(lines)


@dataclass
class QuantizedModel:
    """What :func:`quantize_model` returns: the adapter (quantized in place, its config carrying the record), the
    report, and the sidecar files' tensors by file name (:func:`save_quantized` writes them)."""

    adapter: Any
    report: QuantReport
    sidecars: dict[str, dict[str, np.ndarray]]


def quantize(
    model: str | Path | Any,
    calib_data: Any,
    methods: MethodConfig | Sequence[MethodConfig],
    *,
    out: str | Path = "quantized",
    force: bool = False,
    calib_limit: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    stats_memory_gb: float | None = None,
    layerwise: bool = False,
    dtype: str = "float32",
    progress: bool = False,
) -> QuantReport:
    """Quantize ``model`` (checkpoint path or loaded adapter) into the checkpoint directory ``out``.

    ``calib_data``: a jsonl dataset, a list of records or ``"shapes"`` (``calib_limit`` records drawn with
    ``seed``); None is allowed when every method is data-free (RTN; given, the report still has each layer's output
    error). An :class:`ObserverSweep`'s ``eval_data`` may be a path here: it is loaded the same way.

    ``dtype``: the load dtype of a checkpoint path (``float16`` / ``bfloat16`` halve the memory; pair them with
    ``layerwise``, which computes each layer in fp32 — whole-model passes would run the model in that dtype)."""
    started = time.perf_counter()
    methods = _method_list(methods)
    for cfg in _by_part(methods).values():  # a bad method list fails before the output is touched
        handler_for(cfg)
    sources = [model if isinstance(model, (str, Path)) else None, getattr(model, "source", None)]
    if isinstance(calib_data, (str, Path)):
        sources.append(calib_data)
    out = prepare_output(Path(out), force=force, inputs=sources)
    _check_calibration(methods, calib_data)  # before loading anything
    calib = load_calibration_set(calib_data, calib_limit, seed) if calib_data is not None else None
    methods = [_load_eval_data(m, calib_limit, seed) for m in methods]
    adapter = model if hasattr(model, "processor") else load_model(str(model), dtype=dtype)
    result = quantize_model(adapter, methods, calib, batch_size=batch_size, stats_memory_gb=stats_memory_gb,
                            layerwise=layerwise, progress=progress)  # fmt: skip
    result.report.out = str(out)
    result.report.seconds = round(time.perf_counter() - started, 2)
    save_quantized(result, out)
    return result.report


def quantize_model(
    adapter: Any,
    methods: MethodConfig | Sequence[MethodConfig],
    calib: CalibrationSet | list | None = None,
    *,
    batch_size: int = 16,
    stats_memory_gb: float | None = None,
    layerwise: bool = False,
    progress: bool = False,
) -> QuantizedModel:
    """Apply ``methods`` (at most one per part) to the loaded ``adapter`` in place, calibrated on ``calib`` (a
    loaded :class:`~edgelvm.calibration.dataset.CalibrationSet` or a list of records; no paths here).

    The language model's layers are calibrated and quantized in consecutive groups of decoder layers whose Gram
    matrices (float32 ``K×K`` per layer input) fit ``stats_memory_gb`` (default: :func:`auto_stats_memory_gb`), one
    calibration pass each — later groups then see the outputs of already-quantized earlier layers (GPTQ's sequential
    variant); a 7B Llama needs ~0.7 GB per layer. Methods that are not sequential (the vision encoder's) use the
    first, float pass's statistics.

    ``layerwise``: never run the model whole — capture the first decoder layer's inputs once, then calibrate,
    quantize and run one layer at a time in fp32 (:mod:`edgelvm.quantize.layerwise`; the same result as one
    layer per pass, at the memory of the model in its own dtype plus one fp32 layer)."""
    started = time.perf_counter()
    by_part = _by_part(_method_list(methods))
    handlers = {part: handler_for(cfg) for part, cfg in by_part.items()}  # a config that matches nothing fails here
    _check_calibration(list(by_part.values()), calib)
    if stats_memory_gb is None:
        stats_memory_gb = auto_stats_memory_gb(adapter)
    if stats_memory_gb <= 0:
        raise ConfigError(f"stats_memory_gb {stats_memory_gb} <= 0", where="--stats-memory-gb",
                          fix="give the memory (GB) the Gram matrices may take, e.g. 4")  # fmt: skip
    calib = _as_set(calib) if calib is not None else None
    adapter.check_stage("quantize", tuple(by_part.values()), calib)  # a family's refusal comes before any work
    for part, handler in handlers.items():
        handler.check(adapter, by_part[part])
    if getattr(adapter.config, RECORD, None):
        raise ConfigError("the checkpoint is already quantized", where=adapter.source or None,
                          fix="quantize the float checkpoint it came from")  # fmt: skip

    llm, vision = by_part.get("llm"), by_part.get("vision")
    report = QuantReport(out="", method=llm.name if llm else "none", group_size=getattr(llm, "group_size", 0),
                         vision=vision.name if vision else "none")  # fmt: skip
    report.kept_float = ["token embedding (a memory-mapped table)", "lm_head (logit precision)"]
    report.kept_float += [why for part, why in KEPT_FLOAT_WITHOUT.items() if part not in by_part]
    layers = {part: handler.layers(adapter) for part, handler in handlers.items()}
    states: dict[str, Any] = {}
    if calib is not None:
        report.calibration = calib.describe()
        states = {part: h.prepare(adapter, by_part[part], calib, batch_size) for part, h in handlers.items()}
    if layerwise and calib is not None:
        from edgelvm.quantize.layerwise import quantize_layerwise

        parts = {p: (by_part[p], handlers[p], layers[p], states.get(p)) for p in by_part}
        quantized, first = quantize_layerwise(adapter, parts, calib, report, batch_size=batch_size,
                                              progress=progress)  # fmt: skip
        for part in by_part:  # the non-sequential parts, on the capture pass's statistics
            if not handlers[part].sequential and layers[part]:
                part_stats = first.with_prefix(f"{part}:")
                quantized[part] = handlers[part].apply(adapter, by_part[part], layers[part], part_stats, report,
                                                       states.get(part))  # fmt: skip
    else:
        quantized = _run_passes(adapter, by_part, handlers, layers, states, calib, report,
                                batch_size=batch_size, stats_memory_gb=stats_memory_gb, progress=progress)  # fmt: skip
    for part, handler in handlers.items():
        quantized[part].update(handler.finish(adapter, by_part[part], calib, batch_size, report))

    record: dict[str, Any] = {part: handlers[part].record(by_part[part], report) for part in by_part if layers[part]}
    if calib is not None:
        record["calibration_sha256"] = calib.sha256
    setattr(adapter.config, RECORD, record)
    sidecars = {handlers[part].sidecar: handlers[part].tensors(quantized[part]) for part in by_part}
    report.seconds = round(time.perf_counter() - started, 2)
    return QuantizedModel(adapter, report, sidecars)


def save_quantized(result: QuantizedModel, out: str | Path) -> None:
    """Write the checkpoint, its sidecars and ``quant_report.json`` into ``out`` atomically (call
    :func:`~edgelvm.fsutil.prepare_output` first)."""
    from safetensors.numpy import save_file

    adapter = result.adapter

    log.info("saving the quantized checkpoint to %s", out)

    def write(stage: Path) -> None:
        save_checkpoint_files(adapter.model, adapter.processor, stage, getattr(adapter, "source", None))
        for name, tensors in result.sidecars.items():
            if tensors:
                save_file(tensors, str(stage / name))
        (stage / "quant_report.json").write_text(json.dumps(result.report.to_dict(), indent=2))

    write_dir_atomically(Path(out), write, stage="quantize")


def _run_passes(
    adapter: Any, by_part: dict[str, MethodConfig], handlers: dict[str, Handler], layers: dict[str, dict],
    states: dict[str, Any], calib: CalibrationSet | None, report: QuantReport, *, batch_size: int,
    stats_memory_gb: float, progress: bool,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Calibrate and apply: sequential handlers pass by pass, then the others on the first pass's statistics.
    Statistics are keyed ``part:name`` (one pass serves every part); each handler sees its own names."""
    sequential = {f"{p}:{n}": m for p in by_part if handlers[p].sequential for n, m in layers[p].items()}
    deferred = {f"{p}:{n}": m for p in by_part if not handlers[p].sequential for n, m in layers[p].items()}
    sampled = {k for k in sequential if handlers[k.split(":", 1)[0]].accepts_token_sample}
    passes = _layer_passes(sequential, stats_memory_gb, sampled) if calib is not None else [sequential]
    quantized: dict[str, dict[str, Any]] = {part: {} for part in by_part}
    first = None
    for index, chunk in enumerate(passes):
        stats = None
        if calib is not None:
            modules = {**chunk, **(deferred if index == 0 else {})}
            label = "calibration" if len(passes) == 1 else f"calibration pass {index + 1}/{len(passes)}"
            stats = _calibrate(adapter, calib, modules, set(chunk), batch_size, progress, label, sampled)
            report.calibration_passes += 1
            first = first or stats
        for part in by_part:
            mine = {k.split(":", 1)[1]: m for k, m in chunk.items() if k.startswith(f"{part}:")}
            if mine:
                part_stats = stats.with_prefix(f"{part}:") if stats is not None else None
                quantized[part].update(handlers[part].apply(adapter, by_part[part], mine, part_stats, report,
                                                            states.get(part)))  # fmt: skip
        if stats is not None:
            stats.grams.clear()  # free this pass's Gram matrices (the histograms stay)
    for part in by_part:
        if not handlers[part].sequential and layers[part]:
            part_stats = first.with_prefix(f"{part}:") if first is not None else None
            quantized[part] = handlers[part].apply(adapter, by_part[part], layers[part], part_stats, report,
                                                   states.get(part))  # fmt: skip
    return quantized


def _method_list(methods: Any) -> list[Any]:
    return [methods] if isinstance(methods, MethodConfig) else list(methods)


def _by_part(methods: list[Any]) -> dict[str, MethodConfig]:
    """The configs by part, in :data:`PARTS` order; anything that is not one method config per part is an error."""
    by_part: dict[str, MethodConfig] = {}
    for cfg in methods:
        if not isinstance(cfg, MethodConfig):
            raise ConfigError(f"{cfg!r} is not a quantization method config", where="quantize methods",
                              fix="pass e.g. AWQConfig(group_size=64) or Int8VisionConfig() "
                                  "(edgelvm.quantize.methods)")  # fmt: skip
        if cfg.part not in PARTS:
            raise ConfigError(f"{type(cfg).__name__} quantizes part {cfg.part!r}, which no model has",
                              where="quantize methods", fix=f"set part to one of {', '.join(PARTS)}")  # fmt: skip
        if cfg.part in by_part:
            raise ConfigError(f"two methods for the {cfg.part} part: {by_part[cfg.part].name} and {cfg.name}",
                              where="quantize methods", fix="give one method per part")  # fmt: skip
        by_part[cfg.part] = cfg
    if not by_part:
        raise ConfigError("nothing to quantize", where="--llm / --vision", fix="choose --llm or --vision")
    return {part: by_part[part] for part in PARTS if part in by_part}


def _check_calibration(methods: list[Any], calib: Any) -> None:
    needs = [m.name for m in methods if isinstance(m, MethodConfig) and m.needs_calibration]
    if needs and calib is None:
        raise ConfigError(
            f"{', '.join(needs)} need calibration data",
            where="--calib",
            fix="pass --calib DATA (a jsonl dataset, or 'shapes'), or use --llm rtn --vision none",
        )


def _as_set(calib: CalibrationSet | list) -> CalibrationSet:
    if isinstance(calib, CalibrationSet):
        return calib
    if isinstance(calib, list):
        return load_calibration_set(calib, max(len(calib), 1))  # records in memory: every one, order kept
    raise ConfigError(
        f"calibration data {type(calib).__name__} is not loaded",
        where="quantize_model",
        fix="pass a CalibrationSet or a list of records (edgelvm.quantize.quantize loads paths)",
    )


def _load_eval_data(cfg: Any, limit: int, seed: int) -> Any:
    """The boundary's one place that resolves a path inside a config: an observer sweep's ``eval_data``."""
    if not isinstance(cfg, Int8VisionConfig) or not isinstance(cfg.observer, ObserverSweep):
        return cfg
    data = cfg.observer.eval_data
    if data is None or isinstance(data, CalibrationSet):
        return cfg
    loaded = load_calibration_set(data, limit, seed)
    return dataclasses.replace(cfg, observer=dataclasses.replace(cfg.observer, eval_data=loaded))


def auto_stats_memory_gb(adapter: Any) -> float:
    """The Gram matrices' default budget: a quarter of the model's weight bytes, between 0.5 and 4 GB — so that
    calibration adds at most ~0.25× the checkpoint to the quantize peak (issue 19), at the cost of more calibration
    passes for models whose Grams exceed it (each pass is one forward over the calibration set)."""
    weights = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
    return min(4.0, max(0.5, 0.25 * weights / 1e9))


def _layer_passes(text: dict[str, Any], memory_gb: float, sampled: set[str] = frozenset()) -> list[dict[str, Any]]:
    """The language model's linears in consecutive groups of whole decoder layers whose Gram matrices (float32,
    counted per linear: an over-estimate where q/k/v share one; a token sample where ``sampled`` allows it and is
    smaller) fit ``memory_gb``; at least one layer per group."""
    from edgelvm.calibration import stats

    by_layer: dict[str, dict[str, Any]] = {}
    for name, module in text.items():
        by_layer.setdefault(".".join(name.split(".")[:2]), {})[name] = module  # "part:layers.{i}"
    budget = memory_gb * 1e9
    passes: list[dict[str, Any]] = [{}]
    used = 0.0
    for layer in by_layer.values():
        need = sum(4.0 * m.in_features * (min(m.in_features, stats.SAMPLE_TOKENS) if n in sampled else m.in_features)
                   for n, m in layer.items())  # fmt: skip
        if passes[-1] and used + need > budget:
            passes.append({})
            used = 0.0
        passes[-1].update(layer)
        used += need
    return passes


def _calibrate(adapter: Any, calib: Any, modules: dict, gram: set[str], batch_size: int, progress: bool,
               label: str, sampled: set[str] | None = None) -> Any:  # fmt: skip
    from edgelvm.calibration.stats import collect_stats

    text = {name for name in modules if name.startswith("llm:")}  # padding positions excluded there
    return _with_progress(progress, len(calib), label, lambda tick: collect_stats(
        adapter, calib, modules, gram=gram, text=text, batch_size=batch_size, progress=tick, sampled=sampled,
    ))  # fmt: skip


def _with_progress(progress: bool, total: int, label: str, work: Any) -> Any:
    if not progress:
        return work(None)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        return work(lambda n: bar.advance(task, n))

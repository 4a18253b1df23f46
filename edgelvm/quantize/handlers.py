"""The handler table: method config type -> :class:`Handler` (torchao's per-config registration).

:func:`edgelvm.quantize.api.quantize_model` looks each config up here and never names a method, so a new method
is a config class (:mod:`edgelvm.quantize.methods`) plus ``register_handler(NewConfig, NewHandler())`` — the verb is
not edited. Lookup follows the config's class hierarchy (a subclass of ``AWQConfig`` gets AWQ's handler unless it
registers its own); a config that matches nothing is a :class:`~edgelvm.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgelvm.errors import ConfigError, DatasetError
from edgelvm.models.checkpoint.quantized import (
    LLM_INT8_SIDECAR,
    SIDECAR,
    VISION_SIDECAR,
    int4_tensors,
    int8_tensors,
    text_linears,
)
from edgelvm.quantize import llm_int4
from edgelvm.quantize.methods import (
    AWQConfig,
    GPTQConfig,
    Int8VisionConfig,
    MethodConfig,
    ObserverSweep,
    RTNConfig,
    SmoothQuantConfig,
)

SWEEP_IMAGES = 64  # images the observer sweep scores each candidate on


class Handler:
    """How one method is applied. ``sequential``: its layers are calibrated and quantized in memory-bounded
    passes of whole decoder layers, each after the previous ones were quantized (needs ``XᵀX``); otherwise it runs
    once after them, on the first (float) pass's statistics."""

    sequential = True
    sidecar = SIDECAR
    #: its statistics may hold a token sample instead of the Gram matrix where that is smaller (AWQ's search and
    #: the error report can; GPTQ's Hessian cannot): see :class:`edgelvm.calibration.stats.TokenSample`
    accepts_token_sample = False

    def layers(self, adapter: Any) -> dict[str, Any]:
        """name -> ``nn.Linear`` it quantizes (the names its sidecar and statistics use)."""
        raise NotImplementedError

    def prepare(self, adapter: Any, cfg: MethodConfig, calib: Any, batch_size: int) -> Any:
        """Work on the float model before anything changes (None by default); its result reaches :meth:`apply`."""
        return None

    def apply(self, adapter: Any, cfg: MethodConfig, layers: dict[str, Any], stats: Any, report: Any,
              state: Any) -> dict[str, Any]:  # fmt: skip
        """Quantize ``layers`` in place (torch weights become their dequantized values); the codes by name."""
        raise NotImplementedError

    def check(self, adapter: Any, cfg: MethodConfig) -> None:
        """Refuse a config this model cannot take, before any work (nothing by default)."""

    def finish(self, adapter: Any, cfg: MethodConfig, calib: Any, batch_size: int, report: Any) -> dict[str, Any]:
        """Work after every layer is quantized (the LM head, the embedding table); more codes by name ({} by
        default)."""
        return {}

    def record(self, cfg: MethodConfig, report: Any) -> dict[str, Any]:
        """This part's entry of ``config.edgelvm_quantization``."""
        raise NotImplementedError

    def tensors(self, quantized: dict[str, Any]) -> dict[str, np.ndarray]:
        """The sidecar's tensors."""
        raise NotImplementedError


HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type[MethodConfig], handler: Handler) -> None:
    if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig)):
        raise ConfigError(f"{config_type!r} is not a MethodConfig subclass", where="register_handler",
                          fix="derive the config from edgelvm.quantize.methods.MethodConfig")  # fmt: skip
    HANDLERS[config_type] = handler


def handler_for(cfg: Any) -> Handler:
    for cls in type(cfg).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    known = ", ".join(sorted(c.__name__ for c in HANDLERS))
    raise ConfigError(f"no quantization method is registered for {type(cfg).__name__}", where="quantize methods",
                      fix=f"use one of {known}, or register_handler({type(cfg).__name__}, handler)")  # fmt: skip


class Int4Handler(Handler):
    """INT4 weight-only language model; ``quantize_layers`` is the method (RTN, AWQ, GPTQ)."""

    def __init__(self, quantize_layers: Callable[..., dict[str, Any]], accepts_token_sample: bool = True) -> None:
        self.quantize_layers = quantize_layers
        self.accepts_token_sample = accepts_token_sample

    def layers(self, adapter: Any) -> dict[str, Any]:
        return text_linears(adapter)

    def apply(self, adapter: Any, cfg: Any, layers: dict[str, Any], stats: Any, report: Any, state: Any) -> dict:
        return self.quantize_layers(adapter, layers, stats, cfg, report)

    def check(self, adapter: Any, cfg: Any) -> None:
        from edgelvm.quantize.lm_head import check_head_options

        check_head_options(adapter, cfg)

    def finish(self, adapter: Any, cfg: Any, calib: Any, batch_size: int, report: Any) -> dict[str, Any]:
        from edgelvm.quantize.lm_head import quantize_head_and_table

        return quantize_head_and_table(adapter, cfg, calib, batch_size, report)

    def record(self, cfg: Any, report: Any) -> dict[str, Any]:
        record = {"method": cfg.name, "bits": 4, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                  "file": SIDECAR}  # fmt: skip
        if cfg.lm_head != "float":
            record["lm_head"] = {"bits": cfg.lm_head_bits, "group_size": cfg.group_size, **(report.lm_head or {})}
        if cfg.embeddings != "float":
            record["embeddings"] = {"bits": 8, "block": "row"}
        return record

    def tensors(self, quantized: dict[str, Any]) -> dict[str, np.ndarray]:
        return int4_tensors(quantized)


class SmoothQuantHandler(Handler):
    sidecar = LLM_INT8_SIDECAR
    accepts_token_sample = True  # the Gram matrix only feeds the error report

    def layers(self, adapter: Any) -> dict[str, Any]:
        return text_linears(adapter)

    def apply(self, adapter: Any, cfg: Any, layers: dict[str, Any], stats: Any, report: Any, state: Any) -> dict:
        from edgelvm.quantize.smoothquant import smooth_and_quantize

        return smooth_and_quantize(adapter, layers, stats, cfg.alpha, report)

    def record(self, cfg: Any, report: Any) -> dict[str, Any]:
        return {"method": cfg.name, "bits": 8, "alpha": cfg.alpha, "file": LLM_INT8_SIDECAR}

    def tensors(self, quantized: dict[str, Any]) -> dict[str, np.ndarray]:
        return int8_tensors(quantized)


class Int8VisionHandler(Handler):
    """W8A8 vision encoder + projector, its input ranges from a named observer or the best of a sweep."""

    sequential = False
    sidecar = VISION_SIDECAR

    def layers(self, adapter: Any) -> dict[str, Any]:
        from edgelvm.quantize.vision_int8 import vision_linears

        return vision_linears(adapter)

    def prepare(self, adapter: Any, cfg: Any, calib: Any, batch_size: int) -> Any:
        """About ``SWEEP_IMAGES`` calibration images as the encoder's keyword inputs, and its float outputs."""
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
        return {"calls": calls, "refs": refs, "batch_size": batch_size}

    def apply(self, adapter: Any, cfg: Any, layers: dict[str, Any], stats: Any, report: Any, state: Any) -> dict:
        from edgelvm.quantize import vision_int8 as v8

        if not state or not state["calls"]:
            raise DatasetError(
                "the calibration set has no images, so the vision encoder cannot be calibrated",
                where=report.calibration.get("source"),
                fix="use records with images, or --vision none",
            )
        originals = {name: m.weight.detach().float().clone() for name, m in layers.items()}
        weights = v8.quantize_weights(layers)
        sweep = self._choose_observer(adapter, cfg, layers, stats, state, report)
        report.calibrator, report.observer_scores, report.observer_metric = sweep.chosen, sweep.scores, sweep.metric
        scales = v8.input_scales_for(stats, list(layers), sweep.chosen)
        for name, linear in layers.items():
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

    @staticmethod
    def _choose_observer(adapter: Any, cfg: Int8VisionConfig, layers: dict, stats: Any, state: Any, report: Any):
        from edgelvm.quantize import vision_int8 as v8

        observer = cfg.observer
        candidates = (observer,) if isinstance(observer, str) else observer.candidates
        if isinstance(observer, ObserverSweep) and observer.eval_data is not None and len(candidates) > 1:
            eval_set = _loaded_set(observer.eval_data)
            return v8.sweep_observers_on_answers(adapter, layers, stats, eval_set, state["batch_size"], candidates)
        return v8.sweep_observers(adapter, layers, stats, state["calls"], state["refs"], candidates=candidates)

    def record(self, cfg: Any, report: Any) -> dict[str, Any]:
        return {"method": cfg.name, "calibrator": report.calibrator, "file": VISION_SIDECAR}

    def tensors(self, quantized: dict[str, Any]) -> dict[str, np.ndarray]:
        return int8_tensors(quantized)


def _loaded_set(data: Any) -> Any:
    """Records (a list) or a loaded calibration set; a path is the caller's to load."""
    from edgelvm.calibration.dataset import CalibrationSet, records_digest

    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, list):
        return CalibrationSet(data, records_digest(data), "records")
    raise ConfigError(
        f"eval data {data!r} is not loaded",
        where="ObserverSweep.eval_data",
        fix="pass records or a CalibrationSet (edgelvm.quantize.quantize loads a path for you)",
    )


register_handler(RTNConfig, Int4Handler(llm_int4.quantize_rtn_layers))
register_handler(AWQConfig, Int4Handler(llm_int4.quantize_awq_layers))
register_handler(GPTQConfig, Int4Handler(llm_int4.quantize_gptq_layers, accepts_token_sample=False))
register_handler(SmoothQuantConfig, SmoothQuantHandler())
register_handler(Int8VisionConfig, Int8VisionHandler())

__all__ = ["HANDLERS", "Handler", "Int4Handler", "handler_for", "register_handler"]

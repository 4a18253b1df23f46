"""Layer-by-layer calibration of the language model, as AutoAWQ and GPTQ do it: the model is never run whole.

Why: the whole-model passes of :func:`edgelvm.quantize.api.quantize_model` need the model in fp32 (a CPU computes
fp16 an order of magnitude slower) and one forward of every layer per pass — a 7B is 28 GB in fp32. Here the model
stays in its load dtype (fp16/bf16: 14 GB for a 7B) and only one decoder layer at a time is upcast to fp32:

1. **Capture** — one forward of the calibration set in which every decoder layer is an identity that records its
   call (the per-layer keyword arguments: position embeddings, masks — Gemma 3's differ by layer type) and, for
   the first layer, its input hidden states. The vision tower and embeddings run for real (the vision part's
   statistics are collected here); the decoder layers cost nothing.
2. **Per layer** ``i``: upcast it to fp32, run it on the captured inputs with hooks on its linears (statistics and
   Gram matrices), quantize its linears with the method's handler, run it again to get its outputs — the next
   layer's inputs, computed by the *quantized* layer as in the sequential whole-model passes — and cast it back.

Memory: the model in its load dtype, one fp32 layer, its Gram matrices and two copies of the calibration set's
hidden states (``records × tokens × hidden × 4`` bytes each). The result is the same as whole-model passes of one
layer each (``tests/test_quantize_layerwise.py`` compares the codes), which a family that changes the hidden states
*between* decoder layers (Qwen3-VL's DeepStack adds vision features after the first layers) would break: such a
model is refused with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from edgelvm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LayerInputs:
    """What the capture pass recorded, per calibration batch."""

    hidden: list[Any] = field(default_factory=list)  # first layer's input, fp32
    masks: list[Any] = field(default_factory=list)  # the batch's 2-D attention mask (padding excluded from stats)
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)  # [layer][batch] -> (args, kwargs)


def capture(adapter: Any, calib: Any, batch_size: int, on_batch: Any = None, progress: Any = None) -> LayerInputs:
    """Run the calibration set with every text decoder layer an identity that records its call (step 1)."""
    import torch

    from edgelvm.calibration.dataset import run_forward

    stack = list(adapter.layer_stacks()["text"])
    record = LayerInputs(calls=[[] for _ in stack])
    returned: list[Any] = [None]  # what the previous identity layer returned, to catch changes between layers

    def identity(index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                record.hidden.append(hidden.detach().to(torch.float32, copy=True))
            elif hidden is not returned[0]:
                raise ConfigError(
                    f"{type(adapter.model).__name__} changes the hidden states between decoder layers {index - 1} "
                    f"and {index} (e.g. DeepStack vision features), which layer-by-layer calibration cannot replay",
                    where="--layerwise", fix="quantize with whole-model passes (without --layerwise)")  # fmt: skip
            record.calls[index].append((rest, kwargs))
            returned[0] = hidden
            return hidden

        return forward

    def batch_started(inputs: dict[str, Any]) -> None:
        record.masks.append(inputs.get("attention_mask"))
        returned[0] = None
        if on_batch is not None:
            on_batch(inputs)

    for index, layer in enumerate(stack):
        layer.forward = identity(index)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        with torch.no_grad():
            run_forward(adapter, calib, batch_size, on_batch=batch_started, progress=progress, use_cache=False)
    finally:
        for layer in stack:
            del layer.forward  # the class's forward again
    if len(record.hidden) != len(record.masks):
        raise ConfigError(f"the first decoder layer ran {len(record.hidden)} times for {len(record.masks)} batches",
                          where=type(adapter.model).__name__, fix="quantize with whole-model passes")  # fmt: skip
    return record


def _to_float32(value: Any) -> Any:
    """Floating tensors (position embeddings, additive masks) in fp32, the layer's compute dtype; the rest as is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_to_float32(v) for v in value)
    if isinstance(value, list):
        return [_to_float32(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


def run_layer(layer: Any, hidden: list[Any], calls: list[tuple[tuple, dict]], on_batch: Any = None,
              masks: list[Any] | None = None) -> list[Any]:  # fmt: skip
    """``layer`` on each batch's ``hidden`` with its recorded call; the outputs, fp32."""
    import torch

    out = []
    with torch.no_grad():
        for b, (x, (args, kwargs)) in enumerate(zip(hidden, calls, strict=True)):
            if on_batch is not None:
                on_batch({"attention_mask": masks[b] if masks else None})
            y = layer(x, *_to_float32(args), **_to_float32(kwargs))
            out.append((y[0] if isinstance(y, tuple) else y).float())
    return out


def quantize_layerwise(adapter: Any, parts: dict[str, Any], calib: Any, report: Any, *, batch_size: int,
                       progress: bool = False) -> tuple[dict[str, dict[str, Any]], Any]:  # fmt: skip
    """Step 1 and 2 for ``parts`` (part -> ``(config, handler, {name: linear}, state)``). Sequential handlers (the
    language model's) are applied layer by layer; the others get the capture pass's statistics. Returns the codes
    by part and the capture pass's statistics."""
    from contextlib import nullcontext

    from edgelvm.calibration.stats import collect_stats_while

    sequential = {p: v for p, v in parts.items() if v[1].sequential}
    deferred = {f"{p}:{n}": m for p, v in parts.items() if not v[1].sequential for n, m in v[2].items()}
    quantized: dict[str, dict[str, Any]] = {p: {} for p in parts}
    stack = list(adapter.layer_stacks()["text"])
    captured: list[LayerInputs] = []

    if progress:
        from rich.progress import Progress

        bar: Any = Progress(transient=True)
    with bar if progress else nullcontext():
        tick = None
        if progress:
            task = bar.add_task("calibration: capture", total=len(calib))
            tick = lambda n: bar.advance(task, n)  # noqa: E731
        log.info("layer-wise calibration: capture pass over %d records", len(calib))
        first = collect_stats_while(
            lambda on_batch: captured.append(capture(adapter, calib, batch_size, on_batch=on_batch, progress=tick)),
            deferred, calibration=calib.describe(),
        )  # fmt: skip
        report.calibration_passes += 1
        inputs = captured[0]
        hidden = inputs.hidden
        layers_task = bar.add_task("calibration: layer by layer", total=len(stack)) if progress else None
        for index, layer in enumerate(stack):
            log.info("layer-wise calibration: decoder layer %d/%d", index + 1, len(stack))  # -v: memory phases
            hidden = _one_layer(adapter, index, layer, hidden, inputs, sequential, parts, quantized, calib, report)
            if progress:
                bar.advance(layers_task, 1)
    return quantized, first


def _one_layer(adapter: Any, index: int, layer: Any, hidden: list[Any], inputs: LayerInputs, sequential: dict,
               parts: dict, quantized: dict, calib: Any, report: Any) -> list[Any]:  # fmt: skip
    """Step 2 for decoder layer ``index``: statistics, quantization, outputs (the next layer's inputs)."""
    from edgelvm.calibration.stats import collect_stats_while

    prefix = f"layers.{index}."
    mine = {p: {n: m for n, m in v[2].items() if n.startswith(prefix)} for p, v in sequential.items()}
    dtype = next(layer.parameters()).dtype
    layer.float()
    calls = inputs.calls[index]
    if any(mine.values()):
        modules = {f"{p}:{n}": m for p, named in mine.items() for n, m in named.items()}
        sampled = {f"{p}:{n}" for p, named in mine.items() if parts[p][1].accepts_token_sample for n in named}
        stats = collect_stats_while(
            lambda on_batch: run_layer(layer, hidden, calls, on_batch, inputs.masks),
            modules, gram=set(modules), text=set(modules), calibration=calib.describe(), sampled=sampled,
        )  # fmt: skip
        for part, named in mine.items():
            if named:
                cfg, handler, _layers, state = parts[part]
                quantized[part].update(handler.apply(adapter, cfg, named, stats.with_prefix(f"{part}:"), report,
                                                     state))  # fmt: skip
        stats.grams.clear()
    hidden = run_layer(layer, hidden, calls)  # the quantized layer's outputs feed the next one
    layer.to(dtype)
    return hidden

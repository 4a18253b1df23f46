"""INT8 activation quantization on the torch side: what a quantized checkpoint computes when edgelvm loads it.

A W8A8 checkpoint (``--vision int8``, ``--llm smoothquant``) stores its linears' dequantized weights, so PyTorch
already has the W8 half. The A8 half — each listed linear's input going through ``QuantizeLinear`` →
``DequantizeLinear`` (int8, zero point 0, the per-tensor ``input_scale`` of ``int8.safetensors`` /
``int8_llm.safetensors``) — is a forward pre-hook, :class:`InputQuantizer`, which
:func:`install_checkpoint_quantizers` puts on exactly the linears the sidecars list when
:func:`edgelvm.models.load_model` loads the checkpoint. The exported QDQ graph computes the same thing (same scales,
zero points, round half to even, saturation to [-128, 127], same layers), and export checks the graph against the
loaded module itself.

``AutoModelForImageTextToText.from_pretrained`` on the same directory knows nothing of the hooks: it runs W8 weights
with float activations, which is *not* what the bundle computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgelvm.errors import ExportError
from edgelvm.models.checkpoint.quantized import LLM_INT8_SIDECAR, RECORD, VISION_SIDECAR, load_int8, text_linears

#: The attribute under which a linear keeps its installed quantizer.
ATTR = "edgelvm_input_quantizer"
QMIN, QMAX = -128, 127


def fake_quantize(x: Any, scale: float) -> Any:
    """``DequantizeLinear(QuantizeLinear(x, scale, int8 0))`` as ONNX defines it: ``x / scale`` in float32, rounded
    half to even, saturated to [-128, 127], times ``scale``; returned in ``x``'s dtype."""
    import torch

    x32 = x.float()
    s = torch.tensor(scale, dtype=torch.float32)
    return (torch.clamp(torch.round(x32 / s), QMIN, QMAX) * s).to(x.dtype)


class InputQuantizer:
    """Forward pre-hook of one linear: fake-quantizes its input with ``scale`` while ``enabled``."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)
        self.enabled = True
        self.handle: Any = None

    def __call__(self, _module: Any, args: tuple) -> tuple | None:
        if not self.enabled:
            return None
        return (fake_quantize(args[0], self.scale), *args[1:])

    def __repr__(self) -> str:
        return f"InputQuantizer(scale={self.scale:.6g}, enabled={self.enabled})"


def install(modules: dict[str, Any], scales: dict[str, float]) -> dict[str, InputQuantizer]:
    """Put an :class:`InputQuantizer` on each ``modules[name]`` with ``scales[name]`` (replacing one already there).
    A name missing from ``modules`` is an error: the checkpoint would silently compute something else."""
    missing = sorted(set(scales) - set(modules))
    if missing:
        raise ExportError(
            f"{len(missing)} INT8 layers of the checkpoint are not in the model: {', '.join(missing[:3])}",
            where="int8 sidecar",
            fix="load the directory `edgelvm quantize` wrote, unchanged (its sidecars belong to its weights)",
        )
    out = {}
    for name, scale in scales.items():
        module = modules[name]
        remove(module)
        quantizer = InputQuantizer(scale)
        quantizer.handle = module.register_forward_pre_hook(quantizer)
        setattr(module, ATTR, quantizer)
        out[name] = quantizer
    return out


def remove(module: Any) -> None:
    quantizer = getattr(module, ATTR, None)
    if quantizer is not None:
        quantizer.handle.remove()
        delattr(module, ATTR)


def installed(module: Any) -> dict[str, float]:
    """Module path -> input scale, for every linear under ``module`` with a quantizer."""
    return {name: q.scale for name, m in module.named_modules() if (q := getattr(m, ATTR, None)) is not None}


@contextlib.contextmanager
def float_activations(module: Any) -> Iterator[None]:
    """Within, the installed quantizers under ``module`` pass inputs through unchanged (export traces the float
    graph, which its QDQ writer then rewrites)."""
    quantizers = [q for m in module.modules() if (q := getattr(m, ATTR, None)) is not None]
    states = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, state in zip(quantizers, states):
            q.enabled = state


def install_checkpoint_quantizers(adapter: Any) -> dict[str, InputQuantizer]:
    """Install the activation quantization a checkpoint written by ``edgelvm quantize`` records: the vision
    encoder's INT8 linears (by their path in :meth:`~edgelvm.models.base.VLMAdapter.vision_encoder`) and
    SmoothQuant's language-model linears (``layers.{i}.<path>``). A float or INT4-only checkpoint: nothing."""
    record = getattr(adapter.config, RECORD, None) or {}
    wanted = []
    if "vision" in record:
        wanted.append(("vision", VISION_SIDECAR))
    if (record.get("llm") or {}).get("bits") == 8:
        wanted.append(("llm", LLM_INT8_SIDECAR))
    if not wanted:
        return {}
    source = Path(adapter.source) if adapter.source else None
    out: dict[str, InputQuantizer] = {}
    for side, file in wanted:
        if source is None or not (source / file).is_file():
            raise ExportError(
                f"the checkpoint is W8A8-quantized but {file} (its activation scales) is missing",
                where=source / file if source else "model",
                fix="load the directory `edgelvm quantize` wrote, with all its files",
            )
        layers = load_int8(source, file)
        # the vision wrapper shares its linears with the model, so the hooks act in the model's own forward too
        modules = dict(adapter.vision_encoder().named_modules()) if side == "vision" else text_linears(adapter)
        out.update(install(modules, {name: q.input_scale for name, q in layers.items()}))
    return out

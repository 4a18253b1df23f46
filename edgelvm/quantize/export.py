"""What ``edgelvm export`` does with a quantized checkpoint: the graph rewrites and the recipe entry.

The vision graph gets explicit QDQ (INT8 W8A8), checked against the torch encoder with fake-quantized linear inputs;
the portable decoder gets block-wise INT4 ``DequantizeLinear`` weights, checked against the torch decoder (whose
weights already are the dequantized INT4 values). The fused decoder reads the INT4 codes itself
(:meth:`~edgelvm.models.base.VLMAdapter.decoder_weights`) and writes ``MatMulNBits``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgelvm.errors import ExportError
from edgelvm.export.onnx_graphs import DECODER_PREFIX, INT8_ACTIVATION_TOLERANCE
from edgelvm.export.rewrite import GraphRewrite
from edgelvm.quantize.api import LLM_INT8_SIDECAR, RECORD, SIDECAR, VISION_SIDECAR, load_int4, load_int8

log = logging.getLogger(__name__)

#: Dequantized INT4 weights are exact in fp32: only float evaluation order differs.
INT4_TOLERANCE = 1e-4


def quantized_graph_rewrites(adapter: Any) -> dict[str, GraphRewrite]:
    record = getattr(adapter.config, RECORD, None)
    if not record:
        return {}
    source = Path(adapter.source) if adapter.source else None
    rewrites: dict[str, GraphRewrite] = {}
    if "vision" in record:
        layers = load_int8(_sidecar(source, VISION_SIDECAR))
        rewrites["vision"] = _int8_rewrite(layers, "")
    if record.get("llm", {}).get("method") == "smoothquant":
        layers = load_int8(_sidecar(source, LLM_INT8_SIDECAR), LLM_INT8_SIDECAR)
        rewrites["decoder"] = _int8_rewrite(layers, DECODER_PREFIX)
    elif "llm" in record:
        weights = load_int4(_sidecar(source, SIDECAR))
        rewrites["decoder"] = GraphRewrite("int4", INT4_TOLERANCE, _int4_writer(weights))
    return rewrites


def quantization_recipe(adapter: Any) -> dict[str, Any]:
    """The manifest's recipe entry for the quantize stage (``{}`` for a float checkpoint); export adds what each
    rewrite did once the graphs are written."""
    record = getattr(adapter.config, RECORD, None)
    return {"stage": "quantize", **record} if record else {}


def _sidecar(source: Path | None, name: str) -> Path:
    if source is None or not (source / name).is_file():
        raise ExportError(
            f"the checkpoint is quantized but {name} is missing",
            where=source / name if source else "model",
            fix="export the directory `edgelvm quantize` wrote, with all its files",
        )
    return source


def _int8_rewrite(layers: dict[str, Any], prefix: str) -> GraphRewrite:
    """QDQ W8A8, checked against the torch module with the same layers' inputs fake-quantized (``prefix``: where the
    traced wrapper keeps them)."""
    return GraphRewrite("int8", INT8_ACTIVATION_TOLERANCE, _int8_writer(layers), _int8_reference(layers, prefix))


def _int8_writer(layers: dict[str, Any]) -> Any:
    def apply(model: Any, prefix: str) -> tuple[Any, dict[str, Any]]:
        from edgelvm.export.qdq import qdq_summary, write_int8_qdq

        # one Q/DQ per consumer: ONNX Runtime fuses a QDQ MatMul into an integer kernel only when its
        # QuantizeLinear feeds it alone (TensorRT fuses either form)
        result = write_int8_qdq(model, layers, prefix, share_activations=False)
        _log_left_float("vision", result)
        return result.model, {"written": len(result.written), "left_float": result.left_float,
                              "nodes": qdq_summary(result.model)}  # fmt: skip

    return apply


def _int8_reference(layers: dict[str, Any], prefix: str) -> Any:
    def reference(module: Any) -> Any:
        from edgelvm.quantize.vision_int8 import fake_quant_inputs

        return fake_quant_inputs(dict(module.named_modules()), {prefix + n: q.input_scale for n, q in layers.items()})

    return reference


def _int4_writer(weights: dict[str, Any]) -> Any:
    def apply(model: Any, prefix: str) -> tuple[Any, dict[str, Any]]:
        from edgelvm.export.qdq import write_int4_dq

        result = write_int4_dq(model, weights, prefix)
        _log_left_float("decoder", result)
        return result.model, {"written": len(result.written), "left_float": result.left_float}

    return apply


def _log_left_float(graph: str, result: Any) -> None:
    """Layers the traced graph does not contain (e.g. a tower's last block when features come from an earlier one)
    are expected: one info line. Anything else a writer could not rewrite is a warning per layer."""
    absent = [name for name, why in result.left_float.items() if why.startswith("not in the graph")]
    if absent:
        log.info("%s: %d quantized layers are not in the traced graph (their outputs are unused): %s", graph,
                 len(absent), ", ".join(absent))  # fmt: skip
    for name, why in result.left_float.items():
        if name not in absent:
            log.warning("%s: %s left in float: %s", graph, name, why)

"""What ``edgelvm export`` does with a quantized checkpoint: the graph rewrites and the recipe entry.

The vision graph gets explicit QDQ (INT8 W8A8), checked against the torch encoder as ``load_model`` loads it (with the
checkpoint's activation quantizers, :mod:`edgelvm.models.checkpoint.activations`);
the portable decoder gets block-wise INT4 ``DequantizeLinear`` weights, checked against the torch decoder (whose
weights already are the dequantized INT4 values). The fused decoder reads the INT4 codes itself
(:meth:`~edgelvm.models.base.VLMAdapter.decoder_weights`) and writes ``MatMulNBits``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from edgelvm.errors import ExportError
from edgelvm.export.onnx_graphs import DECODER_PREFIX, INT8_ACTIVATION_TOLERANCE
from edgelvm.export.qdq import qdq_summary, write_int4_dq, write_int8_qdq
from edgelvm.export.rewrite import GraphRewrite
from edgelvm.models.checkpoint.activations import installed
from edgelvm.models.checkpoint.quantized import (
    HEAD_CODES,
    LLM_INT8_SIDECAR,
    RECORD,
    SIDECAR,
    TABLE_CODES,
    VISION_SIDECAR,
    load_int4,
    load_int8,
)

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
        weights = load_int4(_sidecar(source, SIDECAR), skip=(TABLE_CODES,))
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
    """QDQ W8A8, checked against the torch module as :func:`edgelvm.models.load_model` loaded it — with the
    activation quantizers the checkpoint records (``prefix``: where the traced wrapper keeps its layers)."""
    rewrite = GraphRewrite("int8", INT8_ACTIVATION_TOLERANCE, _int8_writer(layers))
    rewrite.reference = _int8_reference(layers, prefix, rewrite)
    return rewrite


def _int8_writer(layers: dict[str, Any]) -> Any:
    def apply(model: Any, prefix: str, base_dir: str = "") -> tuple[Any, dict[str, Any]]:
        # one Q/DQ per consumer: ONNX Runtime fuses a QDQ MatMul into an integer kernel only when its
        # QuantizeLinear feeds it alone (TensorRT fuses either form)
        result = write_int8_qdq(model, layers, prefix, share_activations=False, base_dir=base_dir)
        _log_left_float("vision", result)
        return result.model, {"written": len(result.written), "left_float": result.left_float,
                              "nodes": qdq_summary(result.model)}  # fmt: skip

    return apply


def _int8_reference(layers: dict[str, Any], prefix: str, rewrite: GraphRewrite) -> Any:
    """The reference is the loaded module itself, unchanged: what a user loads is what the graph is compared with.
    Before comparing, its installed quantizers must be exactly the graph's: the same layers with the same scales,
    and no layer the graph kept float (for a reason other than not being traced) quantized on the torch side."""

    def reference(module: Any) -> Any:
        have = installed(module)
        paths = {name for name, _ in module.named_modules()}
        want = {prefix + n: q.input_scale for n, q in layers.items() if prefix + n in paths}
        left = {prefix + n: why for n, why in rewrite.summary.get("left_float", {}).items()
                if not why.startswith("not in the graph")}  # fmt: skip
        wrong = sorted(n for n in set(want) | set(have) if have.get(n) != want.get(n))
        if wrong or left:
            detail = f"{wrong[0]}: loaded {have.get(wrong[0])}, sidecar {want.get(wrong[0])}" if wrong else ""
            raise ExportError(
                "the loaded checkpoint does not quantize the same activations as the INT8 graph "
                + (f"({len(wrong)} layers differ, e.g. {detail})" if wrong else f"(left float in the graph: {left})"),
                where="int8 vision / SmoothQuant layers",
                fix="export the directory `edgelvm quantize` wrote, loaded with edgelvm.models.load_model",
            )
        return contextlib.nullcontext()

    return reference


def _int4_writer(weights: dict[str, Any]) -> Any:
    """The decoder layers' INT4 under the traced language model's prefix; a quantized head (block-wise INT4/INT8)
    at the wrapper's ``lm_head`` (``weights`` without the table's codes: those are the embedding writer's)."""
    layers = {name: w for name, w in weights.items() if name != HEAD_CODES}
    head = {HEAD_CODES: weights[HEAD_CODES]} if HEAD_CODES in weights else {}

    def apply(model: Any, prefix: str, base_dir: str = "") -> tuple[Any, dict[str, Any]]:
        result = write_int4_dq(model, layers, prefix, base_dir=base_dir)
        if head:
            on_head = write_int4_dq(result.model, head, "", inplace=True, base_dir=base_dir)
            result.model, result.written = on_head.model, result.written + on_head.written
            if HEAD_CODES in on_head.left_float:  # the bytes stay float; the values are the codes' (parity holds)
                log.warning("decoder: the quantized LM head stays float: %s", on_head.left_float[HEAD_CODES])
                result.left_float[HEAD_CODES] = on_head.left_float[HEAD_CODES]
        _log_left_float("decoder", result)
        return result.model, {"written": len(result.written), "left_float": result.left_float}

    return apply


def quantized_table(adapter: Any) -> Any:
    """The token table's codes (an :class:`~edgelvm.models.checkpoint.codes.Int4Weight` over ``[vocab, hidden]``)
    when the checkpoint stores it quantized — INT8 rows, or a tied head's codes — else None."""
    llm = (getattr(adapter.config, RECORD, None) or {}).get("llm") or {}
    if "embeddings" not in llm and "lm_head" not in llm:
        return None
    source = Path(adapter.source) if adapter.source else None
    return load_int4(_sidecar(source, SIDECAR), only=(TABLE_CODES,)).get(TABLE_CODES)


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

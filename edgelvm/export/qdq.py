"""Rewrite traced float ONNX graphs into quantized ones: INT8 W8A8 as QuantizeLinear/DequantizeLinear (QDQ), INT4
weight-only as block-wise DequantizeLinear.

Why rewrite the traced graph instead of tracing a quantized torch module: the float graph already passed export
parity, and QDQ is the one form every backend reads — TensorRT's explicit quantization builds integer kernels from
Q/DQ pairs, ONNX Runtime's QDQ fusions do the same on CPU — while a torch fake-quant module traces into ops neither
recognises. The writers never invent numerics: every value comes from the checkpoint's integer representations
(:class:`~edgelvm.models.checkpoint.codes.Int8Linear`, :class:`~edgelvm.models.checkpoint.codes.Int4Weight`), so the
graph computes exactly what the torch-side reference computes with dequantized weights (and fake-quantized inputs
for INT8).

Which node is which ``nn.Linear`` comes from the dynamo exporter's node metadata: ``pkg.torch.onnx.name_scopes``
(the module path is its second-to-last entry) and ``pkg.torch.onnx.class_hierarchy`` (ending in
``aten.linear.default``). A Linear is traced as ``MatMul(x, W[K, N])`` (+ ``Add`` for the bias; the transpose is
folded into the initializer) on 3-D inputs and as ``Gemm(x, W[N, K], b, transB=1)`` on 2-D ones (e.g. ``lm_head`` on
the last position); both are handled. A layer the writers cannot handle is left in float with a one-line reason
— they never raise for a layer.

The writers copy the model unless ``inplace=True`` (for graphs too large to hold twice).
"""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

    from edgelvm.models.checkpoint.codes import Int4Weight, Int8Linear

__all__ = [
    "WriteResult",
    "ensure_opset",
    "linear_matmuls",
    "qdq_summary",
    "write_int4_dq",
    "write_int8_qdq",
]

_SCOPES = "pkg.torch.onnx.name_scopes"
_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
_LINEAR_OP = "aten.linear.default"
#: Block-wise DequantizeLinear and the INT4 / UINT4 types need opset 21 of the default domain (and IR version 10).
INT4_OPSET = 21
_INT4_IR_VERSION = 10
#: Ops whose opset-21 version is not a drop-in for opset 20 (GroupNormalization-21 changed its scale/bias shape);
#: every other 20→21 change only widened type lists (onnx's version converter registers them as compatible).
_INCOMPATIBLE_20_21 = frozenset({"GroupNormalization"})
#: A representation whose dequantized weight is further than this (relative Frobenius norm) from the traced float
#: weight is not that weight's quantization (wrong layer, transposed square matrix, a graph traced before the
#: quantizer rescaled it). RTN INT4 is at ~0.1, INT8 at ~0.01.
DEFAULT_MAX_WEIGHT_ERROR = 0.5


@dataclass
class WriteResult:
    """What a writer did: the rewritten model, the layers now quantized, and each requested layer left in float with
    a one-line reason (the quantize report prints them)."""

    model: onnx.ModelProto
    written: list[str] = field(default_factory=list)
    left_float: dict[str, str] = field(default_factory=dict)


@dataclass
class _Site:
    """One traced call of a Linear: its MatMul/Gemm node, the weight initializer, and which weight axis is K."""

    node: onnx.NodeProto
    index: int  # position in graph.node (rewrites are emitted in graph order)
    weight: str
    k_axis: int  # 0: weight is [K, N] (MatMul, Gemm transB=0); 1: weight is [N, K] (Gemm transB=1)


def _linear_path(node: onnx.NodeProto) -> str | None:
    """The module path of the Linear this node was traced from, or None (no / other metadata)."""
    meta = {p.key: p.value for p in node.metadata_props}
    if _SCOPES not in meta or _HIERARCHY not in meta:
        return None
    try:
        scopes = ast.literal_eval(meta[_SCOPES])
        hierarchy = ast.literal_eval(meta[_HIERARCHY])
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or not isinstance(hierarchy, list) or len(scopes) < 2 or not hierarchy:
        return None
    if hierarchy[-1] != _LINEAR_OP:
        return None
    path = scopes[-2]
    return path if isinstance(path, str) and path else None


def _scan(model: onnx.ModelProto, prefix: str) -> tuple[dict[str, list[_Site]], dict[str, str]]:
    """Every traced Linear call by module path, and paths that have a call the writers cannot rewrite (with why)."""
    from onnx import helper

    inits = {t.name: t for t in model.graph.initializer}
    sites: dict[str, list[_Site]] = {}
    problems: dict[str, str] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        path = _linear_path(node)
        if path is None or not path.startswith(prefix) or len(path) == len(prefix):
            continue
        path = path[len(prefix) :]
        if len(node.input) < 2:
            continue
        if node.input[1] not in inits:
            producer = next((n.op_type for n in model.graph.node if node.input[1] in n.output), "a graph input")
            problems.setdefault(
                path, f"its {node.op_type} reads a computed weight (from {producer}), not an initializer"
            )
            continue
        weight = inits[node.input[1]]
        if len(weight.dims) != 2:
            problems.setdefault(path, f"weight {weight.name} is {len(weight.dims)}-D, expected 2-D")
            continue
        k_axis = 0
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            k_axis = 1 if attrs.get("transB", 0) else 0
        sites.setdefault(path, []).append(_Site(node, index, weight.name, k_axis))
    return sites, problems


def linear_matmuls(model: onnx.ModelProto, prefix: str = "") -> dict[str, onnx.NodeProto]:
    """Module path (``prefix`` stripped; other paths ignored) → the node computing that ``nn.Linear``: a ``MatMul``
    (or, on 2-D inputs, a ``Gemm``) whose input[1] is a 2-D weight initializer. A Linear called more than once maps
    to its first call. A graph without dynamo's metadata gives an empty dict."""
    sites, _ = _scan(model, prefix)
    return {path: calls[0].node for path, calls in sites.items()}


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def _consumers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Tensor name → who reads it: ``"#i"`` for top-level node i, ``"name (op)"`` for nodes in subgraphs (which may
    read outer-scope tensors), ``"graph output"``."""
    users: dict[str, list[str]] = {}

    def visit(graph: onnx.GraphProto, top: bool) -> None:
        for i, node in enumerate(graph.node):
            label = f"#{i}" if top else f"{node.name} ({node.op_type}, in a subgraph)"
            for name in node.input:
                users.setdefault(name, []).append(label)
            for sub in _subgraphs(node):
                visit(sub, False)

    visit(model.graph, True)
    for out in model.graph.output:
        users.setdefault(out.name, []).append("graph output")
    return users


def _describe(model: onnx.ModelProto, label: str) -> str:
    if label.startswith("#"):
        node = model.graph.node[int(label[1:])]
        return f"{node.name or '?'} ({node.op_type})"
    return label


_FLOAT_TYPES = {1: np.float32, 10: np.float16}  # TensorProto.FLOAT, FLOAT16


def _plan(
    model: onnx.ModelProto,
    layers: dict[str, object],
    prefix: str,
    expected_shape: dict[str, tuple[int, int]],
) -> tuple[dict[str, list[_Site]], dict[str, str]]:
    """Match requested layers to traced calls; everything that cannot be rewritten gets its reason."""
    sites, problems = _scan(model, prefix)
    users = _consumers(model)
    inits = {t.name: t for t in model.graph.initializer}
    matched: dict[str, list[_Site]] = {}
    left: dict[str, str] = {}
    for name in layers:
        if name in problems:
            left[name] = problems[name]
            continue
        calls = sites.get(name)
        if not calls:
            left[name] = f"not in the graph (no traced Linear at {prefix + name!r})"
            continue
        if len({c.weight for c in calls}) > 1 or len({c.k_axis for c in calls}) > 1:
            left[name] = f"traced as {len(calls)} calls reading different weights"
            continue
        weight = calls[0].weight
        own = {f"#{c.index}" for c in calls}
        others = [u for u in users.get(weight, []) if u not in own]
        if others:
            left[name] = f"weight {weight} is shared with another node: {_describe(model, others[0])}"
            continue
        init = inits[weight]
        if init.data_type not in _FLOAT_TYPES:
            left[name] = f"weight {weight} has ONNX type {init.data_type}, not float32/float16"
            continue
        k, n = expected_shape[name]
        dims = tuple(init.dims)
        want = (k, n) if calls[0].k_axis == 0 else (n, k)
        if dims != want:
            left[name] = f"shape mismatch: graph weight {list(dims)}, quantized layer needs {list(want)}"
            continue
        matched[name] = calls
    return matched, left


def _weight_check(float_w: np.ndarray, deq_kn: np.ndarray, k_axis: int, max_error: float | None) -> str | None:
    """None if the representation plausibly quantizes this graph weight, else the reason."""
    if max_error is None:
        return None
    ref = float_w.astype(np.float32) if k_axis == 0 else float_w.astype(np.float32).T
    norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(deq_kn - ref))
    rel = err / norm if norm > 0 else err
    if not np.isfinite(rel) or rel > max_error:
        return f"quantized weight does not match the graph's (relative error {rel:.3g} > {max_error})"
    return None


class _Namer:
    """Fresh tensor / node names that collide with nothing already in the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        taken = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
        for node in model.graph.node:
            taken.update(node.output)
            taken.update(node.input)
            taken.add(node.name)
        self.taken = taken

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _copy_meta(dst: onnx.NodeProto, src: onnx.NodeProto) -> onnx.NodeProto:
    """New nodes carry the Linear's metadata (name scopes), so profiles and reports still say which layer they are."""
    for prop in src.metadata_props:
        if prop.key in (_SCOPES, _HIERARCHY, "namespace"):
            dst.metadata_props.add(key=prop.key, value=prop.value)
    return dst


def _working_copy(model: onnx.ModelProto, inplace: bool) -> onnx.ModelProto:
    import onnx

    if inplace:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _splice(
    model: onnx.ModelProto,
    before: dict[int, list[onnx.NodeProto]],
    new_inits: list[onnx.TensorProto],
    replaced: set[str],
) -> None:
    """Insert new nodes before the given graph positions, add initializers, and drop replaced float weights that
    nothing reads any more (callers only replace weights no other node uses)."""
    nodes = list(model.graph.node)
    out: list[onnx.NodeProto] = []
    for i, node in enumerate(nodes):
        out.extend(before.get(i, []))
        out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out)
    still_used = set(_consumers(model))
    keep = [t for t in model.graph.initializer if t.name not in replaced or t.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.initializer.extend(new_inits)
    dropped = replaced - still_used
    inputs = [v for v in model.graph.input if v.name not in dropped]  # old IR lists initializers as inputs too
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    dropped_vi = [v for v in model.graph.value_info if v.name not in dropped]
    if len(dropped_vi) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(dropped_vi)


def write_int8_qdq(
    model: onnx.ModelProto,
    layers: dict[str, Int8Linear],
    prefix: str = "",
    *,
    inplace: bool = False,
    share_activations: bool = True,
    max_weight_error: float | None = DEFAULT_MAX_WEIGHT_ERROR,
    base_dir: str = "",
) -> WriteResult:
    """W8A8 as explicit QDQ: per matched Linear, the float weight becomes an int8 initializer (``codes``) read through
    ``DequantizeLinear(codes, weight_scales[N], int8 zeros, axis=N's axis)``, and the activation input goes through
    ``QuantizeLinear(x, input_scale, int8 0)`` → ``DequantizeLinear``. Zero points are all 0 (TensorRT's explicit
    quantization accepts only symmetric). Opset stays as it is (Q/DQ-19 cover int8 per-axis; opset >= 19 required).
    The bias ``Add`` (or Gemm's C) stays float.

    ``share_activations``: Linears reading the same activation with the same scale (q/k/v) share one Q/DQ pair —
    one quantization of the tensor, the form TensorRT's Q/DQ propagation starts from. ONNX Runtime 1.32's CPU QDQ
    fusion, however, turns a MatMul into ``MatMulIntegerToFloat`` only when its Q feeds it alone (measured: shared
    q/k/v stay DQ → float MatMul, same numbers, no integer kernel); ``False`` writes one Q/DQ pair per call."""
    from onnx import helper, numpy_helper

    model = _working_copy(model, inplace)
    result = WriteResult(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 19:
        result.left_float = {name: f"model opset {opset} < 19 (per-axis int8 QDQ needs 19)" for name in layers}
        return result
    shapes = {name: (layer.k, layer.n) for name, layer in layers.items()}
    matched, result.left_float = _plan(model, dict(layers), prefix, shapes)
    inits = {t.name: t for t in model.graph.initializer}
    name_of = _Namer(model)
    before: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    weight_dq: dict[str, str] = {}
    for name in sorted(matched, key=lambda name: matched[name][0].index):
        layer, calls = layers[name], matched[name]
        init = inits[calls[0].weight]
        k_axis = calls[0].k_axis
        codes = np.asarray(layer.codes)
        scales = np.asarray(layer.weight_scales, dtype=np.float32).reshape(-1)
        scale_x = float(layer.input_scale)
        if codes.dtype != np.int8 or scales.shape != (layer.n,):
            result.left_float[name] = f"invalid Int8Linear (codes {codes.dtype}, scales {list(scales.shape)})"
            continue
        if not (np.all(np.isfinite(scales)) and np.all(scales > 0) and np.isfinite(scale_x) and scale_x > 0):
            result.left_float[name] = "non-positive or non-finite scale"
            continue
        reason = _weight_check(numpy_helper.to_array(init, base_dir), layer.dequantize(), k_axis, max_weight_error)
        if reason:
            result.left_float[name] = reason
            continue
        # weight: int8 codes in the graph weight's layout, one scale per output channel (the axis that is not K)
        w_codes, w_scale, w_zp, w_out = (
            name_of(f"{name}.weight_{s}") for s in ("int8", "scale", "zero_point", "dequantized")
        )
        new_inits += [
            numpy_helper.from_array(np.ascontiguousarray(codes if k_axis == 0 else codes.T), w_codes),
            numpy_helper.from_array(scales.astype(_FLOAT_TYPES[init.data_type]), w_scale),
            numpy_helper.from_array(np.zeros(layer.n, np.int8), w_zp),
        ]
        dq = helper.make_node(
            "DequantizeLinear", [w_codes, w_scale, w_zp], [w_out], name=name_of(f"{name}.weight_dq"), axis=1 - k_axis
        )
        before.setdefault(calls[0].index, []).append(_copy_meta(dq, calls[0].node))
        weight_dq[name] = w_out
        replaced.add(init.name)
        result.written.append(name)
    # activations: one Q/DQ pair per (tensor, scale), placed before its first reader — calls in graph order
    calls_in_order = sorted(((c, name) for name in weight_dq for c in matched[name]), key=lambda cn: cn[0].index)
    activation_dq: dict[tuple[str, bytes, int], str] = {}
    for call, name in calls_in_order:
        x, scale_x = call.node.input[0], np.float32(layers[name].input_scale)
        dtype = _FLOAT_TYPES[inits[call.weight].data_type]  # MatMul/Gemm: activation and weight share a type
        key = (x, scale_x.tobytes(), -1 if share_activations else call.index)
        if key not in activation_dq:
            a_scale, a_zp, a_q, a_dq = (
                name_of(f"{name}.input_{s}") for s in ("scale", "zero_point", "quantized", "dequantized")
            )
            new_inits += [
                numpy_helper.from_array(np.array(scale_x, dtype=dtype), a_scale),
                numpy_helper.from_array(np.array(0, np.int8), a_zp),
            ]
            q = helper.make_node("QuantizeLinear", [x, a_scale, a_zp], [a_q], name=name_of(f"{name}.input_q"))
            dqa = helper.make_node("DequantizeLinear", [a_q, a_scale, a_zp], [a_dq], name=name_of(f"{name}.input_dq"))
            before.setdefault(call.index, []).extend([_copy_meta(q, call.node), _copy_meta(dqa, call.node)])
            activation_dq[key] = a_dq
        call.node.input[0] = activation_dq[key]
        call.node.input[1] = weight_dq[name]
    _splice(model, before, new_inits, replaced)
    return result


def _graph_ops(model: onnx.ModelProto) -> set[str]:
    ops: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain in ("", "ai.onnx"):
                ops.add(node.op_type)
            for sub in _subgraphs(node):
                visit(sub)

    visit(model.graph)
    for fn in model.functions:
        ops.update(n.op_type for n in fn.node if n.domain in ("", "ai.onnx"))
    return ops


def ensure_opset(model: onnx.ModelProto, version: int = INT4_OPSET) -> onnx.ModelProto:
    """The model at default-domain opset >= ``version`` (IR >= 10), keeping the dynamo node metadata the writers
    read.

    From 20 to 21 every op change except GroupNormalization only widened type lists, so the import is bumped in
    place. Otherwise onnx's version converter is used — it drops every node's ``metadata_props``, so they are
    copied back by node name — and returns a new model."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= version:
        return model
    if current == version - 1 == 20 and not (_graph_ops(model) & _INCOMPATIBLE_20_21):
        for imports in [model.opset_import, *(fn.opset_import for fn in model.functions)]:
            for o in imports:
                if o.domain in ("", "ai.onnx") and o.version == current:
                    o.version = version
        model.ir_version = max(model.ir_version, _INT4_IR_VERSION)
        return model
    meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.name and n.metadata_props}
    converted = version_converter.convert_version(model, version)
    for node in converted.graph.node:
        for prop in meta.get(node.name, []) if not node.metadata_props else []:
            node.metadata_props.add(key=prop.key, value=prop.value)
    converted.ir_version = max(converted.ir_version, _INT4_IR_VERSION)
    return converted


def _int4_tensors(weight: Int4Weight, k_axis: int, dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes, scales, zero points) in the graph weight's layout, K padding dropped: signed INT4 (code - 8) and no
    zero point when symmetric, UINT4 codes with UINT4 zero points when asymmetric (8 bits: INT8 / UINT8 alike)."""
    import ml_dtypes

    codes = weight.codes()[:, : weight.k]  # [N, K] uint8 in 0..15 (0..255 for 8 bits)
    scales = weight.scales.astype(dtype)  # [N, k_blocks]
    signed, unsigned = (ml_dtypes.int4, ml_dtypes.uint4) if weight.bits == 4 else (np.int8, np.uint8)
    if weight.zero_points is None:
        q = (codes.astype(np.int16) - weight.symmetric_zero_point).astype(signed)
        # INT8: an explicit zero point of 0 — ONNX Runtime 1.32 with session.x64quantprecision=1 (the runtime's
        # setting) fails a blocked INT8 DequantizeLinear that has none ("x_zero_point must be null or have the same
        # rank as x"); with zeros of x's rank it runs, and the value is the same
        zp = None if weight.bits == 4 else np.zeros(weight.scales.shape, np.int8)
    else:
        q = codes.astype(unsigned)
        zp = weight.zero_points.astype(unsigned)
    if k_axis == 0:  # [K, N] like MatMul's weight
        q, scales = q.T, scales.T
        zp = None if zp is None else zp.T
    return (
        np.ascontiguousarray(q),
        np.ascontiguousarray(scales),
        None if zp is None else np.ascontiguousarray(zp),
    )


def write_int4_dq(
    model: onnx.ModelProto,
    layers: dict[str, Int4Weight],
    prefix: str = "",
    *,
    inplace: bool = False,
    max_weight_error: float | None = DEFAULT_MAX_WEIGHT_ERROR,
    base_dir: str = "",
) -> WriteResult:
    """INT4 weight-only as block-wise ``DequantizeLinear`` (opset 21): per matched Linear, the float weight becomes an
    INT4 initializer ``[K, N]`` (``[N, K]`` under a transB Gemm) read through ``DequantizeLinear(w, scale
    [ceil(K/block), N], axis=K's axis, block_size=block)``; the activation stays float.

    Symmetric weights are written as signed INT4 (code - 8) without a zero point — the form TensorRT's INT4
    weight-only path accepts. Asymmetric ones are UINT4 with UINT4 zero points: ONNX Runtime runs them, TensorRT
    (symmetric only) will not. The K padding of :class:`Int4Weight` is dropped (ONNX allows a partial last block).
    The model is raised to opset 21 (see :func:`ensure_opset`) only if a layer is written. ``base_dir``: where a
    graph loaded without its external data finds it (each float weight is read once, for the plausibility check)."""
    from onnx import helper, numpy_helper

    model = _working_copy(model, inplace)
    result = WriteResult(model)
    shapes = {name: (w.k, w.n) for name, w in layers.items()}
    matched, result.left_float = _plan(model, dict(layers), prefix, shapes)
    inits = {t.name: t for t in model.graph.initializer}
    name_of = _Namer(model)
    before: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    for name in sorted(matched, key=lambda name: matched[name][0].index):
        weight, calls = layers[name], matched[name]
        init = inits[calls[0].weight]
        k_axis = calls[0].k_axis
        scales = np.asarray(weight.scales)
        if not (np.all(np.isfinite(scales)) and np.all(scales > 0)):
            result.left_float[name] = "non-positive or non-finite scale"
            continue
        reason = _weight_check(numpy_helper.to_array(init, base_dir), weight.dequantize(), k_axis, max_weight_error)
        if reason:
            result.left_float[name] = reason
            continue
        q, s, zp = _int4_tensors(weight, k_axis, _FLOAT_TYPES[init.data_type])
        w_q, w_scale, w_out = (name_of(f"{name}.weight_{x}") for x in ("int4", "scale", "dequantized"))
        new_inits += [numpy_helper.from_array(q, w_q), numpy_helper.from_array(s, w_scale)]
        inputs = [w_q, w_scale]
        if zp is not None:
            w_zp = name_of(f"{name}.weight_zero_point")
            new_inits.append(numpy_helper.from_array(zp, w_zp))
            inputs.append(w_zp)
        dq = helper.make_node(
            "DequantizeLinear",
            inputs,
            [w_out],
            name=name_of(f"{name}.weight_dq"),
            axis=k_axis,
            block_size=weight.block_size,
        )
        before.setdefault(calls[0].index, []).append(_copy_meta(dq, calls[0].node))
        for call in calls:
            call.node.input[1] = w_out
        replaced.add(init.name)
        result.written.append(name)
    if result.written:
        _splice(model, before, new_inits, replaced)
        result.model = ensure_opset(model, INT4_OPSET)
    return result


def qdq_summary(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts a report (or a test) checks: Q / DQ / MatMul / Gemm, how many MatMul/Gemm read a dequantized
    weight (``quantized_weights``) and a dequantized activation (``quantized_activations``)."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    ops = Counter(node.op_type for node in model.graph.node)
    mm = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    return {
        "QuantizeLinear": ops["QuantizeLinear"],
        "DequantizeLinear": ops["DequantizeLinear"],
        "MatMul": ops["MatMul"],
        "Gemm": ops["Gemm"],
        "quantized_weights": sum(len(n.input) > 1 and producers.get(n.input[1]) == "DequantizeLinear" for n in mm),
        "quantized_activations": sum(producers.get(n.input[0]) == "DequantizeLinear" for n in mm),
    }

"""The ONNX Runtime–fused decoder: written op by op from the weights, with an in-place KV cache.

Why a second decoder graph: the traced (portable) decoder grows its cache by concatenation and repeats KV heads for
GQA — about 2,100 kernels per decode step for a 30-layer model, half of the step time outside the matrix products.
This graph uses ONNX Runtime's fused operators instead: ``GroupQueryAttention`` (rotary inside, GQA without
repetition, packed q|k|v input when INT4, and past/present *sharing one buffer*, so a step writes only its new
positions), ``SimplifiedLayer
Normalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm with the residual add). About a dozen kernels per
layer.

TensorRT does not run ``com.microsoft`` operators, so the bundle keeps the portable decoder for TensorRT (and any
other backend) next to this one; the manifest names both and the ONNX Runtime backend prefers this one. Their float
weights are the same ``[in, out]`` matrices (q, k, v, gate and up as separate matmuls, the LM head as ``Gemm`` with
``transB`` on the ``[vocab, hidden]`` table), so this graph's initializers point into the portable decoder's data file
instead of repeating it (``export/external_data.py``); INT4 layers keep q/k/v and gate/up side by side in one
``MatMulNBits`` each (small INT4 matmuls are overhead-bound) and are this graph's own.

Interface (all dims dynamic except the cache capacity ``C`` = the bundle's max length):
    inputs_embeds [B, S, E] · seqlens_k [B] int32 (cached + new length - 1, per row) · total_sequence_length []
    int32 · logits_index [N] int64 (flat indices in B×S of the positions whose logits are wanted: each row's last
    real token, or its last K for speculative decoding, N = B × K) · past_key_values.{i}.{key,value} [B, kv_heads,
    C, head_dim]
    → logits [N, vocab] · present.{i}.{key,value} (the same buffers, written in place)
Rows are packed from position 0 and right-padded (GroupQueryAttention's convention).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.export.external_data import ContentIndex, WeightWriter
from edgelvm.manifest import GraphSpec, KVCacheSpec, TensorSpec
from edgelvm.models.checkpoint.codes import Int4Weight
from edgelvm.models.llama_family import DecoderWeights

log = logging.getLogger(__name__)

#: The dim of ``logits_index`` and of the logits: how many positions' logits a step returns (``batch`` in bundles
#: written before speculative decoding asked for more than one per row; the gather was the same).
LOGITS_ROWS = "logits_rows"


def build_gqa_decoder(
    weights: DecoderWeights,
    kv: KVCacheSpec,
    path: Path,
    accuracy_level: int = 0,
    index: ContentIndex | None = None,
) -> GraphSpec:
    """Write the graph to ``path`` and its weights to ``path.name + ".data"``, one tensor at a time (never the whole
    decoder in memory). Weights whose bytes ``index`` already knows (the portable decoder's, in the same ``[in, out]``
    layout) are referenced where they lie instead of written again.

    ``accuracy_level``: MatMulNBits' (INT4 layers only): 0 computes in fp32, 4 quantizes activations to int8
    (faster on CPU, but it flips top tokens on some models — onnxruntime #29849; measure before using it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []
    writer = WeightWriter(path.with_name(path.name + ".data"), index)

    def init(name: str, array: np.ndarray) -> str:
        inits.append(writer.tensor(name, array.astype(np.float32, copy=False)))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: object) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, domain=domain, name=f"{op}_{len(nodes)}", **attrs))
        return outputs

    w = weights

    def matmul(x: str, name: str, dense: np.ndarray, q4: Any, out: str) -> str:
        """``x @ W``: MatMulNBits when the weight is INT4, else a plain MatMul."""
        if q4 is None:
            return node("MatMul", [x, init(name, dense)], [out])[0]
        qnode, q_inits = matmul_nbits_node(name, x, out, q4, accuracy_level)
        nodes.append(qnode)
        inits.extend(writer.tensor(t.name, numpy_helper.to_array(t)) for t in q_inits)
        return out

    def projections(x: str, p: str, parts: list[tuple[str, np.ndarray]], fused: str, q4: Any) -> list[str]:
        """``x`` through side-by-side projections: one MatMulNBits and a Split when INT4 (small INT4 matmuls are
        overhead-bound), else one MatMul per part — the portable decoder's matrices, so both graphs share them."""
        if q4 is None:
            return [matmul(x, p + part, dense, None, p + part + "_out") for part, dense in parts]
        joined = matmul(x, p + fused, None, q4, p + fused + "_out")
        sizes = int_init(p + fused + "_split", [dense.shape[1] for _, dense in parts])
        return node("Split", [joined, sizes], [p + part + "_out" for part, _ in parts], axis=-1)

    def int_init(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    flat_shape = int_init("flat_shape", [-1, w.final_norm.shape[0]])
    cos, sin = init("cos_cache", w.cos), init("sin_cache", w.sin)

    hidden = "inputs_embeds"
    normed = node(
        "SimplifiedLayerNormalization",
        [hidden, init("l0.input_norm", w.layers[0].input_norm)],
        ["l0.normed"],
        axis=-1,
        epsilon=w.rms_eps,
    )[0]
    past_names, present_names = [], []
    for i, layer in enumerate(w.layers):
        p = f"l{i}."
        if layer.int4.get("qkv") is not None:  # packed: GroupQueryAttention splits q|k|v itself (no Split kernel)
            q = matmul(normed, p + "qkv", None, layer.int4["qkv"], p + "qkv_out")
            k = v = ""
            if layer.qkv_bias is not None:
                q = node("Add", [q, init(p + "qkv_bias", np.concatenate(layer.qkv_bias))], [p + "qkv_biased"])[0]
        else:
            q, k, v = projections(normed, p, [("q", layer.q), ("k", layer.k), ("v", layer.v)], "qkv", None)
            if layer.qkv_bias is not None:
                q, k, v = (
                    node("Add", [x, init(p + f"{part}_bias", bias)], [p + f"{part}_biased"])[0]
                    for x, part, bias in zip((q, k, v), "qkv", layer.qkv_bias)
                )
        past_k, past_v = kv.past_name.format(layer=i, kind="key"), kv.past_name.format(layer=i, kind="value")
        pres_k, pres_v = kv.present_name.format(layer=i, kind="key"), kv.present_name.format(layer=i, kind="value")
        past_names += [past_k, past_v]
        present_names += [pres_k, pres_v]
        attn = node(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, "seqlens_k", "total_sequence_length", cos, sin],
            [p + "attn", pres_k, pres_v],
            domain="com.microsoft",
            num_heads=w.num_heads,
            kv_num_heads=w.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=w.scale,
        )[0]
        o = matmul(attn, p + "o_proj", layer.o_proj, layer.int4.get("o_proj"), p + "o")
        normed, hidden = node(
            "SkipSimplifiedLayerNormalization",
            [o, hidden, init(p + "post_norm", layer.post_norm)],
            [p + "mlp_in", "", "", p + "resid1"],
            domain="com.microsoft",
            epsilon=w.rms_eps,
        )[0::3]
        mlp_parts = [("gate", layer.gate), ("up", layer.up)]
        gate, up = projections(normed, p, mlp_parts, "gate_up", layer.int4.get("gate_up"))
        sig = node("Sigmoid", [gate], [p + "sig"])[0]
        act = node("Mul", [gate, sig], [p + "silu"])[0]
        prod = node("Mul", [act, up], [p + "prod"])[0]
        down = matmul(prod, p + "down", layer.down, layer.int4.get("down"), p + "down_out")
        next_norm = w.layers[i + 1].input_norm if i + 1 < len(w.layers) else w.final_norm
        norm_name = f"l{i + 1}.input_norm" if i + 1 < len(w.layers) else "final_norm"
        normed, hidden = node(
            "SkipSimplifiedLayerNormalization",
            [down, hidden, init(norm_name, next_norm)],
            [p + "next_in", "", "", p + "resid2"],
            domain="com.microsoft",
            epsilon=w.rms_eps,
        )[0::3]

    # Logits of the positions asked for only: flatten [B, S, E] → [B*S, E], gather N rows, project.
    flat = node("Reshape", [normed, flat_shape], ["flat_hidden"])[0]
    last = node("Gather", [flat, "logits_index"], ["last_hidden"], axis=0)[0]
    if w.lm_head_codes is None:
        node("Gemm", [last, init("lm_head", w.lm_head)], ["logits"], transB=1)  # [vocab, hidden], as the portable one
    else:  # block-wise INT4/INT8 codes: the largest matrix a decode step reads
        matmul(last, "lm_head", None, w.lm_head_codes, "logits")
        if w.lm_head_codes.bits == 8 and accuracy_level == 0:
            log.warning("fused decoder: ONNX Runtime's CPU MatMulNBits has no fast 8-bit kernel at accuracy_level 0 "
                        "(measured ~9x slower decode than INT4 on a SmolLM2-135M shape); quantize with --lm-head int4 "
                        "or export with --int4-accuracy-level 4")  # fmt: skip

    hidden_size, vocab = w.final_norm.shape[0], w.lm_head.shape[0]
    kv_shape = ["batch", kv.num_kv_heads, kv.max_length, kv.head_dim]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", hidden_size]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, [LOGITS_ROWS]),
        *[helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in past_names],
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [LOGITS_ROWS, vocab]),
        *[helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in present_names],
    ]
    graph = helper.make_graph(nodes, "edgelvm_gqa_decoder", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    writer.close()
    onnx.save_model(model, str(path))  # the protobuf holds names and shapes; the weights are in the data file(s)
    log.info(
        "fused decoder: %.1f MB written, %.1f MB shared with the portable decoder",
        writer.written_bytes / 1e6,
        writer.shared_bytes / 1e6,
    )
    spec_in = [
        TensorSpec("inputs_embeds", "float32", ["batch", "seq", hidden_size]),
        TensorSpec("seqlens_k", "int32", ["batch"]),
        TensorSpec("total_sequence_length", "int32", []),
        TensorSpec("logits_index", "int64", [LOGITS_ROWS]),
        *[TensorSpec(n, "float32", kv_shape) for n in past_names],
    ]
    spec_out = [
        TensorSpec("logits", "float32", [LOGITS_ROWS, vocab]),
        *[TensorSpec(n, "float32", kv_shape) for n in present_names],
    ]
    log.info("fused decoder: %d nodes", len(nodes))
    precision = "int4" if any(layer.int4 for layer in w.layers) or w.lm_head_codes is not None else "fp32"
    return GraphSpec(file=path.name, kind="onnx-ort-gqa", precision=precision, inputs=spec_in, outputs=spec_out)


def matmul_nbits_node(
    name: str, activation: str, output: str, weight: Int4Weight, accuracy_level: int = 0
) -> tuple[object, list[object]]:
    """An ONNX ``com.microsoft.MatMulNBits`` node and its initializers for ``activation @ weight`` (4 or 8 bits)."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(weight.packed, f"{name}.q4"),
        numpy_helper.from_array(weight.scales.reshape(-1), f"{name}.scales"),
    ]
    inputs = [activation, f"{name}.q4", f"{name}.scales"]
    zp = weight.zero_points_packed()
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, f"{name}.zp"))
        inputs.append(f"{name}.zp")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        [output],
        name=name,
        domain="com.microsoft",
        K=weight.k,
        N=weight.n,
        bits=weight.bits,
        block_size=weight.block_size,
        accuracy_level=accuracy_level,
    )
    return node, inits

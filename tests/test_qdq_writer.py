"""The quantize stage's ONNX writers (edgelvm.export.qdq) on real dynamo exports: which MatMul is which Linear, INT8
QDQ computing exactly fake-quant(x) @ dequantize(W), block-wise INT4 DQ computing x @ dequantize(W), and layers the
writers cannot handle left in float with a reason."""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import math
import warnings

import numpy as np
import pytest

from edgelvm.export.qdq import ensure_opset, linear_matmuls, qdq_summary, write_int4_dq, write_int8_qdq
from edgelvm.models.checkpoint.codes import Int8Linear
from edgelvm.quantize.int4 import quantize_rtn
from edgelvm.quantize.int8 import activation_scale, fake_quantize_activation, quantize_weight_int8

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

D, HIDDEN = 64, 96  # fc2 has K = 96: one full and one partial block at block size 64


class Block(torch.nn.Module):
    """LayerNorm → q/k/v reading the same tensor → attention; GELU MLP with biases (a CLIP layer in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(D, D) for _ in range(3))
        self.fc1, self.fc2 = torch.nn.Linear(D, HIDDEN), torch.nn.Linear(HIDDEN, D)

    def forward(self, x):
        h = self.norm(x)
        scores = self.q_proj(h) @ self.k_proj(h).transpose(-1, -2) / math.sqrt(D)
        x = x + torch.softmax(scores, -1) @ self.v_proj(h)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Net(torch.nn.Module):
    """The block under a prefix, plus a head on the last position: a 2-D input, traced as Gemm (like lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = Block()
        self.head = torch.nn.Linear(D, 10)

    def forward(self, x):
        y = self.block(x)
        return y, self.head(y[:, -1, :])


def _export(module, x) -> onnx.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (x,),
            dynamo=True,
            opset_version=20,
            input_names=["x"],
            dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},),
        )
    return program.model_proto


def _run(model, feeds, level="all", config=None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def traced():
    """(net, its linears, an input, the traced float graph, each linear's input amax on that input)."""
    net = Net().eval()
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    linears = {name: m for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    amax: dict[str, float] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: amax.__setitem__(name, float(args[0].abs().max())))
        for name, m in linears.items()
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return net, linears, x, _export(net, x), amax


def _dequantized_outputs(net, weights, x) -> list[np.ndarray]:
    """``net``'s outputs with each layer in ``weights`` computing its dequantized INT4 weight (the reference)."""
    ref = copy.deepcopy(net)
    for name, m in ref.named_modules():
        if name in weights:
            m.weight.data = torch.from_numpy(weights[name].dequantize().T.copy())
    with torch.no_grad():
        return [t.numpy() for t in ref(x)]


def _weight_kn(linear) -> np.ndarray:
    return linear.weight.detach().numpy().T.copy()  # [K, N], the MatMul layout the representations use


def test_linear_matmuls_finds_every_linear_by_path(traced):
    _, linears, _, model, _ = traced
    inits = {t.name: t for t in model.graph.initializer}
    found = linear_matmuls(model)
    assert set(found) == set(linears)  # block.q_proj ... block.fc2, head
    for name, node in found.items():
        k, n = linears[name].in_features, linears[name].out_features
        if name == "head":  # 2-D input: Gemm with the untransposed [N, K] weight
            assert node.op_type == "Gemm" and list(inits[node.input[1]].dims) == [n, k]
        else:  # 3-D input: MatMul with the transpose folded into a [K, N] initializer
            assert node.op_type == "MatMul" and list(inits[node.input[1]].dims) == [k, n]
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[node.input[1]]), _weight_kn(linears[name]))
    # the q/k/v MatMuls read the same LayerNorm output
    assert len({found[f"block.{p}"].input[0] for p in ("q_proj", "k_proj", "v_proj")}) == 1
    # prefix stripped, paths outside it ignored
    assert set(linear_matmuls(model, "block.")) == {"q_proj", "k_proj", "v_proj", "fc1", "fc2"}
    # a graph without dynamo's metadata: nothing found, nothing raised
    bare = copy.deepcopy(model)
    for node in bare.graph.node:
        del node.metadata_props[:]
    assert linear_matmuls(bare) == {}


def _int8_layers(linears, amax) -> dict[str, Int8Linear]:
    layers = {}
    for name, m in linears.items():
        codes, scales = quantize_weight_int8(_weight_kn(m))
        layers[name] = Int8Linear(codes, scales, activation_scale(amax[name]), m.bias.detach().numpy())
    return layers


def _fake_quant_reference(net, layers, x):
    """The torch module with dequantized weights and fake-quantized Linear inputs; also each Linear's input codes."""
    ref = copy.deepcopy(net)
    codes: dict[str, np.ndarray] = {}
    ratios: dict[str, np.ndarray] = {}

    def hook(_m, args, name):
        a, s = args[0].numpy(), layers[name].input_scale
        ratios[name] = a / np.float32(s)
        codes[name] = np.clip(np.rint(ratios[name]), -128, 127).astype(np.int8)
        return (torch.from_numpy(fake_quantize_activation(a, s)),)

    for name, m in ref.named_modules():
        if name in layers:
            m.weight.data = torch.from_numpy(layers[name].dequantize().T.copy())
            m.register_forward_pre_hook(lambda _m, args, name=name: hook(_m, args, name))
    with torch.no_grad():
        outputs = [t.numpy() for t in ref(x)]
    return outputs, codes, ratios


def _layer_of(node) -> str:
    """The Linear a writer's node belongs to: it copies the MatMul's dynamo name scopes."""
    meta = {p.key: p.value for p in node.metadata_props}
    return ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])[-2]


def _with_q_outputs(model):
    """The model with every QuantizeLinear's int8 output also a graph output, keyed by the layer (metadata)."""
    exposed = copy.deepcopy(model)
    names = []
    for node in exposed.graph.node:
        if node.op_type == "QuantizeLinear":
            names.append(_layer_of(node))
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.INT8, None))
    return exposed, names


@pytest.mark.parametrize("level", ["none", "all"])
def test_int8_qdq_computes_fake_quantized_matmuls(traced, level):
    """Against the torch module with dequantized weights and fake-quantized inputs.

    Tolerance: both sides compute the same integer codes and the same float products, so the only differences are
    float32 summation order (~1e-7 relative) — and, rarely, an activation that sits on a rounding boundary (x/s within
    ~1e-6 of k + 0.5) lands on different sides in torch and ORT, which moves outputs by a whole step. The test first
    compares the codes every QuantizeLinear produced with the reference's: equal everywhere except (if at all) such
    boundary cases; with equal codes, outputs must agree to 1e-5 relative. Measured: codes all equal, 6e-8."""
    net, linears, x, model, amax = traced
    layers = _int8_layers(linears, amax)
    result = write_int8_qdq(model, layers)
    assert sorted(result.written) == sorted(layers) and result.left_float == {}
    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.opset_import[0].version == 20  # Q/DQ-19 per-axis int8: no opset change
    summary = qdq_summary(result.model)
    # q/k/v share one Q/DQ pair: 4 activation quantizers for 6 Linears; 6 weight DQs + 4 activation DQs
    assert summary["QuantizeLinear"] == 4 and summary["DequantizeLinear"] == 10
    assert summary["quantized_weights"] == 6 and summary["quantized_activations"] == 6
    # the float weights are gone; int8 codes with zero points of 0 only
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert not any(v.dtype == np.float32 and v.ndim == 2 for v in inits.values())
    zero_points = [inits[n.input[2]] for n in result.model.graph.node if n.op_type.endswith("QuantizeLinear")]
    assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)

    reference, ref_codes, ratios = _fake_quant_reference(net, layers, x)
    exposed, q_layers = _with_q_outputs(result.model)
    outputs = _run(exposed, {"x": x.numpy()}, level)
    y, logits, q_codes = outputs[0], outputs[1], outputs[2:]
    flips = 0
    for name, got in zip(q_layers, q_codes):
        differ = got != ref_codes[name]
        frac = np.abs(ratios[name] - np.floor(ratios[name]) - 0.5)
        assert np.all(np.abs(got.astype(int) - ref_codes[name])[differ] == 1) and np.all(frac[differ] < 1e-3), name
        flips += int(differ.sum())
    if flips == 0:
        assert _rel(y, reference[0]) < 1e-5 and _rel(logits, reference[1]) < 1e-5
    with torch.no_grad():
        float_y, float_logits = (t.numpy() for t in net(x))
    # it really is quantized: measured 3.6e-3 / 5.1e-3 from the float model, 1e-7 from the reference
    assert _rel(y, float_y) > 1e-3 and _rel(logits, float_logits) > 1e-3


def test_int8_unshared_activation_qdq_fuses_to_integer_matmuls(traced, tmp_path):
    """One Q/DQ per call: ONNX Runtime's CPU fusion then runs every MatMul Linear as MatMulIntegerToFloat (int8 x
    int8, int32 accumulation — exact with the runtime's session settings), with the same outputs."""
    from edgelvm.runtime.session_settings import SessionSettings

    net, linears, x, model, amax = traced
    layers = _int8_layers(linears, amax)
    result = write_int8_qdq(model, layers, share_activations=False)
    assert qdq_summary(result.model)["QuantizeLinear"] == 6
    reference, _, _ = _fake_quant_reference(net, layers, x)
    # as the runtime runs it: without session.x64quantprecision, x86 CPUs without VNNI sum u8 x s8 pairs in
    # saturating int16 (measured here: 8e-2 off the reference)
    opts = SessionSettings(threads=0, spinning=False).apply_numerics(ort.SessionOptions())
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # the QDQ fusions, portable
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(result.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y, logits = sess.run(None, {"x": x.numpy()})
    assert _rel(y, reference[0]) < 1e-5 and _rel(logits, reference[1]) < 1e-5
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("MatMulIntegerToFloat") == 5  # q, k, v, fc1, fc2 (the head's Gemm stays DQ → Gemm)
    # shared or not, the same numbers: unoptimized, both run DQ → float MatMul on identical codes, bit for bit
    shared = write_int8_qdq(model, layers)
    feeds = {"x": x.numpy()}
    assert all(
        np.array_equal(a, b) for a, b in zip(_run(shared.model, feeds, "none"), _run(result.model, feeds, "none"))
    )


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [32, 64])
def test_int4_dq_computes_dequantized_matmuls(traced, symmetric, block):
    """Against the torch module with dequantized weights: only float summation order differs (measured ≤ 2.4e-7
    relative). ORT's default CPU fusion turns DQ + MatMul into MatMulNBits with accuracy_level 4 (int8 activations,
    measured 1.4e-3-2.9e-3 relative here), so the check runs unoptimized, and optimized with accuracy level 0."""
    net, linears, x, model, _ = traced
    weights = {name: quantize_rtn(_weight_kn(m), block, symmetric) for name, m in linears.items()}
    result = write_int4_dq(model, weights)
    assert sorted(result.written) == sorted(weights) and result.left_float == {}
    assert [(o.domain, o.version) for o in result.model.opset_import] == [("", 21)]
    assert result.model.ir_version >= 10
    assert linear_matmuls(model) and model.opset_import[0].version == 20  # the input model is left alone
    onnx.checker.check_model(result.model, full_check=True)
    assert qdq_summary(result.model)["quantized_weights"] == 6
    assert qdq_summary(result.model)["QuantizeLinear"] == 0  # weight-only

    inits = {t.name: t for t in result.model.graph.initializer}
    int4 = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
    for node in result.model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = inits[node.input[0]]
        assert w.data_type == int4 and attrs["block_size"] == block
        assert len(node.input) == (2 if symmetric else 3)  # symmetric: no zero point at all
        name = _layer_of(node)
        q = weights[name]
        k_axis = attrs["axis"]
        assert list(w.dims) == ([q.k, q.n] if k_axis == 0 else [q.n, q.k])  # K padding dropped
        assert list(inits[node.input[1]].dims)[k_axis] == -(-q.k // block)
        codes = q.codes()[:, : q.k].astype(np.int16)  # [N, K], 0..15
        expected = codes - 8 if symmetric else codes
        got = onnx.numpy_helper.to_array(w).astype(np.int16)  # the packed nibbles, read back by onnx
        np.testing.assert_array_equal(got, expected.T if k_axis == 0 else expected)

    reference = _dequantized_outputs(net, weights, x)
    with torch.no_grad():
        float_y = net(x)[0].numpy()
    for outputs in (
        _run(result.model, {"x": x.numpy()}, "none"),
        _run(result.model, {"x": x.numpy()}, "all", {"session.qdq_matmulnbits_accuracy_level": "0"}),
    ):
        assert _rel(outputs[0], reference[0]) <= 1e-4 and _rel(outputs[1], reference[1]) <= 1e-4
        assert _rel(outputs[0], float_y) > 1e-2  # INT4: measured 0.022-0.027 from the float model
    size = sum(len(t.raw_data) for t in result.model.graph.initializer)
    assert size < 0.3 * sum(len(t.raw_data) for t in model.graph.initializer)  # float weights removed


class Tied(torch.nn.Module):
    """``b`` shares ``a``'s weight but reads another tensor. The exporter keeps one initializer for both when it
    deduplicates (measured: 32x32 shared, 64x64 copied); the test makes sure by pointing b at a's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = torch.nn.Linear(D, D, bias=False), torch.nn.Linear(D, D, bias=False)
        self.b.weight = self.a.weight
        self.c = torch.nn.Linear(D, D)
        self.d = torch.nn.Linear(D, D)

    def forward(self, x):
        return self.d(self.c(self.a(x) + self.b(torch.relu(x))))


@pytest.mark.parametrize("writer", ["int8", "int4"])
def test_layers_the_writer_cannot_handle_are_left_float_with_a_reason(writer):
    net = Tied().eval()
    x = torch.randn(1, 5, D, generator=torch.Generator().manual_seed(3))
    model = _export(net, x)
    found = linear_matmuls(model)
    found["b"].input[1] = found["a"].input[1]  # one initializer read by both MatMuls
    rng = np.random.default_rng(0)

    def rep(w: np.ndarray):
        if writer == "int4":
            return quantize_rtn(w, 32)
        codes, scales = quantize_weight_int8(w)
        return Int8Linear(codes, scales, 0.05)

    write = write_int8_qdq if writer == "int8" else write_int4_dq
    layers = {
        "a": rep(_weight_kn(net.a)),  # weight shared with b's MatMul
        "c": rep(_weight_kn(net.c)),  # fine: written
        "d": rep(rng.normal(size=(D, D)).astype(np.float32)),  # right shape, not this layer's weight
        "vision_tower.fc9": rep(rng.normal(size=(D, D)).astype(np.float32)),  # not in the graph
    }
    result = write(model, layers)
    assert result.written == ["c"]
    assert set(result.left_float) == {"a", "d", "vision_tower.fc9"}
    assert "shared with another node" in result.left_float["a"]
    assert "does not match" in result.left_float["d"]
    assert "not in the graph" in result.left_float["vision_tower.fc9"]
    assert all("\n" not in reason for reason in result.left_float.values())
    # a shape mismatch (e.g. a pruned layer against an unpruned graph)
    mismatch = write(model, {"c": rep(rng.normal(size=(D, D // 2)).astype(np.float32))})
    assert mismatch.written == [] and "shape mismatch" in mismatch.left_float["c"]
    assert mismatch.model.SerializeToString() == model.SerializeToString()  # nothing written, nothing changed
    # writing again: the layer is already quantized
    again = write(result.model, {"c": layers["c"]})
    assert again.written == [] and "computed weight (from DequantizeLinear)" in again.left_float["c"]
    # the partly written model still runs, and the float layers are untouched
    onnx.checker.check_model(result.model, full_check=True)
    a_weight = {n.input[1] for n in result.model.graph.node if n.op_type == "MatMul"}
    assert len(a_weight & {t.name for t in result.model.graph.initializer}) == 2  # a/b's shared one and d's
    assert np.isfinite(_run(result.model, {"x": x.numpy()})[0]).all()


def test_real_llava_decoder_every_text_linear_is_found_and_int4_runs(tiny_checkpoints, tiny_bundles):
    """The tiny LLaVA's traced KV-cache decoder (the portable ``decoder.onnx`` of the shared bundle):
    every language-model Linear is found under ``language_model.``; INT4 of all of them matches the same graph with
    the float weights replaced by the dequantized ones."""
    checkpoint, bundle = tiny_checkpoints["llama-clip"], tiny_bundles["llama-clip"]
    model = onnx.load(str(bundle / "decoder.onnx"))
    config = json.loads((checkpoint / "config.json").read_text())["text_config"]
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    projections += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = {f"layers.{i}.{p}" for i in range(config["num_hidden_layers"]) for p in projections}
    found = linear_matmuls(model, "language_model.")
    assert set(found) == expected
    assert linear_matmuls(model)["lm_head"].op_type == "Gemm"  # outside the prefix, found without it

    inits = {t.name: t for t in model.graph.initializer}
    weights = {name: quantize_rtn(onnx.numpy_helper.to_array(inits[n.input[1]]), 32) for name, n in found.items()}
    result = write_int4_dq(model, weights, "language_model.")
    assert sorted(result.written) == sorted(expected) and result.left_float == {}
    onnx.checker.check_model(result.model, full_check=True)
    # reference: the float graph, its weight initializers replaced by the dequantized values
    reference = copy.deepcopy(model)
    by_name = {found[name].input[1]: w for name, w in weights.items()}
    for t in reference.graph.initializer:
        if t.name in by_name:
            t.CopyFrom(onnx.numpy_helper.from_array(by_name[t.name].dequantize(), t.name))
    rng = np.random.default_rng(0)
    heads, head_dim = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    past, seq = 3, 4
    feeds = {
        "inputs_embeds": rng.normal(size=(1, seq, config["hidden_size"])).astype(np.float32),
        "attention_mask": np.ones((1, past + seq), np.int64),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
    }
    for i in range(config["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.normal(size=(1, heads, past, head_dim)).astype(np.float32)
    got = _run(result.model, feeds, "none")
    want = _run(reference, feeds, "none")
    floats = _run(model, feeds, "none")
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-4
    assert _rel(got[0], floats[0]) > 1e-3  # logits really changed


@pytest.mark.parametrize("group_norm", [False, True])
def test_ensure_opset_21_keeps_the_node_metadata(group_norm):
    """20 → 21 is a plain import bump unless GroupNormalization (changed in 21) is present; then onnx's version
    converter runs, which drops every node's metadata_props — they must come back (the writers find layers by them)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    nodes[0].metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'fc', 'linear']")
    nodes[0].metadata_props.add(key="pkg.torch.onnx.class_hierarchy", value="['M', 'Linear', 'aten.linear.default']")
    inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
    if group_norm:
        nodes.append(helper.make_node("GroupNormalization", ["y4", "s", "b"], ["z"], name="gn", num_groups=2))
        nodes.insert(1, helper.make_node("Unsqueeze", ["y", "axes"], ["y4"], name="unsq"))
        inits += [numpy_helper.from_array(np.array([3], np.int64), "axes")]
        inits += [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("s", "b")]
    out, shape = ("z", [1, 4, 4, 1]) if group_norm else ("y", [1, 4, 4])
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    assert set(linear_matmuls(model)) == {"fc"}
    bumped = ensure_opset(model, 21)
    assert bumped.opset_import[0].version == 21 and (bumped is model) == (not group_norm)
    onnx.checker.check_model(bumped, full_check=True)
    assert set(linear_matmuls(bumped)) == {"fc"}


def test_rewrite_of_a_graph_with_external_data_reads_weights_from_disk_and_drops_the_replaced_ones(traced, tmp_path):
    """``GraphRewrite.rewrite_file`` on a graph saved with external data (as real-size exports are): the graph is
    loaded without its data, the writer reads each float weight it replaces from disk, and the rewritten graph's
    data file holds the INT4 codes and the weights kept float — not the replaced fp32 ones (compacted)."""
    from edgelvm.export.quantized import _int4_writer
    from edgelvm.export.rewrite import GraphRewrite

    net, linears, x, model, _ = traced
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    float_bytes = (tmp_path / "g.onnx.data").stat().st_size
    weights = {name: quantize_rtn(_weight_kn(m), 32, True) for name, m in linears.items() if name != "head"}
    rewrite = GraphRewrite("int4", 1e-4, _int4_writer(weights))
    rewrite.rewrite_file(path, "")
    assert rewrite.summary["written"] == 5 and rewrite.summary["left_float"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]  # the side file is gone
    from edgelvm.export.external_data import ALIGNMENT, external_info

    replaced = sum(m.weight.numel() * 4 for name, m in linears.items() if name in weights)
    regions = [external_info(t) for t in onnx.load(str(path), load_external_data=False).graph.initializer]
    stored = sum(r.length for r in regions if r is not None)
    assert stored < float_bytes - replaced + replaced / 4  # INT4 codes + scales in place of the fp32 weights
    assert (tmp_path / "g.onnx.data").stat().st_size <= stored + ALIGNMENT * len(regions)  # nothing else in it
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # fp32 compute (see above)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    reference = _dequantized_outputs(net, weights, x)
    outputs = sess.run(None, {"x": x.numpy()})
    assert _rel(outputs[0], reference[0]) <= 1e-4 and _rel(outputs[1], reference[1]) <= 1e-4

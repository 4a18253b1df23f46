"""A quantized LM head (block-wise INT4/INT8) and token table (INT8 rows, or a tied head's codes): the codes as
ONNX Runtime and the runtime's gather read them, the agreement report, export into both decoders and the runtime's
greedy tokens against the quantized checkpoint's own ``generate``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgelvm.errors import ConfigError
from edgelvm.quantize.int4 import per_channel_block, quantize_rtn


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_block_wise_int8_matmulnbits_equals_the_dequantized_matmul(block, symmetric):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgelvm.export.gqa_decoder import matmul_nbits_node

    rng = np.random.default_rng(block)
    k, n = 96, 40
    w = rng.normal(size=(k, n)).astype(np.float32)
    q = quantize_rtn(w, block, symmetric, bits=8)
    assert q.bits == 8 and q.packed.shape == (n, -(-k // block), block)
    assert np.abs(q.dequantize() - w).max() <= q.scales.max() / 2 + 1e-6  # within half a step
    node, inits = matmul_nbits_node("w", "x", "y", q)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(3, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ q.dequantize(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("bits", "per_row"), [(8, True), (4, False), (8, False)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_runtime_gathers_exactly_the_rows_of_a_coded_table(tmp_path, bits, per_row, symmetric):
    """The torch-free gather (what a prompt's embeddings come from) equals the codes' dequantized rows."""
    from edgelvm.manifest import GraphSpec
    from edgelvm.runtime.embeddings import EmbeddingTable

    width, vocab = 72, 50
    table = np.random.default_rng(bits).normal(size=(vocab, width)).astype(np.float32)
    q = quantize_rtn(table.T, per_channel_block(width) if per_row else 32, symmetric, bits=bits)
    np.save(tmp_path / "embed.npy", q.packed)
    np.save(tmp_path / "embed_scales.npy", q.scales)
    codes = {"bits": bits, "block_size": q.block_size, "width": width, "scales": "embed_scales.npy",
             "zero_points": None}  # fmt: skip
    if not symmetric:
        np.save(tmp_path / "embed_zero_points.npy", q.zero_points)
        codes["zero_points"] = "embed_zero_points.npy"
    gather = EmbeddingTable(tmp_path, GraphSpec(file="embed.npy", kind="table", codes=codes))
    ids = np.array([0, 7, 7, 49, 3])
    rows = gather.rows(ids, np.float32)
    np.testing.assert_array_equal(rows, q.dequantize_rows(ids))
    assert np.abs(rows - table[ids]).max() <= q.scales.max() / 2 + 1e-6


@pytest.fixture(scope="module")
def head_int4(tiny_checkpoints, calib_records, tmp_path_factory):
    from edgelvm.quantize import RTNConfig, quantize

    out = tmp_path_factory.mktemp("head") / "rtn"
    report = quantize(str(tiny_checkpoints["llama-clip"]), calib_records,
                      RTNConfig(group_size=32, lm_head="int4", embeddings="int8"), out=out)  # fmt: skip
    return out, report


def test_quantized_head_is_reported_by_its_agreement_with_the_float_head(head_int4):
    out, report = head_int4
    head = report.lm_head
    assert head["format"] == "int4 g32" and head["scored_positions"] > 100
    assert 0.5 <= head["top1_agreement"] <= 1.0 and 0 < head["output_error"] < 0.5
    saved = json.loads((out / "quant_report.json").read_text())
    rows = {r["name"]: r for r in saved["layers"]}
    assert rows["lm_head"]["bits"] == 4 and rows["embed_tokens"]["bits"] == 8
    assert not any(line.startswith(("lm_head", "token embedding")) for line in saved["kept_float"])
    record = json.loads((out / "config.json").read_text())["edgelvm_quantization"]["llm"]
    assert record["lm_head"]["bits"] == 4 and record["lm_head"]["top1_agreement"] == head["top1_agreement"]
    assert record["embeddings"] == {"bits": 8, "block": "row"}


def test_quantized_head_and_table_export_into_both_decoders_and_answer_as_the_checkpoint(
    head_int4, tmp_path, test_images
):
    import onnx
    import torch

    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from edgelvm.models.checkpoint.quantized import load_int4
    from edgelvm.runtime import VLM

    out, _ = head_int4
    result = export(out, tmp_path / "bundle", ExportConfig(max_length=128))
    graphs = result.manifest.graphs
    assert graphs["decoder"].parity["max_rel"] < 1e-4
    assert graphs["embed"].precision == "int8" and graphs["embed"].codes["block_size"] == graphs["embed"].codes["width"]
    ops = {f: [n.op_type for n in onnx.load(str(result.bundle_dir / f), load_external_data=False).graph.node]
           for f in ("decoder.onnx", "decoder_ort.onnx")}  # fmt: skip
    assert ops["decoder.onnx"].count("DequantizeLinear") == 14 + 1  # the layers' linears and the head
    assert ops["decoder_ort.onnx"].count("MatMulNBits") == 4 * 2 + 1 and "Gemm" not in ops["decoder_ort.onnx"]

    adapter = load_model(str(out))
    table = load_int4(out, only=("embed_tokens",))["embed_tokens"]
    vlm = VLM.load(result.bundle_dir, decoder="fused")
    ids = np.arange(0, adapter.input_embeddings().weight.shape[0], 37)
    np.testing.assert_allclose(vlm._token_embeds(ids), adapter.input_embeddings().weight[ids].detach().numpy(),
                               rtol=0, atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(vlm._token_embeds(ids), table.dequantize_rows(ids))
    portable = VLM.load(result.bundle_dir, decoder="portable")
    for image in test_images[:2]:
        vlm.generate(image, "Describe the image.", max_new_tokens=10)
        portable.generate(image, "Describe the image.", max_new_tokens=10)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        prompt = adapter.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = adapter.processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            expected = adapter.model.generate(**inputs, max_new_tokens=10, do_sample=False)
        assert vlm.last_output_ids[0] == expected[0, inputs["input_ids"].shape[1] :].tolist()
        assert portable.last_output_ids == vlm.last_output_ids


def test_a_tied_head_is_stored_once_as_the_tables_codes(tmp_path, calib_records):
    """Tied: quantizing the head quantizes the table; the bundle's table is the head's codes and the fused
    decoder's MatMulNBits reads those same bytes (no second copy)."""
    import onnx

    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from edgelvm.models.synthetic import build_tiny_llava
    from edgelvm.quantize import RTNConfig, quantize

    # 256 wide: the codes (vocab x 256 bytes) are above the size from which the bundle shares identical bytes
    checkpoint = build_tiny_llava(tmp_path / "tied", text_overrides={"tie_word_embeddings": True, "hidden_size": 256})
    adapter = load_model(str(checkpoint))
    assert adapter.lm_head().weight is adapter.input_embeddings().weight
    with pytest.raises(ConfigError, match="the table \\*is\\* the head") as err:
        quantize(adapter, None, RTNConfig(lm_head="int8", embeddings="int8"), out=tmp_path / "refused")
    assert err.value.where == "--embeddings" and not (tmp_path / "refused").exists()
    out = tmp_path / "q"
    quantize(str(checkpoint), calib_records[:16], RTNConfig(group_size=32, lm_head="int8"), out=out)
    quantized = load_model(str(out))
    assert quantized.lm_head().weight is quantized.input_embeddings().weight
    result = export(out, tmp_path / "bundle", ExportConfig(max_length=64))
    manifest = result.manifest
    assert manifest.graphs["embed"].precision == "int8" and manifest.graphs["embed"].codes["block_size"] == 32
    vocab, width = quantized.input_embeddings().weight.shape
    assert (result.bundle_dir / "embed.npy").stat().st_size <= vocab * width + 4096  # a byte per weight + header
    # the head's codes lie once in the bundle: the fused decoder's MatMulNBits reads the table's bytes
    fused = onnx.load(str(result.bundle_dir / "decoder_ort.onnx"), load_external_data=False)
    codes = next(t for t in fused.graph.initializer if t.name == "lm_head.q4")
    assert {e.key: e.value for e in codes.external_data}["location"] == "embed.npy"
    assert list(codes.dims) == [vocab, width // 32, 32]


def test_bad_head_options_are_clear_errors():
    from edgelvm.quantize.methods import method_config

    with pytest.raises(ConfigError, match="--lm-head 'fp8' is not a format") as err:
        method_config("llm", "rtn", lm_head="fp8")
    assert "int4" in err.value.fix
    with pytest.raises(ConfigError, match="not a knob of --llm smoothquant"):
        method_config("llm", "smoothquant", {"lm_head": "--lm-head"}, lm_head="int4")


def test_coded_table_fields_are_checked_and_float_tables_omit_them(tiny_bundles, copy_bundle):
    """A coded table names its scales file (checked like every bundle file); a float table's manifest has no
    ``codes`` key, so bundles without quantized tables read as before."""
    from edgelvm.errors import ManifestError
    from edgelvm.manifest import MANIFEST_NAME, Manifest

    bundle = copy_bundle(tiny_bundles["llama-clip"])
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    assert "codes" not in data["graphs"]["embed"]
    data["graphs"]["embed"]["codes"] = {"bits": 3, "block_size": 32, "width": 64, "scales": "s.npy",
                                        "zero_points": None}  # fmt: skip
    with pytest.raises(ManifestError, match=r"graphs\.embed\.codes"):
        Manifest.from_dict(data)
    data["graphs"]["embed"]["codes"].update(bits=8, scales="../outside.npy")
    with pytest.raises(ManifestError, match=r"graphs\.embed\.codes\.scales"):
        Manifest.from_dict(data)

"""Large decoders are parity-checked on a part of the shipped graph (their first layers' presents, a sub-graph that
maps only those layers' bytes; issue 19). Here the size threshold is forced to zero on a tiny four-layer model: the
manifest says what was compared, the bundle is unchanged, and a corrupted weight inside the checked layers still
fails the export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgelvm.errors import ExportError

LAYERS = 4


@pytest.fixture(scope="module")
def checkpoint(tied_qwen2) -> Path:
    """A tied Qwen2 LLaVA with LAYERS decoder layers: conftest.py's ``tied_qwen2`` (shared with
    test_bundle_sharing.py)."""
    import json

    checkpoint = tied_qwen2[0]
    assert json.loads((checkpoint / "config.json").read_text())["text_config"]["num_hidden_layers"] == LAYERS
    return checkpoint


@pytest.fixture
def external(monkeypatch):
    """Every graph's weights as external data: the path real sizes take (and what a partial graph points into)."""
    from edgelvm.export import onnx_graphs

    monkeypatch.setattr(onnx_graphs, "_EXTERNAL_DATA_BYTES", 0)
    return onnx_graphs


def _corrupt(graph: Path, name: str) -> None:
    """Add 1 to every element of initializer ``name`` where it is stored (external data file or inline)."""
    import onnx
    from onnx import numpy_helper

    from edgelvm.export.external_data import external_info

    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    info = external_info(tensor)
    if info is None:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + np.float32(1), name))
        onnx.save_model(model, str(graph))
        return
    with open(graph.parent / info.file, "r+b") as handle:
        handle.seek(info.offset)
        values = np.frombuffer(handle.read(info.length), np.float32) + np.float32(1)
        handle.seek(info.offset)
        handle.write(values.tobytes())


def test_partial_scope_in_manifest_and_bundle_unchanged(tied_qwen2, external):
    """The shared bundle was exported with the threshold at zero and every weight external (conftest.py);
    test_bundle_sharing.py checks its bytes and that both decoders answer as HF."""
    from edgelvm.manifest import Manifest

    bundle = tied_qwen2[1]
    manifest = Manifest.load(bundle)  # a scope string is a valid parity entry
    for name in ("decoder", "decoder_ort"):
        parity = manifest.graphs[name].parity
        assert parity["scope"].startswith(f"present key/value of layers 0-2 of {LAYERS}"), parity
        assert 0 < parity["max_rel"] < 1e-4
    assert "scope" not in manifest.graphs["vision"].parity  # not a decoder: checked whole
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".parity")]  # the part graphs are removed
    # the graph's interface is read from the file, as the whole-graph session reads it
    session = external._ort_session(bundle / "decoder.onnx")
    inputs, outputs = external._specs(session)
    assert (manifest.graphs["decoder"].inputs, manifest.graphs["decoder"].outputs) == (inputs, outputs)


def test_whole_check_below_the_threshold(checkpoint):
    from edgelvm.export import onnx_graphs
    from edgelvm.models import load_model

    kv = load_model(checkpoint).kv_cache_spec(max_length=64, dtype="float32")
    assert onnx_graphs._partial_layers(kv, 10 << 20, None) is None  # default threshold: 1 GiB
    assert onnx_graphs._partial_layers(kv, 10 << 20, 1 << 20) == onnx_graphs.PARTIAL_PARITY_LAYERS


def test_partial_check_catches_a_corrupted_weight(checkpoint, external, tmp_path, monkeypatch):
    """A layer-0 query bias + 1 in the portable decoder's data file: only the attention output of layer 0 changes,
    which reaches the compared presents through layer 1."""
    from edgelvm.models import load_model

    adapter = load_model(checkpoint)
    kv = adapter.kv_cache_spec(max_length=64, dtype="float32")
    traced = external._export

    def export_then_corrupt(module, args, shapes, names_in, names_out, path, weight_bytes):
        traced(module, args, shapes, names_in, names_out, path, weight_bytes)
        _corrupt(path, "language_model.layers.0.self_attn.q_proj.bias")

    monkeypatch.setattr(external, "_export", export_then_corrupt)
    with pytest.raises(ExportError, match="decoder graph disagrees"):
        external.export_decoder(adapter, tmp_path / "decoder.onnx", "fp32", kv, parity_whole_bytes=0)


def test_partial_check_of_the_fused_decoder_catches_a_corrupted_weight(checkpoint, tmp_path, monkeypatch):
    """Layer 0's post-attention norm + 1 in the fused graph: reaches the compared caches through layer 1."""
    from edgelvm.export import onnx_graphs
    from edgelvm.models import load_model

    adapter = load_model(checkpoint)
    kv = adapter.kv_cache_spec(max_length=64, dtype="float32")
    path = tmp_path / "decoder_ort.onnx"
    assert onnx_graphs.export_fused_decoder(adapter, path, kv, parity_whole_bytes=0).parity["max_rel"] < 1e-4
    built = onnx_graphs.build_gqa_decoder

    def build_then_corrupt(*args, **kwargs):
        spec = built(*args, **kwargs)
        _corrupt(path, "l0.post_norm")
        return spec

    monkeypatch.setattr(onnx_graphs, "build_gqa_decoder", build_then_corrupt)
    with pytest.raises(ExportError, match="fused decoder graph disagrees"):
        onnx_graphs.export_fused_decoder(adapter, path, kv, parity_whole_bytes=0)

"""Bad input gives an EdgeLVMError that names the problem and the fix — never a deep library traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgelvm.errors import (
    BundleError,
    ExportError,
    ImageError,
    ManifestError,
    PromptTooLongError,
    UnsupportedModelError,
)
from edgelvm.runtime import VLM


def test_missing_bundle_file_is_named(tiny_bundles, copy_bundle):
    bundle = copy_bundle(tiny_bundles["llama-clip"])
    (bundle / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx.*missing") as err:
        VLM.load(bundle)
    assert "Fix:" in str(err.value)


def test_sha256_mismatch_is_named(tiny_bundles, copy_bundle):
    bundle = copy_bundle(tiny_bundles["llama-clip"])
    with open(bundle / "embed.npy", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match=r"embed\.npy.*sha256"):
        VLM.load(bundle)
    VLM.load(bundle, verify=False)  # an explicit opt-out still loads


def test_unknown_major_format_version(tiny_bundles, copy_bundle):
    bundle = copy_bundle(tiny_bundles["llama-clip"])
    path = bundle / "edgelvm.json"
    data = json.loads(path.read_text())
    data["format_version"] = "2.0"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"format_version 2\.0 is not supported") as err:
        VLM.load(bundle)
    assert "upgrade edgelvm" in str(err.value)


def test_manifest_missing_field_and_not_a_bundle(tiny_bundles, copy_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundles["llama-clip"])
    path = bundle / "edgelvm.json"
    data = json.loads(path.read_text())
    del data["kv_cache"]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"'kv_cache' is missing"):
        VLM.load(bundle)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"edgelvm\.json is missing"):
        VLM.load(tmp_path / "empty")


def test_bad_images(tiny_bundles, tmp_path, test_images):
    vlm = VLM.load(tiny_bundles["llama-clip"])
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a PNG")
    with pytest.raises(ImageError, match="not an image file"):
        vlm.generate(not_image, "hi", max_new_tokens=2)
    good = tmp_path / "good.png"
    test_images[0].resize((200, 160)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        vlm.generate(truncated, "hi", max_new_tokens=2)
    with pytest.raises(ImageError, match="not found"):
        vlm.generate(tmp_path / "missing.jpg", "hi", max_new_tokens=2)
    with pytest.raises(ImageError, match="uint8"):
        vlm.generate(np.zeros((8, 8, 3), dtype=np.float32), "hi", max_new_tokens=2)
    with pytest.raises(ImageError, match="HxWx3"):
        vlm.generate(np.zeros((3, 8, 8, 2), dtype=np.uint8), "hi", max_new_tokens=2)
    assert vlm.generate(good, "hi", max_new_tokens=2) is not None  # the model is still usable


def test_prompt_longer_than_context(tiny_bundles, test_images):
    vlm = VLM.load(tiny_bundles["llama-clip"])
    with pytest.raises(PromptTooLongError, match="exceeds the bundle's context of 256") as err:
        vlm.generate(test_images[0], "word " * 400, max_new_tokens=4)
    assert "--max-length" in str(err.value)
    with pytest.raises(PromptTooLongError):
        vlm.generate(test_images[0], "short", max_new_tokens=1000)


def test_image_count_must_match_placeholders(tiny_bundles, test_images):
    from edgelvm.errors import EdgeLVMError

    vlm = VLM.load(tiny_bundles["llama-clip"])
    with pytest.raises(EdgeLVMError, match="2 image placeholder"):
        vlm.generate(test_images[0], "<image> look again", max_new_tokens=2)


def test_export_unsupported_model_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgelvm.export import export

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported; supported model types: (.*, )?llava\b"):
        export(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_empty_dir_without_force(tiny_checkpoints, tmp_path):
    from edgelvm.export import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty") as err:
        export(tiny_checkpoints["llama-clip"], out)
    assert "--force" in str(err.value)
    assert (out / "keep.txt").read_text() == "user data"


def test_export_missing_checkpoint_and_processor(tmp_path, tiny_checkpoints):
    import shutil

    from edgelvm.export import export

    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_checkpoints["llama-clip"], partial)
    (partial / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"processor files missing: tokenizer\.json"):
        export(partial, tmp_path / "out")


def test_failed_export_leaves_no_partial_bundle_and_keeps_old_one(
    tiny_checkpoints, tiny_bundles, tmp_path, monkeypatch
):
    import shutil

    import edgelvm.export.onnx_graphs as graphs
    from edgelvm.export import ExportConfig, export

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["llama-clip"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash while tracing the decoder")

    monkeypatch.setattr(graphs, "export_decoder", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export(tiny_checkpoints["llama-clip"], out, ExportConfig(force=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old bundle untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging leftovers
    VLM.load(out)


def test_unknown_backend(tiny_bundles):
    from edgelvm.errors import BackendError

    with pytest.raises(BackendError, match="unknown backend 'gpu9000'"):
        VLM.load(tiny_bundles["llama-clip"], backend="gpu9000")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            VLM.load(tiny_bundles["llama-clip"], backend="tensorrt")


def test_error_message_shape():
    from edgelvm.errors import EdgeLVMError

    err = EdgeLVMError("field 'x' is wrong", where=Path("a/b.json"), fix="set it to 3")
    assert str(err) == "a/b.json: field 'x' is wrong\nFix: set it to 3"

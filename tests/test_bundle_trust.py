"""Issue 18 (5): the bundle trust model — every file the runtime opens is inside the bundle, listed and hashed;
a malformed manifest raises EdgeLVMError naming the field; the manifest itself can be pinned by its sha256."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelvm.errors import BundleError, EdgeLVMError, ManifestError
from edgelvm.manifest import Manifest, verify_bundle_files
from edgelvm.runtime import VLM


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["llama-clip"]


def _edit(bundle: Path, change) -> None:
    path = bundle / "edgelvm.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_removing_a_files_entry_does_not_skip_verification(bundle, copy_bundle):
    damaged = copy_bundle(bundle)
    with open(damaged / "decoder.onnx", "ab") as handle:
        handle.write(b"\0")  # tampered, and its entry removed so that nothing would check it
    _edit(damaged, lambda d: d["files"].pop("decoder.onnx"))
    with pytest.raises(BundleError, match=r"graphs\.decoder\.file names 'decoder\.onnx'.*not listed") as err:
        VLM.load(damaged)
    assert "Fix:" in str(err.value)
    with pytest.raises(BundleError, match="not listed"):
        VLM.load(damaged, verify=False)  # skipping hashes does not allow unlisted files


def test_empty_files_does_not_disable_verification(bundle, copy_bundle):
    damaged = copy_bundle(bundle)
    _edit(damaged, lambda d: d.update(files={}))
    with pytest.raises(BundleError, match="not listed"):
        VLM.load(damaged)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (("graphs", "vision", "file"), "/etc/passwd"),
        (("graphs", "decoder", "file"), "../decoder.onnx"),
        (("graphs", "embed", "file"), "sub/../embed.npy"),
        (("tokenizer", "file"), "./tokenizer.json"),
        (("preprocess", "vision_text"), {"tokenizer": "../../t.json", "max_length": 8, "inputs": ["a", "b"]}),
    ],
)
def test_paths_outside_the_bundle_are_refused(bundle, copy_bundle, field, value):
    damaged = copy_bundle(bundle)

    def change(data):
        node = data
        for key in field[:-1]:
            node = node[key]
        node[field[-1]] = value

    _edit(damaged, change)
    with pytest.raises(ManifestError, match=r"not a plain relative path inside the bundle") as err:
        VLM.load(damaged)
    assert ".".join(field[:3] if field[1] != "vision_text" else ("preprocess", "vision_text", "tokenizer")) in str(
        err.value
    )


def test_a_files_entry_outside_the_bundle_is_never_opened(bundle, copy_bundle, monkeypatch):
    import edgelvm.manifest as mf

    damaged = copy_bundle(bundle)
    outside = damaged.parent / "secret.txt"
    outside.write_text("not yours")
    digest = hashlib.sha256(b"not yours").hexdigest()
    opened: list = []
    monkeypatch.setattr(mf, "sha256_file", lambda p, *a: opened.append(p) or "0" * 64)
    for rel in ("../secret.txt", "../../etc/passwd", str(outside)):
        _edit(damaged, lambda d, rel=rel: d["files"].update({rel: digest}))
        with pytest.raises(ManifestError, match="not a plain relative path"):
            VLM.load(damaged)
        assert opened == []
        _edit(damaged, lambda d, rel=rel: d["files"].pop(rel))


def test_symlink_escaping_the_bundle_is_refused(bundle, copy_bundle):
    damaged = copy_bundle(bundle)
    outside = damaged.parent / "tokenizer-elsewhere.json"
    (damaged / "tokenizer.json").rename(outside)
    os.symlink(outside, damaged / "tokenizer.json")  # same bytes, same hash: only the location is wrong
    with pytest.raises(BundleError, match=r"'tokenizer\.json' is a symbolic link to .*outside the bundle"):
        VLM.load(damaged)
    with pytest.raises(BundleError, match="outside the bundle"):
        VLM.load(damaged, verify=False)


def test_external_data_of_a_graph_must_be_listed_and_inside(bundle, copy_bundle):
    import onnx

    from edgelvm.manifest import onnx_external_data

    damaged = copy_bundle(bundle)
    model = onnx.load(str(damaged / "vision.onnx"))
    onnx.save_model(model, str(damaged / "vision.onnx"), save_as_external_data=True, location="vision.onnx.data",
                    size_threshold=4096)  # fmt: skip
    assert onnx_external_data(damaged / "vision.onnx") == {"vision.onnx.data"}
    from edgelvm.manifest import sha256_file

    _edit(damaged, lambda d: d["files"].update({"vision.onnx": sha256_file(damaged / "vision.onnx")}))
    with pytest.raises(BundleError, match=r"external data of graphs\.vision .*'vision\.onnx\.data'.*not listed"):
        VLM.load(damaged)
    _edit(damaged, lambda d: d["files"].update({"vision.onnx.data": sha256_file(damaged / "vision.onnx.data")}))
    VLM.load(damaged)  # listed and hashed: loads

    # a location outside the bundle is refused before onnxruntime reads it
    model = onnx.load(str(damaged / "vision.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../vision.onnx.data"
    onnx.save_model(model, str(damaged / "vision.onnx"))
    _edit(damaged, lambda d: d["files"].update({"vision.onnx": sha256_file(damaged / "vision.onnx")}))
    with pytest.raises(ManifestError, match=r"external data of graphs\.vision.*not a plain relative path"):
        VLM.load(damaged)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(graphs=[1, 2]), "'graphs'"),
        (lambda d: d["graphs"].update(vision="vision.onnx"), "'graphs.vision'"),
        (lambda d: d["graphs"]["decoder"].update(file=7), "'graphs.decoder.file'"),
        (lambda d: d["graphs"]["decoder"]["inputs"][0].update(shape="b"), "'graphs.decoder.inputs[0].shape'"),
        (lambda d: d["graphs"].pop("embed"), "'graphs.embed'"),
        (lambda d: d["kv_cache"].update(num_layers="2"), "'kv_cache.num_layers'"),
        (lambda d: d["preprocess"].pop("size"), "'preprocess.size'"),
        (lambda d: d["preprocess"].update(convert_rgb=1), "'preprocess.convert_rgb'"),
        (lambda d: d["tokenizer"].update(special_tokens=None), "'tokenizer.special_tokens'"),
        (lambda d: d["generation"].pop("eos_token_ids"), "'generation.eos_token_ids'"),
        (lambda d: d["generation"].update(pad_token_id=[0]), "'generation.pad_token_id'"),
        (lambda d: d.update(files=["vision.onnx"]), "'files'"),
        (lambda d: d["files"].update({"vision.onnx": 3}), "'files'"),
        (lambda d: d["files"].update({"vision.onnx": "abc"}), "files['vision.onnx']"),
        (lambda d: d.update(positions="1d"), "'positions'"),
    ],
)
def test_malformed_fields_are_named(bundle, change, field):
    data = json.loads((bundle / "edgelvm.json").read_text())
    change(data)
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(data)
    assert field in str(err.value) and "Fix:" in str(err.value)


def test_manifest_digest_can_be_pinned(bundle, copy_bundle):
    digest = hashlib.sha256((bundle / "edgelvm.json").read_bytes()).hexdigest()
    VLM.load(bundle, expected_sha256=digest.upper())
    edited = copy_bundle(bundle)
    _edit(edited, lambda d: d["generation"].update(pad_token_id=0))
    with pytest.raises(BundleError, match="not the pinned"):
        VLM.load(edited, expected_sha256=digest)


# ---- property: random mutations of a valid manifest load, or fail with an EdgeLVMError ---------------------------
_PATHS = ["/etc/passwd", "../../etc/passwd", "..", ".", "", "a/../b", "/", "x\\y", "C:/x", "sub//x", "./tokenizer.json",
          "decoder.onnx", "embed.npy", "tokenizer.json", "nope.onnx", "vision.onnx"]  # fmt: skip
_LEAVES = st.none() | st.booleans() | st.integers(-3, 300) | st.floats(-1e3, 1e3) | st.text(max_size=6)
_JSON = st.recursive(
    _LEAVES | st.sampled_from(_PATHS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=4,
)


def _location(data, draw) -> tuple:
    """A random field: walk down from the top, stopping at each level with some chance (every section gets
    mutations, however many entries the long ones — graph inputs, files — have)."""
    where, node = (), data
    while isinstance(node, (dict, list)) and node and (not where or draw(st.integers(0, 3)) > 0):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        where, node = (*where, key), node[key]
    return where


def _mutate(data, draw) -> dict:
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 3))):
        where = _location(data, draw)
        if not where:
            continue
        parent = data
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["delete", "value", "path", "swap"]))
        if action == "delete":
            del parent[where[-1]]
        elif action == "value":
            parent[where[-1]] = draw(_JSON)
        elif action == "path":
            parent[where[-1]] = draw(st.sampled_from(_PATHS))
        else:  # another field's value: type confusion with realistic shapes
            value = data
            for key in _location(data, draw):
                value = value[key]
            parent[where[-1]] = copy.deepcopy(value)
        if action != "delete" and isinstance(parent, dict) and draw(st.booleans()):
            parent[draw(st.sampled_from(["file", "files", "kind", "zzz"]))] = draw(_JSON)
    return data


def test_mutated_manifests_load_or_raise_edgelvm_errors(bundle):
    valid = json.loads((bundle / "edgelvm.json").read_text())

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        mutated = _mutate(valid, data.draw)
        with contextlib.suppress(EdgeLVMError):
            verify_bundle_files(bundle, Manifest.from_dict(mutated, where="edgelvm.json"))

    check()


def test_mutated_manifests_through_vlm_load(bundle, tmp_path_factory):
    """The same, through ``VLM.load`` (the runtime reads the parsed manifest): fewer examples, each opens sessions."""
    import shutil

    copy_dir = tmp_path_factory.mktemp("mutated") / "bundle"
    shutil.copytree(bundle, copy_dir)
    valid = json.loads((bundle / "edgelvm.json").read_text())

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        (copy_dir / "edgelvm.json").write_text(json.dumps(_mutate(valid, data.draw)))
        with contextlib.suppress(EdgeLVMError):
            VLM.load(copy_dir, vision_cache_mb=0)

    check()

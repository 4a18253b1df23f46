"""Shared fixtures: every family's tiny checkpoint, bundle and reference (tests/fixtures), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.artifacts import Artifacts

#: (text model, vision tower): Llama + CLIP (MHA, CLS dropped) and Qwen2 + SigLIP (GQA, no CLS) — the LLaVA rows
#: of tests.fixtures.families.FAMILIES, named by the suites over them as "llama-clip" and "qwen2-siglip".
VARIANTS = {"llama-clip": ("llama", "clip"), "qwen2-siglip": ("qwen2", "siglip")}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    """Every family's checkpoint, bundle, HF reference and compressed variants, each built once per session."""
    return Artifacts(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_checkpoints(artifacts) -> dict[str, Path]:
    return {name: artifacts.checkpoint(f"llava-{name}") for name in VARIANTS}


@pytest.fixture(scope="session")
def tiny_bundles(artifacts) -> dict[str, Path]:
    """The LLaVA variants exported with max_length 256."""
    return {name: artifacts.bundle(f"llava-{name}") for name in VARIANTS}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def test_images(artifacts):
    """Two images of different sizes and aspect ratios (one portrait, one landscape)."""
    return list(artifacts.images("llava-llama-clip").values())


@pytest.fixture
def copy_bundle(tmp_path):
    """A private copy of a bundle that a test may damage."""
    import shutil

    def make(src: Path) -> Path:
        dst = tmp_path / "bundle"
        shutil.copytree(src, dst)
        return dst

    return make


@pytest.fixture(scope="session")
def calib_records(tmp_path_factory):
    """40 shapes-task records (66 px images): calibration data for the quantize tests."""
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.data.shapes import write_split

    root = tmp_path_factory.mktemp("calib")
    write_split(root / "calib", seed=11, n=40, image_size=66)
    return load_jsonl_dataset(root / "calib")


@pytest.fixture(scope="session")
def tied_qwen2(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, bundle): a tied-embedding four-layer Qwen2 LLaVA wide enough that its matrices are shared
    (>= 64 KiB each), exported with every graph's weights as external data and the decoders parity-checked on
    their first layers only (what real sizes get). One export for test_bundle_sharing.py (the bytes of the bundle)
    and test_partial_parity.py (the manifest's partial scope)."""
    from edgelvm.export import ExportConfig, export, onnx_graphs
    from edgelvm.models.synthetic import build_tiny_llava

    root = tmp_path_factory.mktemp("tied")
    # four layers: the partial check compares the first three (test_partial_parity.py), so one is left out
    checkpoint = build_tiny_llava(root / "ckpt", text="qwen2", hidden_size=192,
                                  text_overrides={"tie_word_embeddings": True, "num_hidden_layers": 4})  # fmt: skip
    patch = pytest.MonkeyPatch()
    patch.setattr(onnx_graphs, "_EXTERNAL_DATA_BYTES", 0)
    try:
        config = ExportConfig(max_length=128, parity_whole_bytes=0)
        bundle = export(checkpoint, root / "bundle", config).bundle_dir
    finally:
        patch.undo()
    return checkpoint, bundle

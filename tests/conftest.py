"""Shared fixtures: tiny random-weight LLaVA checkpoints and their bundles, built once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: (text model, vision tower): Llama + CLIP (MHA, CLS dropped) and Qwen2 + SigLIP (GQA, no CLS).
VARIANTS = {"llama-clip": ("llama", "clip"), "qwen2-siglip": ("qwen2", "siglip")}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from edgelvm.testing import build_tiny_llava

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build_tiny_llava(root / name, text=text, vision=vision) for name, (text, vision) in VARIANTS.items()}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from edgelvm.export import ExportConfig, export

    root = tmp_path_factory.mktemp("bundles")
    return {
        name: export(path, root / name, ExportConfig(max_length=256)).bundle_dir
        for name, path in tiny_checkpoints.items()
    }


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def test_images():
    """Two images of different sizes and aspect ratios (one portrait, one landscape)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    landscape = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    portrait = Image.fromarray(rng.integers(0, 256, (70, 33, 3), dtype=np.uint8))
    return [landscape, portrait]


PROMPTS = ["What is on the table?", "Describe the image in one sentence.", "How many people?"]


@pytest.fixture
def copy_bundle(tmp_path):
    """A private copy of a bundle that a test may damage."""
    import shutil

    def make(src: Path) -> Path:
        dst = tmp_path / "bundle"
        shutil.copytree(src, dst)
        return dst

    return make

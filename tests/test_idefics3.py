"""Idefics3 (``idefics3``) and SmolVLM (``smolvlm``): image splitting into a tile grid plus a global view, the
``<fake_token_around_image>`` / ``<row_i_col_j>`` / ``<global-img>`` prompt, pixel-shuffle connector; export →
runtime parity with Hugging Face on tiny random checkpoints whose 32-px tiles make images of a few dozen pixels split.

Reference: transformers' PIL image processors (``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil``, the
backend transformers picks without torchvision; the runtime reproduces that one), the processors' ``input_ids`` and
``generate``. The SmolVLM processor is transformers' own without its video processor (torchvision is absent here).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("num2words")  # SmolVLMProcessor imports it

from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
#: (height, width) -> (tile rows, tile columns) with the default tiny geometry (32-px tiles, longest edge 96 px);
#: every image is first resized to a 96-px longest edge, so even the 20x20 one splits.
SIZES = {"landscape": ((40, 50), (3, 3)), "portrait": ((70, 33), (3, 2)), "square": ((48, 48), (3, 3)),
         "small": ((20, 20), (3, 3)), "large": ((200, 120), (3, 2)), "wide": ((30, 90), (1, 3)),
         "short": ((50, 100), (2, 3))}  # fmt: skip
#: the SmolVLM checkpoint's geometry (longest edge 64 px): at most 2 x 2 tiles
SMOL_GRIDS = {"landscape": (2, 2), "portrait": (2, 1), "wide": (1, 2), "short": (1, 2)}


#: its rows in tests/fixtures/families.py; the artifacts are shared with test_families.py
FAMILIES = ("idefics3", "smolvlm")


@pytest.fixture(scope="module")
def images(artifacts):
    images = artifacts.images("idefics3")
    assert {name: image.size[::-1] for name, image in images.items()} == {name: hw for name, (hw, _) in SIZES.items()}
    return images


@pytest.fixture(scope="module")
def checkpoints(artifacts):
    return {name: artifacts.checkpoint(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def bundles(artifacts):
    return {name: artifacts.bundle(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def hf(artifacts):
    """(processor, model) per checkpoint; the processor as edgelvm loads it (SmolVLM: AutoProcessor needs
    torchvision, for its video processor)."""
    return {name: artifacts.hf(name) for name in FAMILIES}


def _text(processor, prompt: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _hf_generate(processor, model, pictures, prompt, max_new_tokens=20, **image_kwargs):
    inputs = processor(images=pictures, text=[_text(processor, prompt, len(pictures))], return_tensors="pt",
                       **image_kwargs)  # fmt: skip
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), _eos(model))


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_split_arithmetic_matches_transformers_at_real_geometries():
    """Tile grids vs transformers' own count at SmolVLM's (512-px tiles, 2048-px longest edge) and Idefics3's
    (364 / 1456) geometry over many sizes; and vs the image processor's actual split where the longest edge is no
    multiple of the tile (there ``get_number_of_image_patches`` disagrees with transformers' own split, whose rows
    and columns the prompt uses — the runtime follows the split)."""
    from PIL import Image
    from transformers import Idefics3ImageProcessorPil, SmolVLMImageProcessorPil

    from edgelvm.errors import BundleError
    from edgelvm.runtime.images.image_splitting import ImageSplittingRule

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, (400, 2))] + [(1, 1), (1, 4000), (4000, 1)]
    for cls, tile, longest in ((SmolVLMImageProcessorPil, 512, 2048), (Idefics3ImageProcessorPil, 364, 1456)):
        processor = cls(size={"longest_edge": longest}, max_image_size={"longest_edge": tile})
        rule = ImageSplittingRule(tile, longest, True, 1, [], [], [], [], [])
        grids = [rule.grid(h, w) for h, w in sizes]
        assert grids == [tuple(processor.get_number_of_image_patches(h, w)[1:]) for h, w in sizes]
        assert len(set(grids)) == 7 and rule.max_views == 17  # 4x4 .. 1x4, 4x1 .. and the global view
    with pytest.raises(BundleError, match="incomplete for split tiling"):
        ImageSplittingRule.load({"tile": 32, "do_image_splitting": True})
    processor = Idefics3ImageProcessorPil(size={"longest_edge": 100}, max_image_size={"longest_edge": 30})
    rule = ImageSplittingRule(30, 100, True, 1, [], [], [], [], [])
    for h, w in [(251, 303), (77, 41), (120, 97), (33, 64)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = processor([image], return_row_col_info=True, return_tensors="np")
        assert rule.grid(h, w) == (out["rows"][0][0], out["cols"][0][0])
        assert out["pixel_values"].shape[1] == rule.grid(h, w)[0] * rule.grid(h, w)[1] + 1


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_preprocessing_and_prompt_ids_match_the_hf_processor(family, hf, bundles, images):
    from PIL import Image

    processor, _ = hf[family]
    vlm = VLM.load(bundles[family])
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 256, (31, 45, 4), dtype=np.uint8), mode="RGBA")
    for name, image in {**images, "rgba": rgba}.items():
        inputs = processor(images=[image], text=[_text(processor, "Hi")], return_tensors="np")
        got = vlm.preprocessor([image])
        assert got.shape == inputs["pixel_values"].shape, name
        assert np.abs(got - inputs["pixel_values"]).max() <= 1e-5, name
        assert inputs["pixel_attention_mask"].all(), name  # full tiles: the vision graph needs no mask
        assert vlm.prompt_ids(Request(prompt="Hi", images=[image])) == inputs["input_ids"][0].tolist(), name
        if name in SIZES and (family == "idefics3" or name in SMOL_GRIDS):
            (h, w), grid = SIZES[name]
            grid = grid if family == "idefics3" else SMOL_GRIDS[name]
            assert vlm.preprocessor.tiling.grid(h, w) == grid, name
            assert got.shape[1] == grid[0] * grid[1] + 1, name  # tiles + the global view
    # A batch of differently split images is zero-padded over the views (and masked), as the HF processor pads it.
    batch = list(images.values())
    expected = processor.image_processor([[image] for image in batch], return_tensors="np")  # one image a sample
    got = vlm.preprocessor(batch)
    assert np.abs(got - expected["pixel_values"]).max() <= 1e-5
    assert np.array_equal(np.abs(got).max(axis=(2, 3, 4)) > 0, expected["pixel_attention_mask"].any(axis=(2, 3)))


def _unsplit_bundle(bundle, checkpoint, tmp_path):
    """A copy of ``bundle`` whose manifest says what the adapter writes for the same checkpoint with
    ``do_image_splitting=False`` (every image one global view)."""
    from edgelvm.models import load_model

    adapter = load_model(str(checkpoint))
    adapter.processor.image_processor.do_image_splitting = False
    params = adapter.preprocess_spec().tiling_params
    assert params["do_image_splitting"] is False and params["max_views"] == 1 and params["row_col_token_ids"] == []
    copy = tmp_path / "unsplit"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "edgelvm.json").read_text())
    manifest["preprocess"]["tiling_params"] = params
    (copy / "edgelvm.json").write_text(json.dumps(manifest))
    return copy


def test_without_splitting_every_image_is_one_view_like_hf(hf, bundles, checkpoints, images, tmp_path):
    """``do_image_splitting=False``: one global view per image, ``<fake><global-img><image>*T<fake>`` in the prompt;
    pixel values, prompt ids and greedy tokens vs HF with the processor told the same."""
    processor, model = hf["idefics3"]
    vlm = VLM.load(_unsplit_bundle(bundles["idefics3"], checkpoints["idefics3"], tmp_path))
    for name, image in images.items():
        inputs = processor(images=[image], text=[_text(processor, "Hi")], return_tensors="np", do_image_splitting=False)
        got = vlm.preprocessor([image])
        assert got.shape == inputs["pixel_values"].shape == (1, 1, 3, 32, 32), name
        assert np.abs(got - inputs["pixel_values"]).max() <= 1e-5, name
        assert vlm.prompt_ids(Request(prompt="Hi", images=[image])) == inputs["input_ids"][0].tolist(), name
    for name in ("landscape", "portrait"):
        expected = _hf_generate(processor, model, [images[name]], PROMPTS[0], do_image_splitting=False)
        vlm.generate(images[name], PROMPTS[0], max_new_tokens=20)
        assert vlm.last_output_ids[0] == expected, name


def test_image_features_match_transformers(hf, bundles, images):
    """Vision graph over the views (tower, pixel shuffle, projection) + packing vs ``get_image_features`` with the
    processor's ``pixel_attention_mask``: within the fp32 export tolerance, with the same number of rows."""
    for family in ("idefics3", "smolvlm"):
        processor, model = hf[family]
        vlm = VLM.load(bundles[family], vision_cache_mb=0)
        for name, image in images.items():
            inputs = processor.image_processor([image], return_tensors="pt")
            with torch.no_grad():
                out = model.model.get_image_features(
                    pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"]
                )
            reference = out.pooler_output[0].numpy()
            got = vlm._image_features([image])[0]
            assert got.shape == reference.shape, (family, name)
            assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-4, (family, name)


def test_bundle_ships_the_split_rule(checkpoints, bundles):
    from transformers import AutoTokenizer

    for family, bundle in bundles.items():
        manifest = Manifest.load(bundle)
        assert manifest.family == "idefics3" and manifest.created_from["model_type"] == family
        spec = manifest.preprocess
        assert spec.tiling == "split" and spec.tokens_per_image == 16  # (32 / 4)^2 patches / 2^2 (pixel shuffle)
        assert spec.resample == "lanczos"
        params = spec.tiling_params
        tokenizer = AutoTokenizer.from_pretrained(checkpoints[family])
        grid = 3 if family == "idefics3" else 2
        assert params["max_views"] == grid * grid + 1
        assert params["row_col_token_ids"] == [
            [[tokenizer.convert_tokens_to_ids(f"<row_{r}_col_{c}>")] for c in range(1, grid + 1)]
            for r in range(1, grid + 1)
        ]
        for name in ("vision", "decoder", "decoder_ort"):
            assert manifest.graphs[name].parity["max_rel"] < 1e-4, (family, name)
    from edgelvm.build import BuildConfig
    from edgelvm.build import tensorrt_builder as tb

    (vision,) = tb.vision_profiles(Manifest.load(bundles["idefics3"]), BuildConfig(max_batch=2))
    assert vision.shapes["pixel_values"]["max"][0] == 20  # 2 images x (3x3 tiles + the global view)


# ---- generation ------------------------------------------------------------------------------------------------
def test_two_differently_split_images_in_one_prompt_match_hf(hf, bundles, images):
    for family in ("idefics3", "smolvlm"):
        processor, model = hf[family]
        vlm = VLM.load(bundles[family])
        pair = [images["wide"], images["portrait"]]
        expected = _hf_generate(processor, model, pair, "Compare.", max_new_tokens=12)
        vlm.generate(pair, "Compare.", max_new_tokens=12)
        assert vlm.last_output_ids[0] == expected, family


# ---- compression stages ----------------------------------------------------------------------------------------
def test_unsupported_geometry_is_a_clear_error(checkpoints, tmp_path):
    from edgelvm.errors import UnsupportedModelError
    from edgelvm.models import load_model

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["idefics3"], bad)
    path = bad / "processor_config.json"  # transformers 5 nests the image processor's settings here
    config = json.loads(path.read_text())
    config["image_processor"]["max_image_size"] = {"longest_edge": 48}
    path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="48-px tiles but the vision tower takes 32-px"):
        load_model(str(bad))

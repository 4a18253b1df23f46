"""LLaVA-NeXT (``llava_next``): anyres tiling, unpadding and image-newline rows, export → runtime parity with
Hugging Face on a tiny random checkpoint whose 32-px tiles make images of a few dozen pixels tile.

Reference: transformers' PIL image processor (``LlavaNextImageProcessorPil``, the backend transformers picks
without torchvision; the runtime reproduces that one) and ``LlavaNextForConditionalGeneration.generate``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
#: (height, width) -> tiles per column x per row that transformers picks with tests.fixtures.llava.TINY_GRID_PINPOINTS
SIZES = {"landscape": ((40, 50), (2, 2)), "portrait": ((70, 33), (3, 1)), "square": ((48, 48), (2, 2)),
         "small": ((20, 20), (1, 1)), "large": ((200, 120), (2, 2))}  # fmt: skip


FAMILY = "llava_next"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py


@pytest.fixture(scope="module")
def images(artifacts):
    images = artifacts.images(FAMILY)
    assert {name: image.size[::-1] for name, image in images.items()} == {name: hw for name, (hw, _) in SIZES.items()}
    return images


@pytest.fixture(scope="module")
def checkpoint(artifacts):
    return artifacts.checkpoint(FAMILY)


@pytest.fixture(scope="module")
def bundle(artifacts):
    return artifacts.bundle(FAMILY)


@pytest.fixture(scope="module")
def hf(artifacts):
    processor, model = artifacts.hf(FAMILY)
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"  # the backend compared against
    return processor, model


def _text(processor, prompt: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_tiling_arithmetic_matches_transformers_at_llava_v16_geometry():
    """Best resolution, fit-inside size, unpadding and the token count vs transformers' own functions, at the real
    llava-v1.6 geometry (336-px tiles, 14-px patches, the default pinpoints) over many image sizes."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from edgelvm.models.synthetic import build_tiny_tokenizer
    from edgelvm.runtime.images import tiling
    from tests.processor_prompts import processor_image_token_counts, spread_sample

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    rule = tiling.AnyresRule(pinpoints, 336, (336, 336), (24, 24), newline="image_newline.npy")
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 2400, (150, 2))] + [(336, 336), (672, 336), (1, 900)]
    sample = spread_sample(sizes, 32)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = processor_image_token_counts(processor, sample, processor.image_token, image_token)
    assert [rule.token_count(h, w, 576) for h, w in sample] == counts
    for h, w in sizes:
        best = select_best_resolution((h, w), pinpoints)
        assert tiling.select_best_resolution(h, w, pinpoints) == tuple(best)
        probe = np.zeros((3, h, w))
        assert tiling.fit_inside(h, w, *best) == get_patch_output_size(probe, best, ChannelDimension.FIRST)
        rows, cols = rule.grid(h, w)
        grid = torch.zeros(1, rows * 24, cols * 24)
        r0, r1, c0, c1 = tiling.unpad_bounds(h, w, rows * 24, cols * 24)
        assert (r1 - r0, c1 - c0) == tuple(unpad_image(grid, (h, w)).shape[1:])
    assert len({rule.grid(h, w) for h, w in sizes}) == len(pinpoints)  # every layout occurred


def test_preprocessing_and_token_counts_match_the_hf_processor(hf, bundle, images):
    from PIL import Image

    processor, _ = hf
    vlm = VLM.load(bundle)
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 256, (31, 45, 4), dtype=np.uint8), mode="RGBA")
    cases = {**images, "rgba": rgba}
    for name, image in cases.items():
        inputs = processor(images=[image], text=[_text(processor, "Hi")], return_tensors="np")
        got = vlm.preprocessor([image])
        assert got.shape == inputs["pixel_values"].shape, name
        assert np.abs(got - inputs["pixel_values"]).max() <= 1e-5, name
        assert vlm.prompt_ids(Request(prompt="Hi", images=[image])) == inputs["input_ids"][0].tolist(), name
        if name in SIZES:
            (h, w), grid = SIZES[name]
            assert vlm.preprocessor.tiling.grid(h, w) == grid
            assert got.shape[1] == 1 + grid[0] * grid[1]  # base view + tiles
    counts = vlm.image_token_counts([images["landscape"], images["square"]])
    assert counts[0] < counts[1]  # same 2x2 grid: the landscape image's padding rows were removed
    # A batch of differently tiled images is zero-padded over the views, as the HF processor pads it.
    batch = list(images.values())
    expected = processor.image_processor(batch, return_tensors="np")["pixel_values"]
    assert np.abs(vlm.preprocessor(batch) - expected).max() <= 1e-5


def test_image_features_match_transformers(hf, bundle, images):
    """Vision graph over the views + numpy packing (unpad, newline rows, base view first) vs
    ``get_image_features``: within the fp32 export tolerance, and with exactly the same number of rows."""
    processor, model = hf
    vlm = VLM.load(bundle, vision_cache_mb=0)
    for name, image in images.items():
        inputs = processor.image_processor([image], return_tensors="pt")
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        reference = out.pooler_output[0].numpy()
        got = vlm._image_features([image])[0]
        assert got.shape == reference.shape, name
        assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-4, name


def test_bundle_ships_the_tiling_rule_and_newline(checkpoint, bundle):
    from transformers import AutoModelForImageTextToText

    manifest = Manifest.load(bundle)
    assert manifest.family == "llava_next" and manifest.preprocess.tiling == "anyres"
    params = manifest.preprocess.tiling_params
    assert params["newline"] == "image_newline.npy" and "image_newline.npy" in manifest.files  # hashed
    assert manifest.preprocess.tokens_per_image == 16  # one view: (32 / 8)^2 patches, CLS dropped
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    assert np.array_equal(np.load(bundle / "image_newline.npy"), model.model.image_newline.detach().numpy())
    for name in ("vision", "decoder", "decoder_ort"):
        assert manifest.graphs[name].parity["max_rel"] < 1e-4, name
    # Compatibility: an untiled manifest is written without the new field (older runtimes still load it) and
    # one without it loads here.
    import dataclasses

    plain = dataclasses.replace(manifest, preprocess=dataclasses.replace(manifest.preprocess, tiling="none",
                                                                         tiling_params=None))  # fmt: skip
    data = plain.to_dict()
    assert "tiling_params" not in data["preprocess"]
    assert Manifest.from_dict(data).preprocess.tiling_params is None
    # A TensorRT vision profile must take every view of an image: 1 base view + the 2x2 grid's 4 tiles.
    from edgelvm.build import BuildConfig
    from edgelvm.build import tensorrt_builder as tb

    assert params["max_views"] == 5
    (vision,) = tb.vision_profiles(manifest, BuildConfig(max_batch=2))
    assert vision.shapes["pixel_values"]["max"][0] == 10


# ---- generation ------------------------------------------------------------------------------------------------
def test_two_differently_tiled_images_in_one_prompt_match_hf(hf, bundle, images):
    processor, model = hf
    vlm = VLM.load(bundle)
    pair = [images["landscape"], images["portrait"]]
    inputs = processor(images=pair, text=[_text(processor, "Compare.", 2)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    vlm.generate(pair, "Compare.", max_new_tokens=12)
    expected = trim_after_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), {processor.tokenizer.eos_token_id})
    assert vlm.last_output_ids[0] == expected


# ---- compression stages ----------------------------------------------------------------------------------------
def test_unsupported_tiling_geometry_is_a_clear_error(checkpoint, tmp_path):
    import json
    import shutil

    from edgelvm.errors import UnsupportedModelError
    from edgelvm.models import load_model

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    path = bad / "processor_config.json"  # transformers 5 nests the image processor's settings here
    config = json.loads(path.read_text())
    config["image_processor"]["image_grid_pinpoints"] = [[32, 64], [48, 48]]
    path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="image_grid_pinpoints differ"):
        load_model(str(bad))

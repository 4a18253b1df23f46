"""LLaVA-OneVision (``llava_onevision``): LLaVA-NeXT's anyres tiling plus the "anyres_max_N" cap (a large unpadded
feature grid is bilinearly downscaled), export → runtime parity with Hugging Face on a tiny random checkpoint whose
32-px tiles and ``anyres_max_2`` make images of a few dozen pixels tile and get downscaled.

Reference: transformers' PIL image processor (``LlavaOnevisionImageProcessorPil``) inside ``LlavaOnevisionProcessor``
(built without its video processor: there is no torchvision here) and
``LlavaOnevisionForConditionalGeneration.generate``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
#: (height, width) -> (tiles per column x per row, whether anyres_max_2 downscales the unpadded grid), for
#: tests.fixtures.llava.TINY_ONEVISION_PINPOINTS
SIZES = {"landscape": ((40, 50), (2, 2), True), "portrait": ((70, 33), (3, 2), True),
         "square": ((48, 48), (2, 2), True), "small": ((20, 20), (1, 1), False),
         "wide": ((30, 60), (1, 2), False), "large": ((200, 120), (3, 2), True)}  # fmt: skip


FAMILY = "llava_onevision"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py


@pytest.fixture(scope="module")
def images(artifacts):
    images = artifacts.images(FAMILY)
    assert {name: image.size[::-1] for name, image in images.items()} == {name: hw for name, (hw, *_) in SIZES.items()}
    scaled = [SIZES[name][2] for name in artifacts.family(FAMILY).greedy]
    assert any(scaled) and not all(scaled)  # the greedy comparisons cover a downscaled grid and an unscaled one
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
    assert type(processor.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"  # the backend compared
    return processor, model


def _text(processor, prompt: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _onevision_processor(image_processor, **fields):
    from transformers import LlavaOnevisionProcessor

    from edgelvm.models.processors import image_only_class
    from edgelvm.models.synthetic import build_tiny_tokenizer

    return image_only_class(LlavaOnevisionProcessor)(image_processor=image_processor, tokenizer=build_tiny_tokenizer(),
                                                     **fields)  # fmt: skip


# ---- the rule's arithmetic and interpolation -------------------------------------------------------------------
def test_numpy_bilinear_equals_torch_interpolate():
    from edgelvm.runtime.images.tiling import resize_bilinear

    rng = np.random.default_rng(0)
    shapes = [(54, 81, 20, 30), (81, 54, 30, 20), (108, 95, 39, 34), (7, 5, 4, 3), (27, 27, 27, 27)]
    shapes += [tuple(int(v) for v in rng.integers(1, 60, 4)) for _ in range(40)]  # up- and downscaling
    for h, w, out_h, out_w in shapes:
        grid = rng.standard_normal((h, w, 6)).astype(np.float32)
        reference = torch.nn.functional.interpolate(
            torch.from_numpy(grid).permute(2, 0, 1)[None], [out_h, out_w], mode="bilinear"
        )[0].permute(1, 2, 0)
        got = resize_bilinear(grid, out_h, out_w)
        assert got.shape == tuple(reference.shape) and got.dtype == np.float32
        assert np.abs(got - reference.numpy()).max() < 2e-6, (h, w, out_h, out_w)


def test_token_counts_and_packing_match_transformers_at_onevision_geometry():
    """At llava-onevision's real geometry (384-px SigLIP tiles of 27 x 27 features, the 36 default pinpoints,
    anyres_max_9): the token count vs ``LlavaOnevisionProcessor`` over many image sizes, and the numpy packing vs
    ``LlavaOnevisionModel.pack_image_features`` on random features (no model needed)."""
    from types import SimpleNamespace

    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from edgelvm.runtime.images import tiling
    from tests.processor_prompts import processor_image_token_counts, spread_sample

    config = LlavaOnevisionConfig()  # llava-onevision-qwen2-*-ov: SigLIP 384 / 14, 36 pinpoints, anyres_max_9
    pinpoints = config.image_grid_pinpoints
    image_processor = LlavaOnevisionImageProcessorPil()
    assert image_processor.image_grid_pinpoints == pinpoints and config.vision_aspect_ratio == "anyres_max_9"
    processor = _onevision_processor(image_processor, num_image_tokens=729, vision_feature_select_strategy="full",
                                     vision_aspect_ratio="anyres_max_9")  # fmt: skip
    rule = tiling.AnyresMaxRule(pinpoints, 384, (384, 384), (27, 27), newline="image_newline.npy", max_num_patches=9)
    assert tiling.AnyresMaxRule.from_params(rule.to_params()) == rule  # plain data round trip
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 4000, (200, 2))]
    sizes += [(384, 384), (768, 1152), (2304, 2304), (1, 900), (900, 1), (3000, 400), (480, 640), (1080, 1920)]
    sample = spread_sample(sizes, 32)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = processor_image_token_counts(processor, sample, processor.image_token, image_token)
    assert [rule.token_count(h, w, 729) for h, w in sample] == counts
    downscaled = [rule.packed_size(h, w) != (r1 - r0, c1 - c0) for h, w in sizes
                  for r0, r1, c0, c1 in [rule.packed_grid(h, w)]]  # fmt: skip
    assert 20 < sum(downscaled) < len(sizes) - 20  # both branches taken many times

    # Packing: transformers' own method on a stand-in model object (it reads only the config).
    fake = SimpleNamespace(config=config)
    newline = rng.standard_normal(3).astype(np.float32)
    packer = tiling.AnyresMaxRule(**{**rule.__dict__, "newline_vector": newline})
    for h, w in sizes[:12] + sizes[-8:]:
        rows, cols = rule.grid(h, w)
        features = rng.standard_normal((1 + rows * cols, 729, 3)).astype(np.float32)
        (reference,), _ = LlavaOnevisionModel.pack_image_features(
            fake, [torch.from_numpy(features)], torch.tensor([[h, w]]), torch.from_numpy(newline), "anyres_max_9"
        )
        got = packer.pack(features, h, w)
        assert got.shape == tuple(reference.shape) == (rule.token_count(h, w, 729), 3), (h, w)
        assert np.abs(got - reference.numpy()).max() < 1e-5, (h, w)


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_preprocessing_and_token_counts_match_the_hf_processor(hf, bundle, images):
    from PIL import Image

    processor, _ = hf
    vlm = VLM.load(bundle)
    rule = vlm.preprocessor.tiling
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 256, (31, 45, 4), dtype=np.uint8), mode="RGBA")
    for name, image in {**images, "rgba": rgba}.items():
        inputs = processor(images=[image], text=[_text(processor, "Hi")], return_tensors="np")
        got = vlm.preprocessor([image])
        assert got.shape == inputs["pixel_values"].shape, name
        assert np.abs(got - inputs["pixel_values"]).max() <= 1e-5, name
        assert vlm.prompt_ids(Request(prompt="Hi", images=[image])) == inputs["input_ids"][0].tolist(), name
        if name in SIZES:
            (h, w), grid, scaled = SIZES[name]
            r0, r1, c0, c1 = rule.packed_grid(h, w)
            assert rule.grid(h, w) == grid and got.shape[1] == 1 + grid[0] * grid[1], name  # base view + tiles
            assert (rule.packed_size(h, w) != (r1 - r0, c1 - c0)) == scaled, name
    # A batch of differently tiled images is zero-padded over the views, as the HF processor pads it.
    batch = list(images.values())
    expected = processor.image_processor(batch, return_tensors="np")["pixel_values"]
    assert np.abs(vlm.preprocessor(batch) - expected).max() <= 1e-5


def test_image_features_match_transformers(hf, bundle, images):
    """Vision graph over the views + numpy packing (unpad, downscale, newline rows, base view first) vs
    ``get_image_features``, within the fp32 export tolerance and with the same number of rows."""
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


def test_bundle_ships_the_rule_and_newline(checkpoint, bundle):
    from transformers import AutoModelForImageTextToText

    manifest = Manifest.load(bundle)
    assert manifest.family == "llava_onevision" and manifest.preprocess.tiling == "anyres_max"
    params = manifest.preprocess.tiling_params
    assert params["max_num_patches"] == 2 and params["max_views"] == 10  # base view + the 3x3 grid's tiles
    assert params["max_images_per_prompt"] == 1
    assert params["newline"] == "image_newline.npy" and "image_newline.npy" in manifest.files  # hashed
    assert manifest.preprocess.tokens_per_image == 16  # one view: (32 / 8)^2 SigLIP patches, no CLS
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    assert np.array_equal(np.load(bundle / "image_newline.npy"), model.model.image_newline.detach().numpy())
    for name in ("vision", "decoder", "decoder_ort"):
        assert manifest.graphs[name].parity["max_rel"] < 1e-4, name


# ---- generation ------------------------------------------------------------------------------------------------
def test_several_images_in_one_prompt_are_refused(hf, bundle, images):
    """transformers lays a multi-image prompt out differently (one untiled, square-padded view per image, as its
    chat template path shows: ``batch_num_images == [2]``); the runtime does not reproduce it and says so."""
    from edgelvm.errors import EdgeLVMError

    processor, _ = hf
    pair = [images["landscape"], images["portrait"]]
    messages = [{"role": "user", "content": [{"type": "image", "image": pair[0]}, {"type": "image", "image": pair[1]},
                                             {"type": "text", "text": "Compare."}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(inputs["batch_num_images"]) == [2] and np.asarray(inputs["pixel_values"]).shape[1] == 1
    vlm = VLM.load(bundle)
    with pytest.raises(EdgeLVMError, match="at most 1"):
        vlm.generate(pair, "Compare.", max_new_tokens=4)
    vlm.generate_batch([(pair[0], "Hi"), (pair[1], "Hi")], max_new_tokens=2)  # one image per request is fine


# ---- loading ---------------------------------------------------------------------------------------------------
def test_processor_loading_with_and_without_torchvision(checkpoint, monkeypatch):
    """Without torchvision AutoProcessor cannot build the video processor; the adapter then builds the processor
    from the checkpoint's parts. Where AutoProcessor works (a real checkpoint with torchvision), its result is used."""
    import importlib.util
    from types import SimpleNamespace

    import transformers

    from edgelvm.models.llava_onevision import LlavaOnevisionAdapter

    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError):
            transformers.AutoProcessor.from_pretrained(checkpoint)
    processor = LlavaOnevisionAdapter.load_processor(str(checkpoint))
    assert getattr(processor, "video_processor", None) is None and processor.vision_aspect_ratio == "anyres_max_2"
    assert processor.num_image_tokens == 16 and processor.chat_template
    sentinel = SimpleNamespace(image_processor=object(), tokenizer=object())  # a processor, not a bare tokenizer
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: sentinel)
    assert LlavaOnevisionAdapter.load_processor(str(checkpoint)) is sentinel


@pytest.mark.parametrize(
    ("file", "key", "value", "match"),
    [
        ("config.json", "vision_aspect_ratio", "anyres", "not of the form 'anyres_max_N'"),
        ("processor_config.json", "vision_aspect_ratio", "anyres_max_4", "vision_aspect_ratio .* differs"),
        ("processor_config.json", "num_image_tokens", 25, "num_image_tokens 25 does not match"),
    ],
)
def test_inconsistent_checkpoints_are_clear_errors(checkpoint, tmp_path, file, key, value, match):
    import json
    import shutil

    from edgelvm.errors import UnsupportedModelError
    from edgelvm.models import load_model

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    config = json.loads((bad / file).read_text())
    config[key] = value
    (bad / file).write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=match):
        load_model(str(bad))

"""InternVL (``internvl``): dynamic tiling (aspect-ratio grid + thumbnail last), ``<img>`` / ``</img>`` markers around
the image tokens, pixel shuffle + projector inside the vision graph; export → runtime parity with Hugging Face on a
tiny random checkpoint whose 32-px tiles (at most 6) make images of a few dozen pixels tile differently.

Reference: transformers' PIL image processor (``GotOcr2ImageProcessorPil``, the backend transformers picks without
torchvision; the runtime reproduces that one), ``InternVLProcessor`` (built without its video processor, which
needs torchvision) and ``InternVLForConditionalGeneration.generate``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
#: (height, width) -> (tile rows, tile columns) that transformers picks with 32-px tiles and max_patches 6
SIZES = {"landscape": ((30, 64), (1, 2)), "portrait": ((70, 33), (2, 1)), "square": ((48, 48), (2, 2)),
         "small": ((20, 20), (1, 1)), "large": ((200, 120), (3, 2))}  # fmt: skip


FAMILY = "internvl"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py


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
    assert type(processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"  # the backend compared against
    return processor, model


def _text(processor, prompt: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_tiling_arithmetic_matches_transformers_at_internvl_geometry():
    """Candidate grids and the chosen grid (ties included) vs transformers' own functions over many image sizes, and
    the whole image segment (``<img>``, 256 context tokens a view, ``</img>``) vs the ids ``InternVLProcessor``
    returns for a sample of them, at the real InternVL2.5/3 geometry (448-px tiles, at most 12 tiles)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_all_supported_aspect_ratios,
        get_optimal_tiled_canvas,
    )

    from edgelvm.models.processors import image_only_class
    from edgelvm.models.synthetic import build_tiny_tokenizer
    from edgelvm.runtime.images.dynamic_tiles import DynamicTilesRule, supported_grids
    from tests.fixtures.internvl import INTERNVL_TOKENS
    from tests.processor_prompts import processor_prompt_ids, spread_sample

    for lo, hi in ((1, 12), (1, 6), (2, 9), (1, 1), (4, 4)):
        assert supported_grids(lo, hi) == get_all_supported_aspect_ratios(lo, hi)
    tokenizer = build_tiny_tokenizer(named_tokens=INTERNVL_TOKENS)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                               min_patches=1, max_patches=12)  # fmt: skip
    processor = image_only_class(InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                    image_seq_length=256)  # fmt: skip
    start, end, ctx = tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
    rule = DynamicTilesRule((448, 448), 1, 12, 256, start_token_id=start, end_token_id=end)
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(10, 4000, (200, 2))]
    sizes += [(448, 448), (896, 448), (448, 896), (600, 600), (700, 700), (1000, 1000), (500, 1500), (1, 900)]
    sample = spread_sample(sizes, 32)
    prompts = processor_prompt_ids(processor, sample, processor.image_token)
    assert [ids[1:] for ids in prompts] == [[int(i) for i in rule.segment(h, w, ctx)] for h, w in sample]  # after BOS
    for h, w in sizes:
        cols, rows = get_optimal_tiled_canvas((h, w), (448, 448), 1, 12)
        assert rule.grid(h, w) == (rows, cols)
    assert len({rule.grid(h, w) for h, w in sizes}) >= 15  # many layouts occurred
    # Square images tie between 1x1, 2x2, 3x3: more tiles win while the image covers over half their canvas.
    assert [rule.grid(s, s) for s in (448, 600, 700, 1000)] == [(1, 1), (1, 1), (2, 2), (3, 3)]
    assert rule.max_views == 13


def test_preprocessing_and_prompt_ids_match_the_hf_processor(hf, bundle, images):
    from PIL import Image

    processor, _ = hf
    vlm = VLM.load(bundle)
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (31, 45, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (90, 40), dtype=np.uint8), mode="L")
    cases = {**images, "rgba": rgba, "gray": gray}
    for name, image in cases.items():
        inputs = processor(images=[image], text=[_text(processor, "Hi")], return_tensors="np")
        got = vlm.preprocessor.views(image)
        assert got.shape == inputs["pixel_values"].shape, name
        assert np.abs(got - inputs["pixel_values"]).max() <= 1e-5, name
        assert vlm.prompt_ids(Request(prompt="Hi", images=[image])) == inputs["input_ids"][0].tolist(), name
        if name in SIZES:
            (h, w), grid = SIZES[name]
            assert vlm.preprocessor.tiling.grid(h, w) == grid
            tiles = grid[0] * grid[1]
            assert got.shape[0] == tiles + (1 if tiles > 1 else 0)  # the thumbnail only with several tiles
    # The thumbnail is the last view: the whole image resized to one tile.
    thumb = processor.image_processor([images["large"]], crop_to_patches=False, return_tensors="np")["pixel_values"]
    assert np.abs(vlm.preprocessor.views(images["large"])[-1] - thumb[0]).max() <= 1e-5
    # A batch of differently tiled images: the processor concatenates their views in order.
    batch = list(images.values())
    expected = processor.image_processor(batch, crop_to_patches=True, return_tensors="np")
    assert np.abs(np.concatenate([vlm.preprocessor.views(i) for i in batch]) - expected["pixel_values"]).max() <= 1e-5
    assert [len(vlm.preprocessor.views(i)) for i in batch] == list(expected["num_patches"])
    counts = vlm.image_token_counts([images["small"], images["square"]])
    assert counts == [16, 5 * 16]


def test_untiled_processor_matches_the_hf_image_processor(hf, bundle, images):
    """``crop_to_patches`` off (or ``max_patches`` 1): one view, the whole image resized to a tile."""
    import dataclasses

    from edgelvm.runtime.images.dynamic_tiles import DynamicTilesRule
    from edgelvm.runtime.images.preprocess import ImagePreprocessor

    processor, _ = hf
    spec = Manifest.load(bundle).preprocess
    params = {**spec.tiling_params, "max_tiles": 1}
    pre = ImagePreprocessor(dataclasses.replace(spec, tiling_params=params), bundle)
    assert DynamicTilesRule.from_params(params).max_views == 1
    for name, image in images.items():
        expected = processor.image_processor([image], crop_to_patches=False, return_tensors="np")["pixel_values"]
        got = pre.views(image)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-5, name
        assert pre.token_count(image.height, image.width) == 16


def test_image_features_match_transformers(hf, bundle, images):
    """Vision graph (tower, pixel shuffle, projector) over the views + packing vs ``get_image_features``: within the
    fp32 export tolerance, with exactly the same number of rows."""
    processor, model = hf
    vlm = VLM.load(bundle, vision_cache_mb=0)
    for name, image in images.items():
        pixels = processor.image_processor([image], crop_to_patches=True, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                 vision_feature_select_strategy="default")  # fmt: skip
        reference = out.pooler_output.reshape(-1, out.pooler_output.shape[-1]).numpy()
        got = vlm._image_features([image])[0]
        assert got.shape == reference.shape, name
        assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-4, name


def test_bundle_ships_the_tiling_rule(checkpoint, bundle):
    manifest = Manifest.load(bundle)
    pre = manifest.preprocess
    assert manifest.family == "internvl" and pre.tiling == "dynamic_tiles"
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert pre.image_token == "<IMG_CONTEXT>" and pre.image_token_id == added["<IMG_CONTEXT>"]
    params = pre.tiling_params
    assert (params["start_token_id"], params["end_token_id"]) == (added["<img>"], added["</img>"])
    assert pre.tokens_per_image == params["tokens_per_view"] == 16  # (32 / 4 / 2)^2: pixel-shuffled 8x8 patches
    assert params["max_views"] == 7  # 6 tiles + thumbnail
    for name in ("vision", "decoder", "decoder_ort"):
        assert manifest.graphs[name].parity["max_rel"] < 1e-4, name
    from edgelvm.build import BuildConfig
    from edgelvm.build import tensorrt_builder as tb

    (vision,) = tb.vision_profiles(manifest, BuildConfig(max_batch=2))
    assert vision.shapes["pixel_values"]["max"][0] == 14


# ---- generation ------------------------------------------------------------------------------------------------
def test_two_differently_tiled_images_in_one_prompt_match_hf(hf, bundle, images):
    processor, model = hf
    vlm = VLM.load(bundle)
    pair = [images["square"], images["portrait"]]
    inputs = processor(images=pair, text=[_text(processor, "Compare.", 2)], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 5 + 3
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert vlm.prompt_ids(Request(prompt="Compare.", images=pair)) == inputs["input_ids"][0].tolist()
    vlm.generate(pair, "Compare.", max_new_tokens=12)
    assert vlm.last_output_ids[0] == trim_after_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), _eos(model))


def test_llama_text_model_matches_hf(images, tmp_path):
    """The Llama-text variant (InternVL2.5 style): both decoders' greedy tokens equal HF's on two grids."""
    from transformers import AutoModelForImageTextToText

    from edgelvm.export import ExportConfig, export
    from edgelvm.models.internvl import InternVLAdapter
    from tests.fixtures.internvl import build_tiny_internvl

    checkpoint = build_tiny_internvl(tmp_path / "ckpt", text="llama", seed=1)
    bundle = export(checkpoint, tmp_path / "bundle", ExportConfig(max_length=256)).bundle_dir
    processor = InternVLAdapter.load_processor(str(checkpoint))
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    assert model.config.text_config.model_type == "llama"
    vlms = [VLM.load(bundle, decoder=d) for d in ("portable", "fused")]
    for name in ("portrait", "small"):
        inputs = processor(images=[images[name]], text=[_text(processor, PROMPTS[0])], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected = trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), _eos(model))
        for vlm in vlms:
            vlm.generate(images[name], PROMPTS[0], max_new_tokens=12)
            assert vlm.last_output_ids[0] == expected, (name, vlm.backend.fused)


# ---- loading -------------------------------------------------------------------------------------------------------
def test_loads_without_torchvision_and_refuses_inconsistent_geometry(checkpoint, tmp_path):
    from transformers.utils import is_torchvision_available

    from edgelvm.errors import UnsupportedModelError
    from edgelvm.models import load_model

    adapter = load_model(str(checkpoint))
    assert adapter.family == "internvl"
    if not is_torchvision_available():  # the full InternVLProcessor needs the video processor
        assert adapter.processor.get_attributes() == ["image_processor", "tokenizer"]
    assert adapter.processor.image_seq_length == 16 and adapter.processor.chat_template
    for name in ("processor_config.json", "tokenizer_config.json"):  # saved as what a torchvision install loads
        assert json.loads((checkpoint / name).read_text())["processor_class"] == "InternVLProcessor", name
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    path = bad / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_seq_length"] = 64
    path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="64 image tokens per tile"):
        load_model(str(bad))


# ---- compression stages (the shared recipes: test_families.py) ---------------------------------------------------
def test_pruned_vision_attention_is_cut_in_its_separate_q_k_v(artifacts):
    """InternVL's vision attention has separate q/k/v projections: half of 4 heads of 12 leaves 24 outputs."""
    from edgelvm.models import load_model

    adapter = load_model(str(artifacts.pruned(FAMILY).out))
    assert adapter.model.model.vision_tower.encoder.layer[0].attention.q_proj.out_features == 24


def test_prune_refuses_a_qk_norm_vision_tower(checkpoint, tmp_path):
    from edgelvm.errors import UnsupportedModelError
    from edgelvm.prune import PruneConfig, prune

    qk = tmp_path / "qk"
    shutil.copytree(checkpoint, qk)
    path = qk / "config.json"
    config = json.loads(path.read_text())
    config["vision_config"]["use_qk_norm"] = True
    path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="use_qk_norm"):
        prune(str(qk), None, PruneConfig(out=tmp_path / "out", vision_heads=0.5, importance="magnitude",
                                         progress=False))  # fmt: skip

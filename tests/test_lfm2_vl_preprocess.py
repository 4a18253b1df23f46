"""LFM2-VL's image rule (``runtime/images/lfm2_tiles.py``): layout, prompt ids, patches and packing.

The first tests need only numpy + PIL (hand-computed layouts, the patch order from transformers' documented
reshape / permute). The ones at the end compare with transformers' ``Lfm2VlImageProcessor`` / ``Lfm2VlProcessor``,
which need torchvision (not a dependency of this project: they are skipped without it).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgelvm.errors import BundleError
from edgelvm.manifest import PreprocessSpec
from edgelvm.runtime.images.lfm2_tiles import Lfm2TilesRule
from edgelvm.runtime.images.preprocess import ImagePreprocessor

IMAGE = 9  # the image token id of the hand-computed tests
START, END, THUMB = [1001], [1002], [1003]


def row_col_ids(n: int) -> list[list[list[int]]]:
    return [[[2000 + 100 * r + c] for c in range(n)] for r in range(n)]


def params(**overrides) -> dict:
    """transformers' defaults (``Lfm2VlImageProcessor``), with made-up marker ids."""
    out = {
        "encoder_patch_size": 16,
        "downsample_factor": 2,
        "tile_size": 512,
        "min_image_tokens": 64,
        "max_image_tokens": 256,
        "min_tiles": 2,
        "max_tiles": 10,
        "do_image_splitting": True,
        "use_thumbnail": True,
        "max_pixels_tolerance": 2.0,
        "image_start_ids": START,
        "image_end_ids": END,
        "thumbnail_ids": THUMB,
        "row_col_token_ids": row_col_ids(10),
        "use_image_special_tokens": True,
    }
    return {**out, **overrides}


#: small enough that many sizes split: 64-px tiles of 4x4 patches, 4 to 16 tokens a view, up to 4 tiles
SMALL = {"tile_size": 64, "max_image_tokens": 16, "min_image_tokens": 4, "max_tiles": 4, "encoder_patch_size": 16}


def spec(**overrides) -> PreprocessSpec:
    """LFM2-VL's preprocess section: no resize / crop of the views, rescale 1/255, mean = std = 0.5."""
    fields = {
        "resize_mode": "none",
        "size": {},
        "resample": "bilinear",
        "center_crop": None,
        "rescale_factor": 1 / 255,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "convert_rgb": True,
        "image_token": "<image>",
        "image_token_id": IMAGE,
        "tokens_per_image": 0,
    }
    return PreprocessSpec(**{**fields, **overrides})


def runtime_pixels(rule: Lfm2TilesRule, image: Image.Image) -> np.ndarray:
    """The runtime's ``pixel_values`` for one image: ``ImagePreprocessor.views`` with this rule as the bundle's."""
    return ImagePreprocessor(spec(tiling="lfm2_tiles", tiling_params=rule.to_params())).views(image)


# ---- parameters -----------------------------------------------------------------------------------------------------
def test_params_round_trip():
    for extra in ({}, SMALL, {"do_image_splitting": False, "use_thumbnail": False, "use_image_special_tokens": False}):
        rule = Lfm2TilesRule.load(params(**extra))
        assert Lfm2TilesRule.load(rule.to_params()) == rule
    assert Lfm2TilesRule.load(params()).max_views == 11
    assert Lfm2TilesRule.load(params(do_image_splitting=False)).max_views == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"tile_size": None},
        {"image_start_ids": 5},
        {"tile_size": 500},  # not a multiple of patch * factor: the model's features would not fill the tokens
        {"min_tiles": 4, "max_tiles": 3},
        {"min_tiles": 1},  # a one-tile split: transformers counts thumbnail tokens for a tile's features
        {"encoder_patch_size": 0},
        {"min_image_tokens": 300},
        {"max_pixels_tolerance": 0},
        {"row_col_token_ids": row_col_ids(9)},  # a 1x10 grid has no marker
        {"thumbnail_ids": []},
    ],
)
def test_bad_params_are_a_bundle_error(bad):
    with pytest.raises(BundleError) as err:
        Lfm2TilesRule.load(params(**bad))
    assert err.value.where == "edgelvm.json: preprocess.tiling_params"
    assert "re-export the bundle" in err.value.fix


def test_a_missing_param_is_a_bundle_error():
    incomplete = params()
    del incomplete["max_tiles"]
    with pytest.raises(BundleError, match="max_tiles"):
        Lfm2TilesRule.load(incomplete)


# ---- layout and prompt ids, computed by hand -------------------------------------------------------------------------
def test_small_image_is_one_view_upscaled_to_min_tokens():
    rule = Lfm2TilesRule.load(params())
    # 100x50 (h x w): rounded to 96x64 = 6144 px < 64 * 32² -> beta = sqrt(65536 / 5000) = 3.620;
    # h = ceil(100 * 3.620 / 32) * 32 = 384, w = ceil(50 * 3.620 / 32) * 32 = 192 -> 12 x 6 tokens
    assert rule.layout(100, 50) == (1, 1, 384, 192)
    assert rule.view_shapes(100, 50) == [(24, 12)]
    assert rule.token_count(100, 50) == 72
    assert rule.segment(100, 50, IMAGE) == START + [IMAGE] * 72 + END
    assert rule.planned_sizes(100, 50) == [(384, 192)]


def test_large_image_splits_into_tiles_and_a_thumbnail():
    rule = Lfm2TilesRule.load(params())
    # 1024x2048: aspect 2 -> (2, 1) and (4, 2) tie at diff 0, and 2M px > 0.5 * 512² * 8 -> 2 rows x 4 columns;
    # thumbnail: beta = sqrt(2M / 512²) = 2.828 -> h = floor(11.3) * 32 = 352, w = floor(22.6) * 32 = 704
    assert rule.layout(1024, 2048) == (2, 4, 352, 704)
    assert rule.view_tokens(1024, 2048) == [256] * 8 + [11 * 22]
    expected = START
    for r in range(2):
        for c in range(4):
            expected = expected + [2000 + 100 * r + c] + [IMAGE] * 256
    expected = expected + THUMB + [IMAGE] * 242 + END
    assert rule.segment(1024, 2048, IMAGE) == expected
    assert rule.planned_sizes(1024, 2048) == [(1024, 2048), (512, 512), (352, 704)]


def test_too_large_threshold_rounds_half_to_even():
    rule = Lfm2TilesRule.load(params())
    # 512 x 1024 covers exactly 256 * 32² * 2 px: not too large (strictly greater splits); one view of 11 x 22
    assert rule.layout(512, 1024) == (1, 1, 352, 704)
    # 1040 / 32 = 32.5 rounds to 32 (Python's round: half to even) -> 1024 again: one view
    assert rule.layout(512, 1040)[:2] == (1, 1)
    # 1056 = 33 * 32: too large; aspect 2.06 -> (2, 1) and (4, 2) tie, but 540672 px < 0.5 * 512² * 8 keeps (2, 1)
    assert rule.layout(512, 1056) == (1, 2, 352, 704)
    assert rule.token_count(512, 1056) == 2 * 256 + 242


def test_without_splitting_or_special_tokens():
    rule = Lfm2TilesRule.load(params(do_image_splitting=False))
    assert rule.layout(1024, 2048) == (1, 1, 352, 704)
    assert rule.segment(1024, 2048, IMAGE) == START + [IMAGE] * 242 + END
    bare = Lfm2TilesRule.load(params(use_image_special_tokens=False, use_thumbnail=False))
    assert bare.segment(1024, 2048, IMAGE) == [IMAGE] * (8 * 256)
    assert bare.segment(100, 50, IMAGE) == [IMAGE] * 72
    assert bare.view_shapes(1024, 2048) == [(32, 32)] * 8


# ---- pixels ----------------------------------------------------------------------------------------------------------
def transformers_patches(chw: np.ndarray, p: int) -> np.ndarray:
    """``convert_image_to_patches`` in numpy: reshape (B, C, nh, p, nw, p), permute (0, 2, 4, 3, 5, 1)."""
    batch = chw[None]
    _, c, h, w = batch.shape
    out = batch.reshape(1, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)
    return out.reshape(1, (h // p) * (w // p), -1)[0]


def test_flatten_is_transformers_patch_order_zero_padded():
    rule = Lfm2TilesRule.load(params(**SMALL))
    rng = np.random.default_rng(0)
    views = [rng.standard_normal((3, 64, 64)).astype(np.float32), rng.standard_normal((3, 32, 96)).astype(np.float32)]
    flat = rule.flatten(views)
    assert flat.shape == (2, 16, 16 * 16 * 3) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat[0], transformers_patches(views[0], 16))
    np.testing.assert_array_equal(flat[1, :12], transformers_patches(views[1], 16))
    assert not flat[1, 12:].any()
    # one element by the documented meaning: patch (row 1, col 4), pixel (py 3, px 5), channel 2
    assert flat[1, 1 * 6 + 4, (3 * 16 + 5) * 3 + 2] == views[1][2, 16 + 3, 64 + 5]


def test_views_graph_inputs_and_flatten_agree():
    rule = Lfm2TilesRule.load(params(**SMALL))
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 300, 3), dtype=np.uint8))
    rows, cols, h, w = rule.layout(150, 300)
    assert (rows, cols) == (1, 2)
    views = rule.views(rgb, Image.Resampling.BILINEAR)
    assert [(v.height, v.width) for v in views] == [(64, 64)] * 2 + [(h, w)]
    canvas = np.asarray(rgb.resize((128, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(np.asarray(views[1]), canvas[:, 64:])
    assert {(v.height, v.width) for v in views} <= set(rule.planned_sizes(150, 300))
    flat = runtime_pixels(rule, rgb)
    inputs = rule.graph_inputs(150, 300)
    assert list(inputs)[:2] == ["pixel_attention_mask", "spatial_shapes"]
    assert all(value.dtype == np.int64 for value in inputs.values())
    np.testing.assert_array_equal(inputs["spatial_shapes"], [[4, 4], [4, 4], [h // 16, w // 16]])
    assert inputs["pixel_attention_mask"].shape == flat.shape[:2]
    np.testing.assert_array_equal(inputs["pixel_attention_mask"].sum(1), [16, 16, (h // 16) * (w // 16)])


def transformers_token_patches(spatial_shapes: np.ndarray, num_patches: int, factor: int) -> np.ndarray:
    """``Lfm2VlModel.get_image_features``' ``patch_index`` (after the padding fill, before flattening), in numpy."""
    widths = spatial_shapes[:, 1, None]
    blocks_per_row = widths // factor
    num_tokens = (spatial_shapes[:, 0, None] // factor) * blocks_per_row
    token = np.arange(num_patches // factor**2)[None]
    block_offset = np.arange(factor)
    rows = (token // blocks_per_row * factor)[..., None, None] + block_offset[:, None]
    columns = (token % blocks_per_row * factor)[..., None, None] + block_offset
    image_offset = np.arange(len(spatial_shapes))[:, None, None, None] * num_patches
    patch_index = image_offset + rows * widths[..., None, None] + columns
    patch_index = np.where((token < num_tokens)[..., None, None], patch_index, 0)
    return patch_index.reshape(len(spatial_shapes), -1, factor * factor)


@pytest.mark.parametrize("extra", [{}, SMALL, {**SMALL, "downsample_factor": 1}])
def test_token_patches_are_transformers_gather(extra):
    rule = Lfm2TilesRule.load(params(**extra))
    for height, width in [(100, 50), (1024, 2048), (150, 300), (40, 300), (777, 1301), (3000, 400)]:
        inputs = rule.graph_inputs(height, width)
        patches = inputs["pixel_attention_mask"].shape[1]
        expected = transformers_token_patches(inputs["spatial_shapes"], patches, rule.downsample_factor)
        np.testing.assert_array_equal(inputs["token_patches"], expected, err_msg=f"{height}x{width}")


def test_pack_keeps_each_views_valid_tokens_in_order():
    rule = Lfm2TilesRule.load(params(**SMALL))
    tokens = rule.view_tokens(150, 300)
    assert tokens == [4, 4, 10]  # two tiles of 2x2 tokens; the 64x160 thumbnail has 2x5 (P = 40 patches)
    features = np.arange(3 * 10 * 2, dtype=np.float32).reshape(3, 10, 2)
    packed = rule.pack(features, 150, 300)
    np.testing.assert_array_equal(packed, np.concatenate([features[0, :4], features[1, :4], features[2]]))
    for bad in (features[:2], features[:, :9], features[0]):
        with pytest.raises(BundleError, match="3 views"):
            rule.pack(bad, 150, 300)


def test_the_rule_imports_without_torch():
    code = "import sys; import edgelvm.runtime.images.lfm2_tiles; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---- against transformers (needs torchvision) ------------------------------------------------------------------------
def reference_sizes(max_edge: int, thresholds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Tiny, huge, extreme aspect, at-threshold and 80 log-uniform random sizes (height, width)."""
    rng = np.random.default_rng(7)
    fixed = [(1, 1), (1, 7), (5, 3), (16, 16), (31, 33), (32, 32), (1, 2000), (2000, 1), (30, 4000), (4000, 30)]
    fixed += [(3000, 4000), (4000, 3000), (max_edge, max_edge), (2, 3000), (3000, 2)]
    randoms = [tuple(int(x) for x in np.exp(rng.uniform(math.log(8), math.log(max_edge), 2))) for _ in range(80)]
    return fixed + thresholds + randoms


DEFAULT_THRESHOLDS = [(512, 1024), (512, 1040), (512, 1056), (1024, 512), (724, 724), (725, 725), (256, 256)]
DEFAULT_THRESHOLDS += [(255, 257), (736, 736), (700, 748), (1023, 2049), (2048, 1024), (400, 1800), (160, 4000)]
SMALL_THRESHOLDS = [(128, 256), (128, 272), (128, 288), (256, 128), (90, 90), (91, 91), (64, 64), (32, 96), (40, 300)]


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torchvision")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Lfm2VlImageProcessor, Lfm2VlProcessor, PreTrainedTokenizerFast

    markers = ["<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"]
    markers += [f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)]
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(markers)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")

    def make(**kwargs):
        processor = Lfm2VlProcessor(image_processor=Lfm2VlImageProcessor(**kwargs), tokenizer=fast)
        ids = fast.convert_tokens_to_ids
        rule_params = params(
            **kwargs,
            image_start_ids=[ids("<|image_start|>")],
            image_end_ids=[ids("<|image_end|>")],
            thumbnail_ids=[ids("<|img_thumbnail|>")],
            row_col_token_ids=[[[ids(f"<|img_row_{r}_col_{c}|>")] for c in range(1, 11)] for r in range(1, 11)],
        )
        return processor, Lfm2TilesRule.load(rule_params), ids("<image>")

    return make


def layout_kwargs(processor) -> dict:
    """The processor's settings ``_get_split_layout`` takes (as ``_get_num_multimodal_tokens`` gathers them)."""
    ip = processor.image_processor
    names = ("downsample_factor", "min_tiles", "max_tiles", "min_image_tokens", "max_image_tokens")
    out = {name: getattr(ip, name) for name in (*names, "encoder_patch_size", "tile_size", "max_pixels_tolerance")}
    return {**out, "min_tiles": 1, "max_tiles": 1} if not ip.do_image_splitting else out


def check_against_processor(processor, rule, image_id, height, width, **call) -> bool:
    """Compare one size with transformers; False where transformers itself fails on it (and only the layout is)."""
    import torch

    image = torch.zeros((3, height, width), dtype=torch.uint8)
    rows, cols, new_h, new_w = rule.layout(height, width)
    layout = processor.image_processor._get_split_layout(height, width, **layout_kwargs(processor))
    assert layout == (rows * cols > 1, rows, cols, new_h, new_w)
    thumbnail_patches = (new_h // rule.encoder_patch_size) * (new_w // rule.encoder_patch_size)
    if rows * cols > 1 and rule.use_thumbnail and thumbnail_patches > processor.image_processor.max_num_patches:
        # a thumbnail of more patches than transformers pads the tiles to (elongated images, small settings
        # only): transformers cannot stack the views and fails; the runtime pads every view to the largest
        with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
            processor(images=[image], text="<image>", input_data_format="channels_first", **call)
        return False
    out = processor(images=[image], text="<image>", input_data_format="channels_first", **call)
    info = processor.image_processor(images=[image], return_row_col_info=True, input_data_format="channels_first")
    where = f"{height}x{width}"
    assert (info["image_rows"][0], info["image_cols"][0], list(info["image_sizes"][0])) == (rows, cols, [new_h, new_w])
    assert out["input_ids"][0] == rule.segment(height, width, image_id), where
    inputs = rule.graph_inputs(height, width)
    mask, patches = out["pixel_attention_mask"].numpy(), inputs["pixel_attention_mask"].shape[1]
    if out["pixel_values"].shape[1] > mask.shape[1]:
        # a view of more than max_num_patches patches (only past an aspect ratio of 200, which the runtime refuses):
        # transformers neither pads nor extends its mask, which stays max_num_patches ones
        assert (out["pixel_values"].shape[1], len(mask)) == (patches, 1) and inputs["pixel_attention_mask"].all()
    else:
        np.testing.assert_array_equal(mask[:, :patches], inputs["pixel_attention_mask"], err_msg=where)
        assert not mask[:, patches:].any(), where  # transformers pads further, to its fixed max_num_patches
    np.testing.assert_array_equal(out["spatial_shapes"].numpy(), inputs["spatial_shapes"], err_msg=where)
    assert len(rule.view_tokens(height, width)) == out["pixel_values"].shape[0] <= rule.max_views
    return True


@pytest.mark.parametrize(
    ("kwargs", "thresholds", "max_edge"),
    [({}, DEFAULT_THRESHOLDS, 5000), (SMALL, SMALL_THRESHOLDS, 1500)],
    ids=["defaults", "small"],
)
def test_layout_prompt_and_masks_match_transformers(hf, kwargs, thresholds, max_edge):
    processor, rule, image_id = hf(**kwargs)
    sizes = reference_sizes(max_edge, thresholds)
    assert len(sizes) >= 100
    splits = compared = 0
    for height, width in sizes:
        compared += check_against_processor(processor, rule, image_id, height, width)
        splits += rule.layout(height, width)[:2] != (1, 1)
    assert 20 <= splits <= len(sizes) - 20  # both branches were exercised
    assert compared >= len(sizes) - 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_image_splitting": False},
        {**SMALL, "use_thumbnail": False},
        {**SMALL, "min_tiles": 3, "max_tiles": 6, "max_pixels_tolerance": 1.0, "downsample_factor": 1},
    ],
)
def test_other_settings_match_transformers(hf, kwargs):
    processor, rule, image_id = hf(**kwargs)
    for height, width in reference_sizes(3000, SMALL_THRESHOLDS + DEFAULT_THRESHOLDS)[::3]:
        check_against_processor(processor, rule, image_id, height, width)


def test_prompt_without_special_tokens_matches_transformers(hf):
    processor, with_markers, image_id = hf(**SMALL)
    rule = Lfm2TilesRule.load({**with_markers.to_params(), "use_image_special_tokens": False})
    for height, width in [(40, 300), (300, 40), (20, 20), (500, 500)]:
        out = processor(images=[np.zeros((height, width, 3), np.uint8)], text="<image>", use_image_special_tokens=False)
        assert out["input_ids"][0] == rule.segment(height, width, image_id)


def sample_images() -> dict[str, Image.Image]:
    """Noise and smooth gradients; RGB, RGBA (composited on white by both sides) and L; one-view and split sizes."""
    rng = np.random.default_rng(3)

    def noise(h: int, w: int, c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    def gradient(h: int, w: int) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w]
        channels = [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // (h + w)]
        return np.stack(channels, -1).astype(np.uint8)

    return {
        "noise_small": Image.fromarray(noise(100, 50, 3)),
        "noise_one_view": Image.fromarray(noise(480, 640, 3)),
        "noise_split": Image.fromarray(noise(1024, 2048, 3)),
        "noise_split_odd": Image.fromarray(noise(777, 1301, 3)),
        "gradient_one_view": Image.fromarray(gradient(300, 500)),
        "gradient_split": Image.fromarray(gradient(1500, 900)),
        "gradient_wide": Image.fromarray(gradient(120, 1900)),
        "rgba_split": Image.fromarray(noise(900, 1200, 4), "RGBA"),
        "rgba_small": Image.fromarray(noise(64, 96, 4), "RGBA"),
        "l_gradient": Image.fromarray(gradient(700, 1400)[..., 0], "L"),
        "l_noise": Image.fromarray(noise(333, 222, 1)[..., 0], "L"),
    }


#: one grey level after rescale (1/255) and normalize (std 0.5)
LEVEL = 1 / 255 / 0.5


def pixel_differences(processor, rule) -> dict[str, np.ndarray]:
    """Per image: |runtime - transformers| of the normalized patches, in grey levels."""
    out = {}
    for name, image in sample_images().items():
        ref = processor.image_processor(images=[image], do_convert_rgb=True)["pixel_values"].numpy()
        ours = runtime_pixels(rule, image)
        assert ours.shape[0] == ref.shape[0] and ours.shape[2] == ref.shape[2], name
        assert not ref[:, ours.shape[1] :].any(), name
        out[name] = np.abs(ours - ref[:, : ours.shape[1]]) / LEVEL
    return out


@pytest.mark.parametrize("kwargs", [{}, SMALL], ids=["defaults", "small"])
def test_pixel_values_match_transformers_within_a_grey_level(hf, kwargs):
    """Both resizes are separable bilinear with the same support (antialiased: the triangle widened by the
    downscale factor), run on uint8 in fixed point with a uint8 intermediate pass; PIL's coefficients have 22 bits,
    torchvision's uint8 kernel int16 ones, so a pixel's rounding may differ by one grey level. Measured on these
    images and 60 more random-size noise images: at most 1 level (2/255 = 0.0078 after normalize), in 0-26% of the
    elements (most when upscaling noise; smooth gradients: <= 0.01%), every difference a whole number of levels
    (the same sampling geometry, only rounding differs)."""
    processor, rule, _ = hf(**kwargs)
    diffs = pixel_differences(processor, rule)
    print({name: (round(float(d.max()) * LEVEL, 6), round(float((d > 1e-3).mean()), 6)) for name, d in diffs.items()})
    for name, d in diffs.items():
        assert np.abs(d - np.round(d)).max() < 1e-3, name  # whole grey levels: rounding, not misplaced samples
        assert d.max() <= 1 + 1e-3, name
        assert (d > 0.5).mean() <= (0.001 if "gradient" in name else 0.3), name
    assert np.mean([(d > 0.5).mean() for d in diffs.values()]) <= 0.1


@pytest.mark.parametrize("kwargs", [{}, SMALL], ids=["defaults", "small"])
def test_the_data_processor_makes_the_processors_inputs(hf, kwargs):
    """Where torchvision is missing, edgelvm encodes records (calibration) with ``Lfm2VlDataProcessor``: the same
    ids, masks and shapes as ``Lfm2VlProcessor`` for a prompt with two images (one split, one not), pixels within the
    grey level above."""
    from edgelvm.models.lfm2_vl import Lfm2VlDataProcessor

    processor, _, _ = hf(**kwargs)
    ours = Lfm2VlDataProcessor(processor.tokenizer, dict(kwargs))
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 1100), (90, 70))]
    text = "<image> first <image> second"
    theirs = processor(images=[images], text=[text], return_tensors="pt")
    mine = ours(images=images, text=[text], return_tensors="pt")
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    patches = mine["pixel_values"].shape[1]
    np.testing.assert_array_equal(mine["spatial_shapes"].numpy(), theirs["spatial_shapes"].numpy())
    np.testing.assert_array_equal(mine["pixel_attention_mask"].numpy(), theirs["pixel_attention_mask"][:, :patches])
    assert np.abs(mine["pixel_values"].numpy() - theirs["pixel_values"][:, :patches].numpy()).max() <= LEVEL + 1e-6

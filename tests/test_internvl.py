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
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from edgelvm.testing import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
#: (height, width) -> (tile rows, tile columns) that transformers picks with 32-px tiles and max_patches 6
SIZES = {"landscape": ((30, 64), (1, 2)), "portrait": ((70, 33), (2, 1)), "square": ((48, 48), (2, 2)),
         "small": ((20, 20), (1, 1)), "large": ((200, 120), (3, 2))}  # fmt: skip
#: images the greedy comparisons use: 1 x 2, 2 x 2 (a tie won by more tiles), 1 x 1 (no thumbnail), 3 x 2 grids
GREEDY = ("landscape", "square", "small", "large")


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(7)
    return {
        name: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for name, ((h, w), _) in SIZES.items()
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from edgelvm.testing import build_tiny_internvl

    return build_tiny_internvl(tmp_path_factory.mktemp("internvl") / "ckpt")


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    from edgelvm.export import ExportConfig, export

    return export(checkpoint, tmp_path_factory.mktemp("internvl_bundle") / "b", ExportConfig(max_length=384)).bundle_dir


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForImageTextToText

    from edgelvm.models.internvl import InternVLAdapter

    processor = InternVLAdapter.load_processor(str(checkpoint))
    assert type(processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"  # the backend compared against
    return processor, AutoModelForImageTextToText.from_pretrained(checkpoint).eval()


def _text(processor, prompt: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


@pytest.fixture(scope="module")
def hf_greedy(hf, images):
    """HF greedy tokens for 4 images (1x2, 2x2, 1x1, 3x2 grids) x 2 prompts, computed once."""
    processor, model = hf
    out = {}
    for name in GREEDY:
        for prompt in PROMPTS:
            inputs = processor(images=[images[name]], text=[_text(processor, prompt)], return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
            out[name, prompt] = trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), _eos(model))
    return out


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_tiling_arithmetic_matches_transformers_at_internvl_geometry():
    """Candidate grids and the chosen grid (ties included) vs transformers' own functions over many image sizes, and
    the whole image segment (``<img>``, 256 context tokens a view, ``</img>``) vs the ids ``InternVLProcessor``
    returns for a sample of them, at the real InternVL2.5/3 geometry (448-px tiles, at most 12 tiles)."""
    from processor_prompts import processor_prompt_ids, spread_sample
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_all_supported_aspect_ratios,
        get_optimal_tiled_canvas,
    )

    from edgelvm.models.processors import image_only_class
    from edgelvm.runtime.dynamic_tiles import DynamicTilesRule, supported_grids
    from edgelvm.testing import INTERNVL_TOKENS, build_tiny_tokenizer

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

    from edgelvm.runtime.dynamic_tiles import DynamicTilesRule
    from edgelvm.runtime.preprocess import ImagePreprocessor

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
@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_greedy_tokens_equal_hf_generate(decoder, bundle, images, hf_greedy):
    vlm = VLM.load(bundle, decoder=decoder)
    assert vlm.backend.fused == (decoder == "fused")
    compared = 0
    for (name, prompt), expected in hf_greedy.items():
        vlm.generate(images[name], prompt, max_new_tokens=16)
        assert vlm.last_output_ids[0] == expected, (name, prompt)
        compared += len(expected)
    assert compared >= len(hf_greedy) * 16 * 0.5  # not a vacuous early-EOS pass


def test_padded_batch_and_chat_equal_single_requests(bundle, images, hf_greedy):
    """Rows with different tile counts (so different lengths: left padding) in one batch; a chat session."""
    vlm = VLM.load(bundle)
    pairs = [(images[name], prompt) for name, prompt in hf_greedy]
    vlm.generate_batch(pairs, max_new_tokens=16)
    assert vlm.last_output_ids == list(hf_greedy.values())
    chat = vlm.chat(images["large"])
    chat.ask(PROMPTS[0], max_new_tokens=16)
    assert vlm.last_output_ids[0] == hf_greedy["large", PROMPTS[0]]
    chat.ask("And the color?", max_new_tokens=8)
    assert vlm.last_stats.reused_tokens > 7 * 16  # the tiled image stayed in the cache


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
    from edgelvm.testing import build_tiny_internvl

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


def test_runtime_runs_the_bundle_without_torch(bundle):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from edgelvm.runtime import VLM
        vlm = VLM.load({str(bundle)!r})
        frame = np.random.default_rng(0).integers(0, 256, (48, 90, 3), dtype=np.uint8)
        vlm.generate(frame, "What is on the table?", max_new_tokens=4)
        assert vlm.last_stats.new_tokens >= 1
        print("HEAVY=" + ",".join(m for m in ("torch", "transformers", "onnx") if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY=")


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


# ---- compression stages ----------------------------------------------------------------------------------------
def test_prune_reloads_exports_and_matches_hf(checkpoint, images, tmp_path):
    """Activation importance on calibration data (tiled images), heads and neurons of both towers (the vision
    attention has separate q/k/v); the result reloads as internvl, exports, and greedy tokens equal HF's."""
    from edgelvm.data import write_split
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from edgelvm.prune import PruneConfig, prune

    calib = write_split(tmp_path / "calib", seed=31, n=6)
    out = tmp_path / "pruned"
    cfg = PruneConfig(out=out, vision_heads=0.5, text_heads=0.5, text_mlp=0.25, vision_mlp=0.25, progress=False)
    report = prune(str(checkpoint), calib, cfg)
    assert report.kept["text"][0]["heads"] == 2 and report.kept["vision"][0]["heads"] == 2
    adapter = load_model(str(out))
    assert adapter.family == "internvl"
    assert adapter.model.model.vision_tower.encoder.layer[0].attention.q_proj.out_features == 24
    vlm = VLM.load(export(adapter, tmp_path / "bundle", ExportConfig(max_length=384)).bundle_dir)
    processor = adapter.processor
    inputs = processor(images=[images["square"]], text=[_text(processor, PROMPTS[0])], return_tensors="pt")
    with torch.no_grad():
        ids = adapter.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    vlm.generate(images["square"], PROMPTS[0], max_new_tokens=12)
    expected = trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), _eos(adapter.model))
    assert vlm.last_output_ids[0] == expected


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


def test_distilled_student_is_internvl_and_exports(checkpoint, images, tmp_path):
    """internvl as teacher and (derived, narrower and shallower text model) student, with the image-position and
    projector-feature losses; the student keeps the tiling and its bundle matches HF."""
    from transformers import AutoModelForImageTextToText

    from edgelvm.data import write_split
    from edgelvm.distill import DistillConfig, StudentSpec, distill
    from edgelvm.export import ExportConfig, export
    from edgelvm.models.internvl import InternVLAdapter

    data = write_split(tmp_path / "data", seed=5, n=6)
    out = tmp_path / "student"
    cfg = DistillConfig(out=str(out), steps=3, batch_size=2, visual_kd_weight=1.0, feature_weight=1.0)
    report = distill(str(checkpoint), StudentSpec(text_layers=1, text_hidden=32), data, cfg)
    assert report.finished and report.student_params < report.teacher_params
    bundle = export(out, tmp_path / "bundle", ExportConfig(max_length=384)).bundle_dir
    manifest = Manifest.load(bundle)
    assert manifest.family == "internvl" and manifest.preprocess.tiling == "dynamic_tiles"
    processor = InternVLAdapter.load_processor(str(out))
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert model.config.text_config.hidden_size == 32
    inputs = processor(images=[images["portrait"]], text=[_text(processor, PROMPTS[0])], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    vlm = VLM.load(bundle)
    vlm.generate(images["portrait"], PROMPTS[0], max_new_tokens=12)
    assert vlm.last_output_ids[0] == trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), _eos(model))


def test_quantized_checkpoint_exports_with_its_tiling(checkpoint, images, tmp_path):
    """INT4 AWQ of the language model and INT8 of the tower + projector (calibration on tiled images):
    MatMulNBits in the fused decoder, QDQ vision, the tiling rule kept, and the fused (INT4) decoder answers like
    the portable (DequantizeLinear) one."""
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.data.shapes import write_split
    from edgelvm.export import ExportConfig, export
    from edgelvm.quantize.api import QuantConfig, quantize

    write_split(tmp_path / "calib", seed=5, n=12, image_size=96)
    out = tmp_path / "q"
    config = QuantConfig(out=out, llm="awq", vision="int8", group_size=32, batch_size=4)
    quantize(str(checkpoint), load_jsonl_dataset(tmp_path / "calib"), config)
    result = export(out, tmp_path / "bundle", ExportConfig(max_length=384))
    assert result.manifest.preprocess.tiling == "dynamic_tiles"
    assert result.manifest.graphs["vision"].precision == "int8"
    assert result.manifest.graphs["decoder_ort"].parity["max_rel"] < 1e-3
    fused, portable = VLM.load(result.bundle_dir, decoder="fused"), VLM.load(result.bundle_dir, decoder="portable")
    for name in ("large", "small"):
        fused.generate(images[name], PROMPTS[1], max_new_tokens=12)
        portable.generate(images[name], PROMPTS[1], max_new_tokens=12)
        assert fused.last_output_ids == portable.last_output_ids, name
        assert len(fused.last_output_ids[0]) >= 6, name

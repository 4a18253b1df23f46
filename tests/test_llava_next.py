"""LLaVA-NeXT (``llava_next``): anyres tiling, unpadding and image-newline rows, export → runtime parity with
Hugging Face on a tiny random checkpoint whose 32-px tiles make images of a few dozen pixels tile.

Reference: transformers' PIL image processor (``LlavaNextImageProcessorPil``, the backend transformers picks
without torchvision; the runtime reproduces that one) and ``LlavaNextForConditionalGeneration.generate``.
"""

from __future__ import annotations

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
#: (height, width) -> tiles per column x per row that transformers picks with edgelvm.testing.TINY_GRID_PINPOINTS
SIZES = {"landscape": ((40, 50), (2, 2)), "portrait": ((70, 33), (3, 1)), "square": ((48, 48), (2, 2)),
         "small": ((20, 20), (1, 1)), "large": ((200, 120), (2, 2))}  # fmt: skip


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(7)
    return {
        name: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for name, ((h, w), _) in SIZES.items()
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from edgelvm.testing import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("llava_next") / "ckpt", text="qwen2", vision="clip")


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    from edgelvm.export import ExportConfig, export

    return export(
        checkpoint, tmp_path_factory.mktemp("llava_next_bundle") / "b", ExportConfig(max_length=320)
    ).bundle_dir


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"  # the backend compared against
    return processor, AutoModelForImageTextToText.from_pretrained(checkpoint).eval()


def _text(processor, prompt: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def hf_greedy(hf, images):
    """HF greedy tokens for 3 images (2x2 grid unpadded, 3x1 grid, 1x1 grid) x 2 prompts, computed once."""
    processor, model = hf
    eos = {processor.tokenizer.eos_token_id}
    out = {}
    for name in ("landscape", "portrait", "small"):
        for prompt in PROMPTS:
            inputs = processor(images=[images[name]], text=[_text(processor, prompt)], return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=20, do_sample=False)
            out[name, prompt] = trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), eos)
    return out


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_tiling_arithmetic_matches_transformers_at_llava_v16_geometry():
    """Best resolution, fit-inside size, unpadding and the token count vs transformers' own functions, at the real
    llava-v1.6 geometry (336-px tiles, 14-px patches, the default pinpoints) over many image sizes."""
    from processor_prompts import processor_image_token_counts, spread_sample
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from edgelvm.runtime import tiling
    from edgelvm.testing import build_tiny_tokenizer

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
@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_greedy_tokens_equal_hf_generate(decoder, bundle, images, hf_greedy):
    vlm = VLM.load(bundle, decoder=decoder)
    assert vlm.backend.fused == (decoder == "fused")
    compared = 0
    for (name, prompt), expected in hf_greedy.items():
        vlm.generate(images[name], prompt, max_new_tokens=20)
        assert vlm.last_output_ids[0] == expected, (name, prompt)
        compared += len(expected)
    assert compared >= len(hf_greedy) * 20 * 0.5  # not a vacuous early-EOS pass


def test_batch_and_chat_equal_single_requests(bundle, images, hf_greedy):
    """Rows with different tile counts in one batch; a chat session's first turn."""
    vlm = VLM.load(bundle)
    pairs = [(images[name], prompt) for name, prompt in hf_greedy]
    vlm.generate_batch(pairs, max_new_tokens=20)
    assert vlm.last_output_ids == list(hf_greedy.values())
    chat = vlm.chat(images["portrait"])
    chat.ask(PROMPTS[0], max_new_tokens=20)
    assert vlm.last_output_ids[0] == hf_greedy["portrait", PROMPTS[0]]
    chat.ask("And the color?", max_new_tokens=8)
    assert vlm.last_stats.reused_tokens > 50  # the tiled image stayed in the cache


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


def test_runtime_runs_a_tiled_bundle_without_torch(bundle):
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


# ---- compression stages ----------------------------------------------------------------------------------------
def test_prune_reloads_exports_and_matches_hf(checkpoint, images, tmp_path):
    """Activation importance on calibration data (the batches carry image_sizes and views padded per batch),
    heads and neurons of both towers; the result reloads as llava_next, exports, and greedy tokens equal HF's."""
    from transformers import AutoProcessor

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
    assert adapter.family == "llava_next"
    vlm = VLM.load(export(adapter, tmp_path / "bundle", ExportConfig(max_length=320)).bundle_dir)
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=[images["landscape"]], text=[_text(processor, PROMPTS[0])], return_tensors="pt")
    with torch.no_grad():
        ids = adapter.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    vlm.generate(images["landscape"], PROMPTS[0], max_new_tokens=12)
    assert vlm.last_output_ids[0] == trim_after_eos(
        ids[0, inputs["input_ids"].shape[1] :].tolist(), {processor.tokenizer.eos_token_id}
    )


def test_distilled_student_is_llava_next_and_exports(checkpoint, images, tmp_path):
    """llava_next as teacher and (derived) student, with the image-position and projector-feature losses; the
    student keeps the tiling (its image_newline is the teacher's leading slice) and its bundle matches HF."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelvm.data import write_split
    from edgelvm.distill import DistillConfig, StudentSpec, distill
    from edgelvm.export import ExportConfig, export

    data = write_split(tmp_path / "data", seed=5, n=6)
    out = tmp_path / "student"
    cfg = DistillConfig(out=str(out), steps=3, batch_size=2, visual_kd_weight=1.0, feature_weight=1.0)
    report = distill(str(checkpoint), StudentSpec(text_layers=1, text_hidden=32), data, cfg)
    assert report.finished and report.student_params < report.teacher_params
    bundle = export(out, tmp_path / "bundle", ExportConfig(max_length=320)).bundle_dir
    assert Manifest.load(bundle).preprocess.tiling == "anyres"
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = processor(images=[images["portrait"]], text=[_text(processor, PROMPTS[0])], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    vlm = VLM.load(bundle)
    vlm.generate(images["portrait"], PROMPTS[0], max_new_tokens=12)
    eos = {processor.tokenizer.eos_token_id}
    assert vlm.last_output_ids[0] == trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), eos)


def test_quantized_checkpoint_exports_with_its_tiling(checkpoint, images, tmp_path):
    """INT4 AWQ of the language model and INT8 of the tower (the LLaVA path, inherited; calibration on tiled
    images): MatMulNBits in the fused decoder, QDQ vision, the anyres rule kept, and the fused (INT4) decoder answers
    like the portable (DequantizeLinear) one."""
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.data.shapes import write_split
    from edgelvm.export import ExportConfig, export
    from edgelvm.quantize.api import QuantConfig, quantize

    write_split(tmp_path / "calib", seed=5, n=12, image_size=96)
    out = tmp_path / "q"
    config = QuantConfig(out=out, llm="awq", vision="int8", group_size=32, batch_size=4)
    quantize(str(checkpoint), load_jsonl_dataset(tmp_path / "calib"), config)
    result = export(out, tmp_path / "bundle", ExportConfig(max_length=320))
    assert result.manifest.preprocess.tiling == "anyres"
    assert result.manifest.graphs["vision"].precision == "int8"
    assert result.manifest.graphs["decoder_ort"].parity["max_rel"] < 1e-3
    fused, portable = VLM.load(result.bundle_dir, decoder="fused"), VLM.load(result.bundle_dir, decoder="portable")
    fused.generate(images["portrait"], PROMPTS[1], max_new_tokens=12)
    portable.generate(images["portrait"], PROMPTS[1], max_new_tokens=12)
    assert fused.last_output_ids == portable.last_output_ids


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

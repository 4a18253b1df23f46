"""LLaVA-OneVision (``llava_onevision``): LLaVA-NeXT's anyres tiling plus the "anyres_max_N" cap (a large unpadded
feature grid is bilinearly downscaled), export → runtime parity with Hugging Face on a tiny random checkpoint whose
32-px tiles and ``anyres_max_2`` make images of a few dozen pixels tile and get downscaled.

Reference: transformers' PIL image processor (``LlavaOnevisionImageProcessorPil``) inside ``LlavaOnevisionProcessor``
(built without its video processor: there is no torchvision here) and
``LlavaOnevisionForConditionalGeneration.generate``.
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
#: (height, width) -> (tiles per column x per row, whether anyres_max_2 downscales the unpadded grid), for
#: edgelvm.testing.TINY_ONEVISION_PINPOINTS
SIZES = {"landscape": ((40, 50), (2, 2), True), "portrait": ((70, 33), (3, 2), True),
         "square": ((48, 48), (2, 2), True), "small": ((20, 20), (1, 1), False),
         "wide": ((30, 60), (1, 2), False), "large": ((200, 120), (3, 2), True)}  # fmt: skip
#: the images whose greedy answers are compared with HF's (a downscaled 2x2 grid, an unscaled 1x2 grid, one tile)
GREEDY = ("landscape", "wide", "small")


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(11)
    return {name: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for name, ((h, w), *_) in
            SIZES.items()}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from edgelvm.testing import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("llava_onevision") / "ckpt")


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    from edgelvm.export import ExportConfig, export

    return export(checkpoint, tmp_path_factory.mktemp("ov_bundle") / "b", ExportConfig(max_length=320)).bundle_dir


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForImageTextToText

    from edgelvm.models.llava_onevision import LlavaOnevisionAdapter

    processor = LlavaOnevisionAdapter.load_processor(str(checkpoint))
    assert type(processor.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"  # the backend compared
    return processor, AutoModelForImageTextToText.from_pretrained(checkpoint).eval()


def _text(processor, prompt: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def hf_greedy(hf, images):
    processor, model = hf
    eos = {processor.tokenizer.eos_token_id}
    out = {}
    for name in GREEDY:
        for prompt in PROMPTS:
            inputs = processor(images=[images[name]], text=[_text(processor, prompt)], return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=20, do_sample=False)
            out[name, prompt] = trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), eos)
    return out


def _onevision_processor(image_processor, **fields):
    from transformers import LlavaOnevisionProcessor

    from edgelvm.models.processors import image_only_class
    from edgelvm.testing import build_tiny_tokenizer

    return image_only_class(LlavaOnevisionProcessor)(image_processor=image_processor, tokenizer=build_tiny_tokenizer(),
                                                     **fields)  # fmt: skip


# ---- the rule's arithmetic and interpolation -------------------------------------------------------------------
def test_numpy_bilinear_equals_torch_interpolate():
    from edgelvm.runtime.tiling import resize_bilinear

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

    from processor_prompts import processor_image_token_counts, spread_sample
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from edgelvm.runtime import tiling

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
@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_greedy_tokens_equal_hf_generate(decoder, bundle, images, hf_greedy):
    vlm = VLM.load(bundle, decoder=decoder)
    assert vlm.backend.fused == (decoder == "fused")
    assert any(SIZES[name][2] for name in GREEDY) and not all(SIZES[name][2] for name in GREEDY)
    compared = 0
    for (name, prompt), expected in hf_greedy.items():
        vlm.generate(images[name], prompt, max_new_tokens=20)
        assert vlm.last_output_ids[0] == expected, (name, prompt)
        compared += len(expected)
    assert compared >= len(hf_greedy) * 20 * 0.5  # not a vacuous early-EOS pass
    assert len({tuple(v) for v in hf_greedy.values()}) > 2  # the answers depend on the image and the prompt


def test_padded_batch_equals_single_requests(bundle, images, hf_greedy):
    """Rows with different tile counts and token counts (downscaled or not) in one left-padded batch."""
    vlm = VLM.load(bundle)
    pairs = [(images[name], prompt) for name, prompt in hf_greedy]
    vlm.generate_batch(pairs, max_new_tokens=20)
    assert vlm.last_output_ids == list(hf_greedy.values())


def test_chat_session_equals_hf_and_reuses_the_cache(bundle, images, hf_greedy):
    vlm = VLM.load(bundle)
    chat = vlm.chat(images["landscape"])
    chat.ask(PROMPTS[0], max_new_tokens=20)
    assert vlm.last_output_ids[0] == hf_greedy["landscape", PROMPTS[0]]
    chat.ask("And the color?", max_new_tokens=8)
    assert vlm.last_stats.reused_tokens > 44  # the image's 44 tokens stayed in the cache


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


def test_runtime_runs_the_bundle_without_torch(bundle):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from edgelvm.runtime import VLM
        vlm = VLM.load({str(bundle)!r})
        frame = np.random.default_rng(0).integers(0, 256, (90, 60, 3), dtype=np.uint8)
        vlm.generate(frame, "What is on the table?", max_new_tokens=4)
        assert vlm.last_stats.new_tokens >= 1
        print("HEAVY=" + ",".join(m for m in ("torch", "transformers", "onnx") if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY=")


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


# ---- compression stages ----------------------------------------------------------------------------------------
def test_prune_reloads_exports_and_matches_hf(checkpoint, images, tmp_path):
    """Heads and neurons of both towers; the result reloads as llava_onevision (processor without torchvision
    included), exports, and greedy tokens on a downscaled image equal HF's."""
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
    assert adapter.family == "llava_onevision"
    vlm = VLM.load(export(adapter, tmp_path / "bundle", ExportConfig(max_length=320)).bundle_dir)
    processor = adapter.processor
    inputs = processor(images=[images["landscape"]], text=[_text(processor, PROMPTS[0])], return_tensors="pt")
    with torch.no_grad():
        ids = adapter.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    vlm.generate(images["landscape"], PROMPTS[0], max_new_tokens=12)
    assert vlm.last_output_ids[0] == trim_after_eos(
        ids[0, inputs["input_ids"].shape[1] :].tolist(), {processor.tokenizer.eos_token_id}
    )


def test_quantized_checkpoint_exports_with_its_rule(checkpoint, images, tmp_path):
    """INT4 AWQ of the language model and INT8 of the tower (calibrated on tiled images): MatMulNBits in the fused
    decoder, QDQ vision, the anyres_max rule kept, and the fused (INT4) decoder answers like the portable one."""
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.data.shapes import write_split
    from edgelvm.export import ExportConfig, export
    from edgelvm.quantize.api import QuantConfig, quantize

    write_split(tmp_path / "calib", seed=5, n=12, image_size=96)
    out = tmp_path / "q"
    config = QuantConfig(out=out, llm="awq", vision="int8", group_size=32, batch_size=4)
    quantize(str(checkpoint), load_jsonl_dataset(tmp_path / "calib"), config)
    result = export(out, tmp_path / "bundle", ExportConfig(max_length=320))
    assert result.manifest.preprocess.tiling == "anyres_max"
    assert result.manifest.preprocess.tiling_params["max_num_patches"] == 2
    assert result.manifest.graphs["vision"].precision == "int8"
    assert result.manifest.graphs["decoder_ort"].parity["max_rel"] < 1e-3
    fused, portable = VLM.load(result.bundle_dir, decoder="fused"), VLM.load(result.bundle_dir, decoder="portable")
    fused.generate(images["portrait"], PROMPTS[1], max_new_tokens=12)
    portable.generate(images["portrait"], PROMPTS[1], max_new_tokens=12)
    assert fused.last_output_ids == portable.last_output_ids


def test_distilled_student_is_llava_onevision_and_exports(checkpoint, images, tmp_path):
    """llava_onevision as teacher and (derived) student with the image-position and projector-feature losses; the
    student keeps the rule and its bundle's greedy tokens on a downscaled image equal HF's."""
    from transformers import AutoModelForImageTextToText

    from edgelvm.data import write_split
    from edgelvm.distill import DistillConfig, StudentSpec, distill
    from edgelvm.export import ExportConfig, export
    from edgelvm.models.llava_onevision import LlavaOnevisionAdapter

    data = write_split(tmp_path / "data", seed=5, n=6)
    out = tmp_path / "student"
    cfg = DistillConfig(out=str(out), steps=3, batch_size=2, visual_kd_weight=1.0, feature_weight=1.0)
    report = distill(str(checkpoint), StudentSpec(text_layers=1, text_hidden=32), data, cfg)
    assert report.finished and report.student_params < report.teacher_params
    bundle = export(out, tmp_path / "bundle", ExportConfig(max_length=320)).bundle_dir
    assert Manifest.load(bundle).preprocess.tiling == "anyres_max"
    processor = LlavaOnevisionAdapter.load_processor(str(out))
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = processor(images=[images["portrait"]], text=[_text(processor, PROMPTS[0])], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    vlm = VLM.load(bundle)
    vlm.generate(images["portrait"], PROMPTS[0], max_new_tokens=12)
    eos = {processor.tokenizer.eos_token_id}
    assert vlm.last_output_ids[0] == trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), eos)

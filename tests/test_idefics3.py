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
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("num2words")  # SmolVLMProcessor imports it

from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from edgelvm.testing import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
#: (height, width) -> (tile rows, tile columns) with the default tiny geometry (32-px tiles, longest edge 96 px);
#: every image is first resized to a 96-px longest edge, so even the 20x20 one splits.
SIZES = {"landscape": ((40, 50), (3, 3)), "portrait": ((70, 33), (3, 2)), "square": ((48, 48), (3, 3)),
         "small": ((20, 20), (3, 3)), "large": ((200, 120), (3, 2)), "wide": ((30, 90), (1, 3)),
         "short": ((50, 100), (2, 3))}  # fmt: skip
#: the SmolVLM checkpoint's geometry (longest edge 64 px): at most 2 x 2 tiles
SMOL_GRIDS = {"landscape": (2, 2), "portrait": (2, 1), "wide": (1, 2), "short": (1, 2)}


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(7)
    return {
        name: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for name, ((h, w), _) in SIZES.items()
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from edgelvm.testing import build_tiny_idefics3, build_tiny_smolvlm

    root = tmp_path_factory.mktemp("idefics3")
    return {
        "idefics3": build_tiny_idefics3(root / "idefics3"),
        "smolvlm": build_tiny_smolvlm(root / "smolvlm", longest_edge=64, seed=1),
    }


@pytest.fixture(scope="module")
def bundles(checkpoints, tmp_path_factory):
    from edgelvm.export import ExportConfig, export

    root = tmp_path_factory.mktemp("idefics3_bundles")
    return {name: export(ck, root / name, ExportConfig(max_length=512)).bundle_dir for name, ck in checkpoints.items()}


@pytest.fixture(scope="module")
def hf(checkpoints):
    from transformers import AutoModelForImageTextToText

    from edgelvm.models import load_model

    out = {}
    for name, ck in checkpoints.items():
        processor = load_model(str(ck)).processor  # SmolVLM: AutoProcessor needs torchvision (its video processor)
        out[name] = processor, AutoModelForImageTextToText.from_pretrained(ck).eval()
    return out


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


@pytest.fixture(scope="module")
def hf_greedy(hf, images):
    """HF greedy tokens for 3 images of different grids (3x3, 3x2, 1x3 for Idefics3; 2x2, 2x1, 1x2 for SmolVLM)
    x 2 prompts, per checkpoint, computed once."""
    return {
        (family, name, prompt): _hf_generate(processor, model, [images[name]], prompt)
        for family, (processor, model) in hf.items()
        for name in ("landscape", "portrait", "wide")
        for prompt in PROMPTS
    }


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_split_arithmetic_matches_transformers_at_real_geometries():
    """Tile grids vs transformers' own count at SmolVLM's (512-px tiles, 2048-px longest edge) and Idefics3's
    (364 / 1456) geometry over many sizes; and vs the image processor's actual split where the longest edge is no
    multiple of the tile (there ``get_number_of_image_patches`` disagrees with transformers' own split, whose rows
    and columns the prompt uses — the runtime follows the split)."""
    from PIL import Image
    from transformers import Idefics3ImageProcessorPil, SmolVLMImageProcessorPil

    from edgelvm.errors import BundleError
    from edgelvm.runtime.image_splitting import ImageSplittingRule

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
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_greedy_tokens_equal_hf_generate(family, decoder, bundles, images, hf_greedy):
    vlm = VLM.load(bundles[family], decoder=decoder)
    assert vlm.backend.fused == (decoder == "fused")
    compared = 0
    for (fam, name, prompt), expected in hf_greedy.items():
        if fam != family:
            continue
        vlm.generate(images[name], prompt, max_new_tokens=20)
        assert vlm.last_output_ids[0] == expected, (name, prompt)
        compared += len(expected)
    assert compared >= 6 * 20 * 0.5  # not a vacuous early-EOS pass


def test_padded_batch_and_chat_equal_single_requests(bundles, images, hf_greedy):
    """Rows with different grids (prompt lengths) in one left-padded batch; a chat session's first turn."""
    vlm = VLM.load(bundles["idefics3"])
    keys = [key for key in hf_greedy if key[0] == "idefics3"]
    vlm.generate_batch([(images[name], prompt) for _, name, prompt in keys], max_new_tokens=20)
    assert vlm.last_output_ids == [hf_greedy[key] for key in keys]
    chat = vlm.chat(images["portrait"])
    chat.ask(PROMPTS[0], max_new_tokens=20)
    assert vlm.last_output_ids[0] == hf_greedy["idefics3", "portrait", PROMPTS[0]]
    chat.ask("And the color?", max_new_tokens=8)
    assert vlm.last_stats.reused_tokens > 100  # the split image stayed in the cache


def test_two_differently_split_images_in_one_prompt_match_hf(hf, bundles, images):
    for family in ("idefics3", "smolvlm"):
        processor, model = hf[family]
        vlm = VLM.load(bundles[family])
        pair = [images["wide"], images["portrait"]]
        expected = _hf_generate(processor, model, pair, "Compare.", max_new_tokens=12)
        vlm.generate(pair, "Compare.", max_new_tokens=12)
        assert vlm.last_output_ids[0] == expected, family


def test_runtime_runs_a_split_bundle_without_torch(bundles):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from edgelvm.runtime import VLM
        vlm = VLM.load({str(bundles["smolvlm"])!r})
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
def test_prune_reloads_exports_and_matches_hf(checkpoints, images, tmp_path):
    """Activation importance on calibration data (split images, views padded per batch), heads and neurons of the
    SigLIP-style tower and the Llama; the result reloads as smolvlm (processor without torchvision), exports, and
    greedy tokens equal HF's."""
    from edgelvm.data import write_split
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from edgelvm.prune import PruneConfig, prune

    calib = write_split(tmp_path / "calib", seed=31, n=6)
    out = tmp_path / "pruned"
    cfg = PruneConfig(out=out, vision_heads=0.5, text_heads=0.5, text_mlp=0.25, vision_mlp=0.25, progress=False)
    report = prune(str(checkpoints["smolvlm"]), calib, cfg)
    assert report.kept["text"][0]["heads"] == 2 and report.kept["vision"][0]["heads"] == 2
    adapter = load_model(str(out))
    assert adapter.family == "idefics3" and adapter.config.model_type == "smolvlm"
    vlm = VLM.load(export(adapter, tmp_path / "bundle", ExportConfig(max_length=512)).bundle_dir)
    expected = _hf_generate(adapter.processor, adapter.model, [images["landscape"]], PROMPTS[0], max_new_tokens=12)
    vlm.generate(images["landscape"], PROMPTS[0], max_new_tokens=12)
    assert vlm.last_output_ids[0] == expected


def test_distilled_student_is_smolvlm_and_exports(checkpoints, images, tmp_path):
    """smolvlm as teacher and (derived) student, with the image-position and connector-feature losses; the student
    keeps the split rule and its processor (saved without the video processor), and its bundle matches HF."""
    from edgelvm.data import write_split
    from edgelvm.distill import DistillConfig, StudentSpec, distill
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model

    data = write_split(tmp_path / "data", seed=5, n=6)
    out = tmp_path / "student"
    cfg = DistillConfig(out=str(out), steps=3, batch_size=2, visual_kd_weight=1.0, feature_weight=1.0)
    report = distill(str(checkpoints["smolvlm"]), StudentSpec(text_layers=1, text_hidden=32), data, cfg)
    assert report.finished and report.student_params < report.teacher_params
    bundle = export(out, tmp_path / "bundle", ExportConfig(max_length=512)).bundle_dir
    assert Manifest.load(bundle).preprocess.tiling == "split"
    student = load_model(str(out))
    assert student.config.model_type == "smolvlm" and student.text_config.num_hidden_layers == 1
    expected = _hf_generate(student.processor, student.model, [images["portrait"]], PROMPTS[0], max_new_tokens=12)
    vlm = VLM.load(bundle)
    vlm.generate(images["portrait"], PROMPTS[0], max_new_tokens=12)
    assert vlm.last_output_ids[0] == expected


def test_quantized_checkpoint_exports_with_its_split_rule(checkpoints, images, tmp_path):
    """INT4 AWQ of the Llama and INT8 of the tower + connector (calibration on split images): MatMulNBits in the
    fused decoder, QDQ vision, the split rule kept, and the fused (INT4) decoder answers like the portable one."""
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.data.shapes import write_split
    from edgelvm.export import ExportConfig, export
    from edgelvm.quantize.api import QuantConfig, quantize

    write_split(tmp_path / "calib", seed=5, n=12, image_size=96)
    out = tmp_path / "q"
    config = QuantConfig(out=out, llm="awq", vision="int8", group_size=32, batch_size=4)
    quantize(str(checkpoints["idefics3"]), load_jsonl_dataset(tmp_path / "calib"), config)
    result = export(out, tmp_path / "bundle", ExportConfig(max_length=512))
    assert result.manifest.preprocess.tiling == "split"
    assert result.manifest.graphs["vision"].precision == "int8"
    assert result.manifest.graphs["decoder_ort"].parity["max_rel"] < 1e-3
    fused, portable = VLM.load(result.bundle_dir, decoder="fused"), VLM.load(result.bundle_dir, decoder="portable")
    fused.generate(images["portrait"], PROMPTS[1], max_new_tokens=12)
    portable.generate(images["portrait"], PROMPTS[1], max_new_tokens=12)
    assert fused.last_output_ids == portable.last_output_ids


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

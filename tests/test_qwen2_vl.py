"""Qwen2-VL (``qwen2_vl``): native-resolution patches, the export-friendly one-image vision graph, M-RoPE positions
computed in the runtime; export → runtime parity with Hugging Face on a tiny random checkpoint.

Reference: transformers' ``Qwen2VLProcessor`` with ``Qwen2VLImageProcessorPil`` (built from its image processor
and tokenizer by the adapter: the full processor's video part needs torchvision, absent here) and
``Qwen2VLForConditionalGeneration.generate``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import ConfigError, UnsupportedModelError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]


FAMILY = "qwen2_vl"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py


@pytest.fixture(scope="module")
def images(artifacts):
    return artifacts.images(FAMILY)  # landscape: 10x12 patches; portrait: 18x8 patches


@pytest.fixture(scope="module")
def checkpoint(artifacts):
    return artifacts.checkpoint(FAMILY)


@pytest.fixture(scope="module")
def bundle(artifacts):
    return artifacts.bundle(FAMILY)


@pytest.fixture(scope="module")
def hf_greedy(artifacts):
    """HF greedy tokens for 2 images (different patch grids) x 2 prompts, computed once per session."""
    return artifacts.hf_greedy(FAMILY)


@pytest.fixture(scope="module")
def adapter(checkpoint):
    from edgelvm.models import load_model

    return load_model(str(checkpoint))


@pytest.fixture(scope="module")
def vlm(bundle):
    return VLM.load(bundle)


def _messages(prompt: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [*[{"type": "image"}] * n_images, {"type": "text", "text": prompt}]}]


def _text(processor, messages) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _eos(model) -> set[int]:
    return set(model.generation_config.eos_token_id)


def _hf_generate(adapter, image_list, messages, max_new_tokens: int = 20) -> list[int]:
    processor, model = adapter.processor, adapter.model
    inputs = processor(images=image_list or None, text=[_text(processor, messages)], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), _eos(model))


# ---- loading and preprocessing -----------------------------------------------------------------------------------
def test_processor_is_built_without_torchvision(adapter):
    from transformers.utils import is_torchvision_available

    processor = adapter.processor
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"  # the backend compared against
    if not is_torchvision_available():  # AutoProcessor fails for the video processor: built from the parts
        assert type(processor).__name__ == "Qwen2VLProcessor"
        assert processor.get_attributes() == ["image_processor", "tokenizer"]
        assert not hasattr(processor, "video_processor")
    assert processor.chat_template and processor.image_token == "<|image_pad|>"


def test_preprocessing_grids_and_prompt_ids_match_the_hf_processor(adapter, vlm, images):
    """Patches (smart_resize, rescale, normalize, temporal duplication, merge-block order), ``image_grid_thw`` and
    the prompt ids with the expanded ``<|image_pad|>`` runs, on images of different sizes and modes."""
    from PIL import Image

    processor = adapter.processor
    rng = np.random.default_rng(3)
    cases = {
        **images,
        "small": Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)),  # scaled up to min_pixels
        "large": Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),  # scaled down to max_pixels
        "rgba": Image.fromarray(rng.integers(0, 256, (31, 45, 4), dtype=np.uint8), mode="RGBA"),
        "gray": Image.fromarray(rng.integers(0, 256, (29, 64), dtype=np.uint8), mode="L"),
    }
    grid = vlm.preprocessor.tiling.grid
    grids = {}
    for name, image in cases.items():
        inputs = processor(images=[image], text=[_text(processor, _messages("Hi"))], return_tensors="np")
        got = vlm.preprocessor.views(image)
        assert got.shape == inputs["pixel_values"].shape, name
        assert np.abs(got - inputs["pixel_values"]).max() <= 1e-5, name
        grids[name] = grid(image.height, image.width)
        assert list(grids[name]) == inputs["image_grid_thw"][0].tolist(), name
        ids = vlm.prompt_ids(Request(prompt="Hi", images=[image]))
        assert ids == inputs["input_ids"][0].tolist(), name
        assert ids.count(adapter.image_token()[1]) == np.prod(grids[name]) // 4
    assert grids["landscape"] != grids["portrait"] and len(set(grids.values())) >= 5
    # two images in one prompt, and a camera frame (numpy array)
    frame = rng.integers(0, 256, (48, 90, 3), dtype=np.uint8)
    two = [Image.fromarray(frame), images["portrait"]]
    inputs = processor(images=two, text=[_text(processor, _messages("Compare.", 2))], return_tensors="np")
    ids = vlm.prompt_ids(Request(prompt="Compare.", images=[frame, images["portrait"]]))
    assert ids == inputs["input_ids"][0].tolist()
    patches = np.concatenate([vlm.preprocessor.views(frame), vlm.preprocessor.views(images["portrait"])])
    assert np.abs(patches - inputs["pixel_values"]).max() <= 1e-5


def test_mrope_positions_equal_get_rope_index(adapter, vlm, images):
    """The runtime's numpy port of ``get_rope_index`` on a left-padded batch: one image, two images, and text only."""
    processor, model = adapter.processor, adapter.model
    requests = [
        (_messages(PROMPTS[0], 2), [images["landscape"], images["portrait"]]),
        (_messages("Hi"), [images["portrait"]]),
    ]
    inputs = processor(
        images=[i for _, imgs in requests for i in imgs],
        text=[_text(processor, m) for m, _ in requests],
        return_tensors="pt",
        padding=True,
    )
    expected, deltas = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    for row, (messages, imgs) in enumerate(requests):
        ids = vlm.prompt_ids(Request(messages=messages, images=imgs))
        got = vlm._positions(ids, imgs)
        real = inputs["attention_mask"][row].bool()
        assert np.array_equal(got, expected[:, row, real].numpy()), row
        # generation continues at max + 1, where HF's text positions + rope delta put the next token
        assert vlm.positions.next_position(got) == len(ids) + int(deltas[row])
        assert not np.array_equal(got[1], got[2])  # really 3-D (an image's rows and columns differ)
    text_only = vlm.prompt_ids(Request(prompt="Hi"))
    assert np.array_equal(vlm._positions(text_only, []), np.tile(np.arange(len(text_only)), (3, 1)))


# ---- bundle and graphs -------------------------------------------------------------------------------------------
def test_bundle_is_portable_with_mrope_and_native_patches(bundle):
    """No fused decoder (its rotary is 1-D): auto mode writes the portable one only. The manifest carries the
    native-resolution rule and M-RoPE as data; the decoder takes ``position_ids [3, batch, seq]``."""
    manifest = Manifest.load(bundle)
    assert manifest.family == "qwen2_vl"
    assert set(manifest.graphs) == {"vision", "embed", "decoder"}
    for name in ("vision", "decoder"):
        assert manifest.graphs[name].parity["max_rel"] < 1e-4, name
    assert manifest.positions["kind"] == "mrope" and manifest.positions["rows"] == 3
    assert manifest.preprocess.tiling == "native"
    assert manifest.preprocess.tiling_params["merge_size"] == 2
    vision_inputs = {t.name: t.shape for t in manifest.graphs["vision"].inputs}
    assert list(vision_inputs) == ["pixel_values", "vision_position_ids"]
    positions = next(t for t in manifest.graphs["decoder"].inputs if t.name == "position_ids")
    assert len(positions.shape) == 3 and positions.shape[0] == 3
    assert VLM.load(bundle).backend.fused is False
    with pytest.raises(ConfigError, match="no fused decoder"):
        VLM.load(bundle, decoder="fused")


def test_vision_wrapper_and_graph_equal_get_image_features(adapter, bundle, images):
    """The one-image wrapper (torch) and its graph (one run per image, different N) vs transformers' packed
    two-image ``get_image_features``."""
    processor, model = adapter.processor, adapter.model
    inputs = processor.image_processor(list(images.values()), return_tensors="pt")
    with torch.no_grad():
        reference = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        wrapper = adapter.vision_encoder()
        for call, ref in zip(adapter.vision_inputs(inputs), reference):
            assert (wrapper(**call) - ref).abs().max() <= 1e-5
    vlm = VLM.load(bundle, vision_cache_mb=0)
    got = vlm._image_features(list(images.values()))
    assert [g.shape for g in got] == [tuple(r.shape) for r in reference] == [(30, 64), (36, 64)]
    for g, ref in zip(got, reference):
        assert np.abs(g - ref.numpy()).max() / ref.abs().max() < 1e-4
    assert vlm.last_stats.images_encoded == 2


# ---- generation --------------------------------------------------------------------------------------------------
def test_two_images_in_one_prompt_equal_hf(adapter, vlm, images):
    pair = [images["portrait"], images["landscape"]]
    expected = _hf_generate(adapter, pair, _messages("Compare the two images.", 2))
    vlm.generate(pair, "Compare the two images.", max_new_tokens=20)
    assert vlm.last_output_ids[0] == expected
    swapped = _hf_generate(adapter, pair[::-1], _messages("Compare the two images.", 2))
    vlm.generate(pair[::-1], "Compare the two images.", max_new_tokens=20)
    assert vlm.last_output_ids[0] == swapped


def test_text_only_prompt_equals_hf(adapter, vlm):
    """No image: three equal position rows (HF's text-only path)."""
    vlm.generate(None, "Read the sign.", max_new_tokens=12)
    assert vlm.last_output_ids[0] == _hf_generate(adapter, [], _messages("Read the sign.", 0), 12)


def test_left_padded_batch_equals_hf_batched_generate(adapter, vlm, images, hf_greedy):
    """Rows of different lengths (different grids and prompts): HF's left-padded batch, whose M-RoPE skips the
    padding, equals the runtime's batch and the single requests."""
    processor, model = adapter.processor, adapter.model
    pairs = [("landscape", PROMPTS[0]), ("portrait", PROMPTS[1]), ("portrait", PROMPTS[0])]
    inputs = processor(
        images=[images[n] for n, _ in pairs],
        text=[_text(processor, _messages(p)) for _, p in pairs],
        return_tensors="pt",
        padding=True,
    )
    assert (inputs["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    batched = [trim_after_eos(row[inputs["input_ids"].shape[1] :].tolist(), _eos(model)) for row in out]
    assert batched == [hf_greedy[pair] for pair in pairs]
    vlm.generate_batch([(images[n], p) for n, p in pairs], max_new_tokens=20)
    assert vlm.last_output_ids == batched


def test_shared_prefix_batch_equals_single_requests(vlm, images, hf_greedy):
    """Two questions about one image: the common prefix (system turn, image, ...) is prefilled once and forked."""
    vlm.generate_batch([(images["landscape"], p) for p in PROMPTS], max_new_tokens=20)
    assert vlm.last_stats.reused_tokens >= 30  # the image's 30 tokens at least
    assert vlm.last_output_ids == [hf_greedy["landscape", p] for p in PROMPTS]


def test_chat_session_reuses_its_cache_and_equals_hf(adapter, vlm, images, hf_greedy):
    """Turn 2 prefills only its new tokens (the image stays cached with its M-RoPE positions) and equals HF on the
    whole conversation."""
    chat = vlm.chat(images["portrait"])
    first = chat.ask(PROMPTS[0], max_new_tokens=20)
    assert vlm.last_output_ids[0] == hf_greedy["portrait", PROMPTS[0]]
    chat.ask("And the color?", max_new_tokens=12)
    assert vlm.last_stats.reused_tokens > 36
    messages = [*_messages(PROMPTS[0]), {"role": "assistant", "content": first},
                {"role": "user", "content": [{"type": "text", "text": "And the color?"}]}]  # fmt: skip
    assert vlm.last_output_ids[0] == _hf_generate(adapter, [images["portrait"]], messages, 12)


def test_forced_logits_equal_hf_forward(adapter, vlm, images, hf_greedy):
    processor, model = adapter.processor, adapter.model
    continuation = hf_greedy["landscape", PROMPTS[1]][:6]
    got = vlm.forced_logits(images["landscape"], PROMPTS[1], continuation)
    inputs = processor(images=[images["landscape"]], text=[_text(processor, _messages(PROMPTS[1]))],
                       return_tensors="pt")  # fmt: skip
    n = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation[:-1]])], dim=1)
    mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(continuation) - 1, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits  # fmt: skip
    reference = logits[0, n - 1 :].numpy()
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-4


# ---- compression stages ----------------------------------------------------------------------------------------
# qwen2_5_vl in the slow suite: the same text-MLP surgery of the same language model (Qwen25VLAdapter subclasses
# Qwen2VLAdapter) as the fast qwen2_vl case; its windowed vision graph is exported by the fast bundle25 tests
@pytest.mark.parametrize("variant", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def test_language_model_mlp_pruning_reloads_with_from_pretrained_and_exports(variant, checkpoint, adapter25, images,
                                                                             tmp_path):  # fmt: skip
    """`edgelvm prune --text-mlp 0.25` (no heads asked for; activation importance on `--calib shapes` for 2-VL,
    magnitude for 2.5-VL): plain `from_pretrained` reloads the result (uniform per layer), it exports, and the
    bundle's greedy tokens equal HF's on the pruned model."""
    import json

    from transformers import AutoModelForImageTextToText
    from typer.testing import CliRunner

    from edgelvm.cli import app
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model

    source = str(checkpoint) if variant == "qwen2_vl" else adapter25.source
    out = tmp_path / "pruned"
    how = ["--calib", "shapes", "--calib-limit", "4"] if variant == "qwen2_vl" else ["--importance", "magnitude"]
    result = CliRunner().invoke(app, ["prune", source, "-o", str(out), "--text-mlp", "0.25", *how])
    assert result.exit_code == 0, result.output
    width = json.loads((checkpoint / "config.json").read_text())["text_config"]["intermediate_size"]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.model_type == variant
    assert model.config.text_config.intermediate_size == width * 3 // 4
    assert {layer.mlp.down_proj.in_features for layer in model.model.language_model.layers} == {width * 3 // 4}
    pruned = load_model(str(out))
    bundle = export(pruned, tmp_path / "bundle", ExportConfig(max_length=256)).bundle_dir
    vlm = VLM.load(bundle)
    expected = _hf_generate(pruned, [images["landscape"]], _messages(PROMPTS[0]), 12)
    vlm.generate(images["landscape"], PROMPTS[0], max_new_tokens=12)
    assert vlm.last_output_ids[0] == expected


@pytest.mark.parametrize("variant, name", [("qwen2_vl", "Qwen2-VL"), ("qwen2_5_vl", "Qwen2.5-VL")])
def test_prune_refusals_name_the_family_and_the_real_reason(variant, name, checkpoint, adapter, adapter25, tmp_path):
    from edgelvm.distill.student import StudentSpec, derive_config
    from edgelvm.prune import PruneConfig, prune

    source = str(checkpoint) if variant == "qwen2_vl" else adapter25.source
    reasons = {"vision_heads": "vision blocks have one fused qkv", "text_heads": "head_dim as hidden_size",
               "vision_mlp": "packed as \\[patches, dim\\]"}  # fmt: skip
    for option, reason in reasons.items():
        config = PruneConfig(out=tmp_path / option, importance="magnitude", progress=False, **{option: 0.25})
        with pytest.raises(UnsupportedModelError, match=reason) as info:
            prune(source, None, config)
        assert f"pruning {name}'s" in info.value.problem and "--text-mlp" in info.value.fix, option
        assert not (tmp_path / option).exists()  # refused before any work
    with pytest.raises(UnsupportedModelError, match=f"derived {name} students") as info:
        derive_config(adapter25 if variant == "qwen2_5_vl" else adapter, StudentSpec(text_layers=1))
    assert "--vision int8" in info.value.fix


def test_awq_scale_groups_fold_exactly(checkpoint, adapter, images):
    """The language model is Qwen2-shaped: input norm → q/k/v (with biases), post-attention norm → gate/up,
    up → down absorb arbitrary per-channel scales without changing the output (v → o is skipped under GQA)."""
    from edgelvm.models import load_model
    from edgelvm.quantize.folding import fold_scales

    fresh = load_model(str(checkpoint))
    groups = fresh.text_scale_groups()
    assert len(groups) == 3 * fresh.text_config.num_hidden_layers
    processor = adapter.processor
    inputs = processor(images=[images["landscape"]], text=[_text(processor, _messages(PROMPTS[0]))],
                       return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        before = fresh.model(**inputs).logits
        generator = torch.Generator().manual_seed(0)
        for group in groups:
            width = next(iter(group.linears.values())).in_features
            fold_scales(group, list(group.linears), torch.rand(width, generator=generator) * 3 + 0.25)
        after = fresh.model(**inputs).logits
    assert (after - before).abs().max() / before.abs().max() < 1e-5


# ---- Qwen2.5-VL: window attention in the vision tower -------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter25(tmp_path_factory):
    from edgelvm.models import load_model
    from tests.fixtures.qwen2_vl import build_tiny_qwen2_vl

    return load_model(str(build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen25") / "ckpt", variant="qwen2_5_vl")))


@pytest.fixture(scope="module")
def bundle25(adapter25, tmp_path_factory):
    from edgelvm.export import ExportConfig, export

    return export(adapter25, tmp_path_factory.mktemp("qwen25_bundle") / "b", ExportConfig(max_length=256)).bundle_dir


def test_qwen25_window_rule_equals_transformers(adapter25, images):
    """The runtime's window order and windows vs ``get_vision_window_index`` on grids whose merged size is and is
    not a multiple of the window (odd padding, empty windows dropped)."""
    from transformers.vision_utils import get_vision_window_index

    from edgelvm.runtime.images.native_resolution import NativeResolutionRule

    rule = NativeResolutionRule.from_params(adapter25.preprocess_spec().tiling_params)
    assert rule.window_size == adapter25.config.vision_config.window_size == 16
    for grid in [(1, 10, 12), (1, 18, 8), (1, 4, 4), (2, 6, 10)]:
        index, cu = get_vision_window_index(torch.tensor([grid]), 2, 16, 4)
        window_index, window_ids = rule.windows(*grid)
        assert np.array_equal(window_index, index.numpy()), grid
        bounds = np.flatnonzero(np.diff(window_ids)) + 1  # where the window changes, in patches
        assert np.array_equal(np.concatenate([[0], bounds, [len(window_ids)]]), cu.numpy()), grid


def test_qwen25_vision_graph_equals_get_image_features(adapter25, bundle25, images):
    """Window-masked blocks on the reordered patches, a full-attention block, the order restored after the merger:
    the wrapper and its graph equal transformers' packed forward; without the window masks they would not."""
    processor, model = adapter25.processor, adapter25.model
    manifest = Manifest.load(bundle25)
    assert manifest.family == "qwen2_5_vl" and set(manifest.graphs) == {"vision", "embed", "decoder"}
    names = [t.name for t in manifest.graphs["vision"].inputs]
    assert names == ["pixel_values", "vision_position_ids", "window_index", "window_ids"]
    inputs = processor.image_processor(list(images.values()), return_tensors="pt")
    wrapper = adapter25.vision_encoder()
    with torch.no_grad():
        reference = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        calls = adapter25.vision_inputs(inputs)
        for call, ref in zip(calls, reference):
            assert (wrapper(**call) - ref).abs().max() / ref.abs().max() < 1e-5
        wrapper.full_blocks = set(range(len(wrapper.tower.blocks)))  # every block attending over the whole image
        assert (wrapper(**calls[0]) - reference[0]).abs().max() / reference[0].abs().max() > 1e-3
    got = VLM.load(bundle25, vision_cache_mb=0)._image_features(list(images.values()))
    for g, ref in zip(got, reference):
        assert np.abs(g - ref.numpy()).max() / ref.abs().max() < 1e-4


def test_qwen25_preprocessing_and_greedy_tokens_equal_hf(adapter25, bundle25, images):
    processor = adapter25.processor
    vlm = VLM.load(bundle25)
    for name, image in images.items():
        inputs = processor(images=[image], text=[_text(processor, _messages("Hi"))], return_tensors="np")
        assert np.abs(vlm.preprocessor.views(image) - inputs["pixel_values"]).max() <= 1e-5, name
        assert vlm.prompt_ids(Request(prompt="Hi", images=[image])) == inputs["input_ids"][0].tolist(), name
    compared = 0
    for name in images:
        for prompt in PROMPTS:
            expected = _hf_generate(adapter25, [images[name]], _messages(prompt))
            vlm.generate(images[name], prompt, max_new_tokens=20)
            assert vlm.last_output_ids[0] == expected, (name, prompt)
            compared += len(expected)
    assert compared >= 40
    pair = [images["landscape"], images["portrait"]]
    vlm.generate(pair, "Compare the two images.", max_new_tokens=12)
    assert vlm.last_output_ids[0] == _hf_generate(adapter25, pair, _messages("Compare the two images.", 2), 12)


def test_qwen25_padded_batch_and_chat_equal_hf(adapter25, bundle25, images):
    processor, model = adapter25.processor, adapter25.model
    pairs = [("landscape", PROMPTS[0]), ("portrait", PROMPTS[1])]
    inputs = processor(images=[images[n] for n, _ in pairs], text=[_text(processor, _messages(p)) for _, p in pairs],
                       return_tensors="pt", padding=True)  # fmt: skip
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    batched = [trim_after_eos(row[inputs["input_ids"].shape[1] :].tolist(), _eos(model)) for row in out]
    vlm = VLM.load(bundle25)
    vlm.generate_batch([(images[n], p) for n, p in pairs], max_new_tokens=16)
    assert vlm.last_output_ids == batched
    chat = vlm.chat(images["portrait"])
    first = chat.ask(PROMPTS[0], max_new_tokens=12)
    chat.ask("And the color?", max_new_tokens=8)
    assert vlm.last_stats.reused_tokens > 36
    messages = [*_messages(PROMPTS[0]), {"role": "assistant", "content": first},
                {"role": "user", "content": [{"type": "text", "text": "And the color?"}]}]  # fmt: skip
    assert vlm.last_output_ids[0] == _hf_generate(adapter25, [images["portrait"]], messages, 8)


def test_qwen25_quantized_checkpoint_exports_and_matches_hf(adapter25, images, tmp_path):
    """INT4 RTN language model + INT8 QDQ of the windowed vision graph (its four inputs traced through the usual
    quantize path); greedy tokens equal the quantized checkpoint's in transformers (INT8 reference inputs)."""
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.data.shapes import write_split
    from edgelvm.export import ExportConfig, export
    from edgelvm.export.quantized import quantized_graph_rewrites
    from edgelvm.models import load_model
    from edgelvm.quantize import Int8VisionConfig, RTNConfig, quantize

    write_split(tmp_path / "calib", seed=7, n=8, image_size=96)
    out = tmp_path / "q"
    methods = [RTNConfig(group_size=32), Int8VisionConfig()]
    quantize(adapter25.source, load_jsonl_dataset(tmp_path / "calib"), methods, out=out, batch_size=4)
    result = export(out, tmp_path / "bundle", ExportConfig(max_length=256))
    graphs = result.manifest.graphs
    assert (graphs["vision"].precision, graphs["decoder"].precision) == ("int8", "int4")
    quantized = load_model(str(out))
    vision_rewrite, encoder = quantized_graph_rewrites(quantized)["vision"], quantized.vision_encoder()
    vlm = VLM.load(result.bundle_dir)
    with vision_rewrite.reference_context(encoder):
        expected = _hf_generate(quantized, [images["landscape"]], _messages(PROMPTS[0]), 12)
    vlm.generate(images["landscape"], PROMPTS[0], max_new_tokens=12)
    assert vlm.last_output_ids[0] == expected


def test_chunked_prefill_keeps_mrope_positions(bundle, images):
    """Prefill in chunks (a TensorRT engine built with ``--prefill-chunk``): each chunk gets its slice of the M-RoPE
    positions, so the answer equals the one-step prefill's."""
    vlm = VLM.load(bundle)
    want = vlm.generate(images["landscape"], "Describe the image.", max_new_tokens=8)
    vlm.backend.max_step_tokens = 5
    assert vlm.generate(images["landscape"], "Describe the image.", max_new_tokens=8) == want
    assert vlm.last_stats.prefill_tokens > 5

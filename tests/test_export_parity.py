"""Export → runtime parity with PyTorch / Hugging Face on tiny random LLaVA checkpoints: what LLaVA adds to the
shared scenarios of test_families.py (greedy answers on both decoders, batches, chat: the LLaVA rows there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelvm.manifest import Manifest
from edgelvm.runtime import VLM, Request
from tests.fixtures.families import LLAVA_PROMPTS as PROMPTS
from tests.fixtures.reference import trim_after_eos


def _hf(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    return processor, model


def _chat(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_vision_graph_matches_transformers_fp32(variant, tiny_checkpoints, tiny_bundles):
    """The ONNX vision graph reproduces transformers' own get_image_features within 1e-4 relative."""
    import onnxruntime as ort

    _, model = _hf(tiny_checkpoints[variant])
    session = ort.InferenceSession(str(tiny_bundles[variant] / "vision.onnx"), providers=["CPUExecutionProvider"])
    size = model.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output)).numpy()
    got = session.run(None, {"pixel_values": pixels.numpy()})[0]
    assert got.shape == reference.shape
    rel = np.abs(got - reference).max() / np.abs(reference).max()
    assert rel < 1e-4


def test_manifest_records_parity_and_kv_geometry(variant, tiny_checkpoints, tiny_bundles):
    manifest = Manifest.load(tiny_bundles[variant])
    _, model = _hf(tiny_checkpoints[variant])
    text = model.config.text_config
    assert manifest.kv_cache.num_layers == text.num_hidden_layers
    assert manifest.kv_cache.num_kv_heads == text.num_key_value_heads
    assert manifest.kv_cache.head_dim == text.hidden_size // text.num_attention_heads
    for name in ("vision", "decoder"):
        assert manifest.graphs[name].parity["max_rel"] < 1e-4
    graph_files = {"vision.onnx", "decoder.onnx", "decoder_ort.onnx", "decoder_ort.onnx.data"}  # fused: weights apart
    assert set(manifest.files) == graph_files | {"embed.npy", "tokenizer.json"}
    assert manifest.graphs["decoder_ort"].parity["max_rel"] < 1e-4
    import transformers

    assert manifest.created_from["toolchain"]["transformers"] == transformers.__version__  # what traced the graphs


def test_preprocessing_matches_hf_image_processor(variant, tiny_checkpoints, tiny_bundles, test_images):
    from PIL import Image

    processor, _ = _hf(tiny_checkpoints[variant])
    vlm = VLM.load(tiny_bundles[variant])
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (31, 45, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L")
    images = [*test_images, rgba, gray, Image.new("RGB", (8, 100), (10, 200, 30))]
    expected = processor.image_processor(images, return_tensors="np")["pixel_values"]
    got = vlm.preprocessor(images)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5
    # Camera frames as HxWx3 uint8 arrays give the same pixels as the equivalent PIL image.
    frame = np.asarray(test_images[0])
    assert np.array_equal(vlm.preprocessor([frame]), got[:1])


def test_prompt_ids_match_processor(variant, tiny_checkpoints, tiny_bundles, test_images):
    processor, _ = _hf(tiny_checkpoints[variant])
    vlm = VLM.load(tiny_bundles[variant])
    for prompt in PROMPTS:
        inputs = processor(images=[test_images[0]], text=[_chat(processor, prompt)], return_tensors="np")
        assert vlm.prompt_ids(Request(prompt=prompt, images=[test_images[0]])) == inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_greedy_tokens_equal_hf_generate_padded_batch(variant, decoder, tiny_checkpoints, tiny_bundles, test_images):
    """Six requests of different prompt lengths in one padded batch, vs HF's batched generate (left-padded).
    The portable decoder left-pads; the fused one packs rows from position 0 (right padding)."""
    processor, model = _hf(tiny_checkpoints[variant])
    vlm = VLM.load(tiny_bundles[variant], decoder=decoder)
    eos = set(vlm.manifest.generation["eos_token_ids"])
    pairs = [(image, prompt) for image in test_images for prompt in PROMPTS]
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=[i for i, _ in pairs], text=[_chat(processor, p) for _, p in pairs], return_tensors="pt", padding=True
    )
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1  # prompts really differ in length
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    texts = vlm.generate_batch(pairs, max_new_tokens=20)
    for row, ids in enumerate(vlm.last_output_ids):
        expected = trim_after_eos(out[row, inputs["input_ids"].shape[1] :].tolist(), eos)
        assert ids == expected, f"row {row}"
        assert texts[row] == processor.tokenizer.decode(expected, skip_special_tokens=True)
    # Batching does not change answers: each row equals its batch-1 run.
    for (image, prompt), text in zip(pairs, texts):
        assert vlm.generate(image, prompt, max_new_tokens=20) == text


def test_streaming_pieces_concatenate_to_the_answer(tiny_bundles, test_images):
    vlm = VLM.load(tiny_bundles["llama-clip"])
    pieces = list(vlm.generate(test_images[0], PROMPTS[0], max_new_tokens=20, stream=True))
    assert len(pieces) > 1
    assert "".join(pieces) == vlm.generate(test_images[0], PROMPTS[0], max_new_tokens=20)


def test_shared_image_encoded_once(tiny_bundles, test_images):
    vlm = VLM.load(tiny_bundles["llama-clip"])
    image = test_images[1]
    answers = vlm.generate_batch([(image, p) for p in PROMPTS], max_new_tokens=8)
    assert vlm.last_stats.images_encoded == 1
    assert answers == [vlm.generate(image, p, max_new_tokens=8) for p in PROMPTS]


def test_two_images_in_one_prompt_match_hf(tiny_checkpoints, tiny_bundles, test_images):
    processor, model = _hf(tiny_checkpoints["qwen2-siglip"])
    vlm = VLM.load(tiny_bundles["qwen2-siglip"])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}
    ]
    inputs = processor(
        images=test_images,
        text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    eos = set(vlm.manifest.generation["eos_token_ids"])
    vlm.generate(test_images, "Compare.", max_new_tokens=12)
    assert vlm.last_output_ids[0] == trim_after_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), eos)


@pytest.mark.slow
def test_fp16_export_runs_and_mostly_agrees_with_fp32(tiny_checkpoints, tiny_bundles, tmp_path, test_images):
    from edgelvm.export import ExportConfig, export

    bundle = export(tiny_checkpoints["qwen2-siglip"], tmp_path / "fp16", ExportConfig(dtype="fp16")).bundle_dir
    manifest = Manifest.load(bundle)
    assert manifest.kv_cache.dtype == "float16" and manifest.graphs["decoder"].precision == "fp16"
    fp16, fp32 = VLM.load(bundle), VLM.load(tiny_bundles["qwen2-siglip"])
    agree = total = 0
    for image in test_images:
        for prompt in PROMPTS:
            fp16.generate(image, prompt, max_new_tokens=16)
            fp32.generate(image, prompt, max_new_tokens=16)
            a, b = fp16.last_output_ids[0], fp32.last_output_ids[0]
            prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            agree, total = agree + prefix, total + len(b)
    assert agree / total >= 0.8  # fp16 rounding may flip a late near-tie, not the bulk of the answers


@pytest.mark.slow
def test_mistral_text_model_with_list_feature_layers(tmp_path, test_images):
    """A third text family (Mistral, GQA) and LLaVA's multi-layer feature selection (a list of layers)."""
    import json

    from edgelvm.export import ExportConfig, export
    from edgelvm.models.synthetic import build_tiny_llava

    checkpoint = build_tiny_llava(tmp_path / "mistral", text="mistral", vision="clip")
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["vision_feature_layer"] = [-2, -1]
    config_path.write_text(json.dumps(config))
    # The projector input doubles with two feature layers: rebuild the weights for the new config.
    from transformers import AutoConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(checkpoint)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(checkpoint)

    bundle = export(checkpoint, tmp_path / "bundle", ExportConfig(max_length=128)).bundle_dir
    processor, model = _hf(checkpoint)
    vlm = VLM.load(bundle)
    eos = set(vlm.manifest.generation["eos_token_ids"])
    for image in test_images:
        for prompt in PROMPTS[:2]:
            inputs = processor(images=[image], text=[_chat(processor, prompt)], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
            vlm.generate(image, prompt, max_new_tokens=20)
            assert vlm.last_output_ids[0] == trim_after_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), eos)


def test_fused_decoder_is_used_and_can_be_declined(tiny_bundles, tmp_path, tiny_checkpoints):
    from edgelvm.errors import ConfigError
    from edgelvm.export import ExportConfig, export
    from edgelvm.runtime.kv_cache import InPlaceKVCache

    assert VLM.load(tiny_bundles["llama-clip"]).backend.fused
    assert isinstance(VLM.load(tiny_bundles["llama-clip"]).backend.new_cache(1), InPlaceKVCache)
    assert not VLM.load(tiny_bundles["llama-clip"], decoder="portable").backend.fused
    small = export(tiny_checkpoints["llama-clip"], tmp_path / "p", ExportConfig(max_length=64, decoder="portable"))
    assert "decoder_ort" not in Manifest.load(small.bundle_dir).graphs
    with pytest.raises(ConfigError, match="no fused decoder"):
        VLM.load(small.bundle_dir, decoder="fused")

"""Gemma 3 (``gemma3``): SigLIP → average-pooled soft tokens → Gemma3 text model (sliding-window and global layers),
bidirectional attention among each image's tokens; what only Gemma 3 adds beyond the shared scenarios of
``test_families.py`` (its row there: ``gemma3``).

Reference: transformers' ``Gemma3Processor`` with ``Gemma3ImageProcessorPil`` prompted through
``apply_chat_template`` (as the model card does; its ``token_type_ids`` make the image blocks bidirectional) and
``Gemma3ForConditionalGeneration.generate``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import BackendError, UnsupportedModelError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from edgelvm.runtime.images.image_blocks import image_blocks  # noqa: E402
from tests.fixtures.gemma3 import build_tiny_gemma3, gemma3_inputs  # noqa: E402
from tests.fixtures.reference import HEAVY_MODULES, eos_ids, trim_after_eos  # noqa: E402

FAMILY = "gemma3"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py
TOKENS = 16  # build_tiny_gemma3: an 8x8 patch grid pooled to 4x4
PROMPTS = ["What is on the table?", "Describe the image in one sentence."]


@pytest.fixture(scope="module")
def images(artifacts):
    return artifacts.images(FAMILY)


@pytest.fixture(scope="module")
def bundle(artifacts):
    return artifacts.bundle(FAMILY)


@pytest.fixture(scope="module")
def vlm(bundle):
    return VLM.load(bundle)


@pytest.fixture(scope="module")
def hf(artifacts):
    processor, model = artifacts.hf(FAMILY)
    assert type(processor).__name__ == "Gemma3Processor"
    assert type(processor.image_processor).__name__ == "Gemma3ImageProcessorPil"  # the backend compared against
    return processor, model


def _messages(images: list, prompt: str, pil: bool) -> list[dict]:
    items = [{"type": "image", **({"image": i} if pil else {})} for i in images]
    return [{"role": "user", "content": [*items, {"type": "text", "text": prompt}]}]


def _hf_batch(processor, model, requests: list[tuple[list, str]], new_tokens: int = 12) -> list[list[int]]:
    """HF's batched greedy ``generate`` (left padding) over chat-templated requests."""
    texts = [processor.apply_chat_template(_messages(imgs, p, False), add_generation_prompt=True, tokenize=False)
             for imgs, p in requests]  # fmt: skip
    inputs = processor(images=[imgs for imgs, _ in requests], text=texts, return_tensors="pt", padding=True,
                       add_special_tokens=False)  # fmt: skip
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    eos = eos_ids(model, processor.tokenizer)
    return [trim_after_eos(row[inputs["input_ids"].shape[1] :].tolist(), eos) for row in ids]


def test_manifest_says_image_bidirectional_and_ships_the_expanding_template(bundle):
    manifest = Manifest.load(bundle)
    assert manifest.attention == "image_bidirectional"
    assert manifest.to_dict()["attention"] == "image_bidirectional"
    assert set(manifest.graphs) == {"vision", "embed", "decoder"}  # outside the fused Llama family
    names = [spec.name for spec in manifest.graphs["decoder"].inputs]
    assert names[:4] == ["inputs_embeds", "attention_mask", "position_ids", "image_blocks"]
    spec = manifest.preprocess
    assert (spec.image_token, spec.tokens_per_image, spec.resize_mode) == ("<image_soft_token>", TOKENS, "exact")
    template = manifest.tokenizer.chat_template
    assert template.startswith("{% filter replace(") and template.endswith("{% endfilter %}")
    assert manifest.tokenizer.add_special_tokens is False  # the template writes BOS
    assert manifest.kv_cache.max_length <= 128  # the tiny model's sliding window


def test_preprocessing_prompt_ids_and_image_blocks_match_the_processor(hf, vlm, images):
    """Pixels vs ``Gemma3ImageProcessorPil``; prompt ids vs ``apply_chat_template`` (the ``\\n\\n`` around each
    image expanded in the text, before tokenizing), one and two images; the runtime's image blocks are exactly the
    processor's ``token_type_ids``."""
    processor, _ = hf
    for name, image in images.items():
        expected = processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
        got = vlm.preprocessor.prepare(image).pixels
        assert got.shape == expected.shape == (1, 3, 32, 32), name
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)
    cases = [([images["landscape"]], p) for p in [*PROMPTS, "  spaces around  "]]
    cases.append(([images["portrait"], images["gray"]], "Compare the two pictures."))
    for pics, prompt in cases:
        inputs = processor.apply_chat_template(_messages(pics, prompt, True), add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="np")  # fmt: skip
        ids = vlm.prompt_ids(Request(messages=_messages(pics, prompt, False), images=pics))
        assert ids == inputs["input_ids"][0].tolist(), prompt
        blocks = image_blocks(ids, vlm.manifest.preprocess.image_token_id)
        np.testing.assert_array_equal(blocks > 0, inputs["token_type_ids"][0] == 1)
        assert blocks.max() == len(pics) and (np.bincount(blocks)[1:] == TOKENS).all()


def test_vision_graph_pools_as_get_image_features_and_the_table_is_scaled(hf, vlm, images):
    _, model = hf
    pixels = np.concatenate([vlm.preprocessor.prepare(images[n]).pixels for n in ("landscape", "portrait", "rgba")])
    got = vlm.backend.encode_images(pixels)
    with torch.no_grad():
        expected = model.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    assert got.shape == (3, TOKENS, model.config.text_config.hidden_size)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        scaled = embedding(torch.arange(embedding.weight.shape[0])).numpy()
    table = np.load(vlm.bundle_dir / vlm.manifest.graphs["embed"].file)
    np.testing.assert_array_equal(table, scaled)
    assert not np.allclose(table, embedding.weight.detach().numpy())


def test_bidirectional_image_attention_is_what_makes_the_runtime_match(hf, vlm, images):
    """The evidence that the image-block mask matters: with the prompt's image blocks the bundle's next-token
    logits equal HF's; with every block 0 (a causal mask over the image tokens) they are far from them. Splitting
    an image's tokens across two decoder steps is refused."""
    processor, model = hf
    image = images["portrait"]
    with torch.no_grad():
        reference = model(**gemma3_inputs(processor, [image], PROMPTS[0])).logits[0, -1].numpy()
    ids = vlm.prompt_ids(Request(prompt=PROMPTS[0], images=[image]))
    row = vlm._embed(ids, vlm._image_features([image]))
    blocks = image_blocks(ids, vlm.manifest.preprocess.image_token_id)
    bidirectional = vlm.backend.step([row], vlm.backend.new_cache(1), {"image_blocks": blocks[None]})[0]
    causal = vlm.backend.step([row], vlm.backend.new_cache(1), {"image_blocks": np.zeros_like(blocks)[None]})[0]
    scale = float(np.abs(reference).max())
    assert float(np.abs(bidirectional - reference).max()) < 1e-4 * scale
    assert float(np.abs(causal - reference).max()) > 1e-2 * scale
    inside = int(np.flatnonzero(blocks)[3])
    plan = vlm._plan([ids], [[image]], [vlm._image_features([image])])
    with pytest.raises(BackendError, match="inside image 1"):
        plan.inputs.prompt([0], 0, inside)


def test_padded_batch_equals_hf_batched_generate_and_shares_only_whole_images(hf, vlm, images):
    """Different prompt lengths (and two images in one request) in one left-padded batch equal HF's batched
    ``generate``. Requests with the same image share their prefix through the image (one block, bitwise-equal
    features); with different images the shared prefix stops before the first image."""
    processor, model = hf
    requests = [
        ([images["landscape"]], PROMPTS[0]),
        ([images["portrait"]], "caption"),
        ([images["landscape"], images["gray"]], PROMPTS[1]),
        ([images["rgba"]], "What is on the chair today, and why is it there?"),
    ]
    expected = _hf_batch(processor, model, requests)
    vlm.generate_batch([Request(messages=_messages(i, p, False), images=i) for i, p in requests], max_new_tokens=12)
    assert vlm.last_output_ids == expected
    first_image = vlm.prompt_ids(Request(prompt=PROMPTS[0], images=[images["landscape"]])).index(
        vlm.manifest.preprocess.image_token_id
    )
    assert vlm.last_stats.reused_tokens <= first_image * (len(requests) - 1)
    same = [([images["landscape"]], PROMPTS[0]), ([images["landscape"]], "What is on the chair today?")]
    expected = _hf_batch(processor, model, same)
    vlm.generate_batch([(i[0], p) for i, p in same], max_new_tokens=12)
    assert vlm.last_output_ids == expected
    assert vlm.last_stats.reused_tokens > first_image + TOKENS  # the image block was prefilled once, whole


def test_a_context_past_the_sliding_window_is_refused_and_one_filling_it_matches_hf(images, tmp_path):
    """Local layers keep a window-sized cache in transformers, which the bundle does not describe yet: export past
    the window is refused before any tracing; a bundle at exactly the window (here 64 tokens, a global layer first,
    the LM head tied to the table as in the google checkpoints) answers like HF with the context full."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from tests.fixtures.reference import hf_generate

    checkpoint = build_tiny_gemma3(tmp_path / "ckpt", sliding_window=64, tie_word_embeddings=True, seed=3,
                                   layer_types=("full_attention", "sliding_attention"))  # fmt: skip
    adapter = load_model(str(checkpoint))
    with pytest.raises(UnsupportedModelError, match=r"sliding window \(64\)"):
        export(adapter, tmp_path / "too_long", ExportConfig(max_length=65))
    assert not (tmp_path / "too_long").exists()
    vlm = VLM.load(export(adapter, tmp_path / "bundle", ExportConfig(max_length=64)).bundle_dir)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    prompt_tokens = len(vlm.prompt_ids(Request(prompt=PROMPTS[0], images=[images["landscape"]])))
    new_tokens = 64 - prompt_tokens
    expected = hf_generate(gemma3_inputs, processor, model, [images["landscape"]], PROMPTS[0], new_tokens)
    vlm.generate(images["landscape"], PROMPTS[0], max_new_tokens=new_tokens)
    assert vlm.last_output_ids[0] == expected and len(expected) == new_tokens  # the context filled to the window


def test_pan_and_scan_checkpoints_are_refused_at_load(tmp_path):
    from edgelvm.models import load_model

    checkpoint = build_tiny_gemma3(tmp_path / "pas", pan_and_scan=True)
    with pytest.raises(UnsupportedModelError, match="pan-and-scan") as err:
        load_model(str(checkpoint))
    assert "do_pan_and_scan" in err.value.fix


def test_plan_counts_a_4b_class_config_and_refuses_past_its_window(tmp_path):
    """google/gemma-3-4b-it's shape (config.json as published, sparse; defaults fill the rest): the config-only
    arithmetic equals the modules transformers builds on ``meta``; the plain-data reading equals transformers'
    config classes; export's KV geometry is refused past the 1024-token window."""
    from edgelvm.models.base import VLMAdapter
    from edgelvm.models.config_json import PlainConfig
    from edgelvm.models.registry import adapter_for_model_type, load_config
    from edgelvm.plan import footprint_of_adapter, plan_config

    raw = {
        "model_type": "gemma3", "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
        "image_token_index": 262144, "mm_tokens_per_image": 256,
        "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                          "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config, source = load_config(tmp_path)
    adapter = adapter_for_model_type("gemma3").for_config(config, source)
    counts = adapter.config_parameter_counts()
    assert counts == VLMAdapter.config_parameter_counts(adapter)
    assert 3.8e9 < counts.vision + counts.decoder < 4.4e9  # a "4B" (the 262k x 2560 table excluded)
    plain, _ = plan_config(tmp_path)
    assert isinstance(plain, PlainConfig)
    plain_adapter = adapter_for_model_type("gemma3").for_config(plain, source)
    assert footprint_of_adapter(plain_adapter, from_config=True) == footprint_of_adapter(adapter, from_config=True)
    assert adapter.kv_cache_spec(1024, "float16").max_length == 1024
    for either in (adapter, plain_adapter):
        with pytest.raises(UnsupportedModelError, match="--max-length 1024"):
            either.kv_cache_spec(4096, "float16")


def test_runtime_runs_the_bundle_without_torch(bundle):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from edgelvm.runtime import VLM
        vlm = VLM.load({str(bundle)!r})
        frame = np.random.default_rng(0).integers(0, 256, (48, 90, 3), dtype=np.uint8)
        vlm.generate_batch([(frame, "What is on the table?"), (frame, "Why?")], max_new_tokens=4)
        chat = vlm.chat(frame)
        chat.ask("What is on the table?", max_new_tokens=3)
        chat.ask("And the color?", max_new_tokens=3)
        assert vlm.last_stats.reused_tokens > 16
        print("HEAVY=" + ",".join(m for m in {HEAVY_MODULES!r} if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY=")

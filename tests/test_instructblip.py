"""InstructBLIP (``instructblip``): BLIP-2 whose Q-Former also reads the prompt; export → runtime parity with
Hugging Face on tiny random checkpoints (a Vicuna-style Llama, with the fused decoder too, and an OPT).

Reference: transformers' ``InstructBlipProcessor`` (``BlipImageProcessorPil`` + the language model's tokenizer + the
Q-Former's own WordPiece tokenizer) and ``InstructBlipForConditionalGeneration.generate``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import PromptTooLongError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
QUERIES = 6  # tests.fixtures.blip.build_tiny_instructblip's num_query_tokens


FAMILY = "instructblip"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py


@pytest.fixture(scope="module")
def images(artifacts):
    return artifacts.images(FAMILY)


@pytest.fixture(scope="module")
def checkpoint(artifacts):
    return artifacts.checkpoint(FAMILY)


@pytest.fixture(scope="module")
def bundle(artifacts):
    return artifacts.bundle(FAMILY)


@pytest.fixture(scope="module")
def hf(artifacts):
    processor, model = artifacts.hf(FAMILY)
    assert type(processor).__name__ == "InstructBlipProcessor"
    assert type(processor.image_processor).__name__ == "BlipImageProcessorPil"  # the backend compared against
    return processor, model


@pytest.fixture(scope="module")
def hf_greedy(artifacts):
    return artifacts.hf_greedy(FAMILY)


def _text(processor, prompt: str) -> str:
    """The tokenizer's template (the Llama test checkpoint keeps one), or the prompt as given (the OPT one has none,
    as the published checkpoints)."""
    if not processor.tokenizer.chat_template:
        return prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _hf_generate(processor, model, image, text: str, max_new_tokens: int = 20) -> list[int]:
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), {processor.tokenizer.eos_token_id})


# ---- preprocessing and the Q-Former's text --------------------------------------------------------------------
def test_pixels_prompt_ids_and_qformer_ids_match_the_hf_processor(hf, bundle, images):
    processor, _ = hf
    vlm = VLM.load(bundle)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for name, image in images.items():
        for prompt in PROMPTS:
            text = _text(processor, prompt)
            inputs = processor(images=[image], text=[text], return_tensors="np")
            assert np.abs(vlm.preprocessor([image]) - inputs["pixel_values"]).max() <= 1e-5, name
            ids = vlm.prompt_ids(Request(prompt=prompt, images=[image]))
            assert ids == inputs["input_ids"][0].tolist(), name
            assert ids[:QUERIES] == [image_id] * QUERIES
            assert vlm.vision_text.encode(text) == inputs["qformer_input_ids"][0].tolist(), (name, prompt)


def test_bundle_ships_the_qformer_tokenizer_and_a_text_conditioned_vision_graph(hf, bundle, images):
    """The vision graph takes the prompt's Q-Former ids; its features equal ``get_image_features`` with the same
    ids, and depend on the question (else the text input would be decoration)."""
    processor, model = hf
    manifest = Manifest.load(bundle)
    assert manifest.family == "instructblip" and manifest.created_from["text_model_type"] == "llama"
    assert set(manifest.graphs) == {"vision", "embed", "decoder", "decoder_ort"}  # Vicuna-style Llama: fused too
    assert [t.name for t in manifest.graphs["vision"].inputs] == ["pixel_values", "vision_text_ids", "vision_text_mask"]
    vision_text = manifest.preprocess.vision_text
    assert vision_text["tokenizer"] in manifest.files  # hashed with the bundle
    vlm = VLM.load(bundle, vision_cache_mb=0)
    features = {}
    for prompt in PROMPTS:
        text = _text(processor, prompt)
        inputs = processor(images=[images["landscape"]], text=[text], return_tensors="pt")
        with torch.no_grad():
            reference = (
                model.get_image_features(
                    inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
                )
                .pooler_output[0]
                .numpy()
            )
        got = vlm._image_features([images["landscape"]], [text])[0]
        assert got.shape == reference.shape == (QUERIES, 64)
        assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-4
        features[prompt] = got
    assert np.abs(features[PROMPTS[0]] - features[PROMPTS[1]]).max() > 1e-3


# ---- generation ------------------------------------------------------------------------------------------------
def test_batch_of_mixed_questions_equals_single_requests(bundle, images, hf_greedy):
    """One left-padded batch (one vision call with right-padded Q-Former texts) gives each request's own answer.
    (HF's batched ``generate`` is not the reference here: the processor left-pads the Q-Former ids too, which shifts
    the Q-Former's absolute positions, so its padded rows differ from the same requests alone.)"""
    vlm = VLM.load(bundle)
    pairs = [(name, prompt) for name in images for prompt in PROMPTS]
    vlm.generate_batch([(images[n], p) for n, p in pairs], max_new_tokens=20)
    assert vlm.last_output_ids == [hf_greedy[pair] for pair in pairs]
    assert vlm.last_stats.images_encoded == 4  # the same image with another question is another encoding


def test_chat_session_turns_equal_stateless_requests(bundle, images, hf_greedy):
    """The image features depend on the whole rendered conversation, so a later turn re-encodes the image with the
    new text and re-prefills (as a stateless request with that conversation would)."""
    vlm = VLM.load(bundle)
    chat = vlm.chat(images["portrait"])
    chat.ask(PROMPTS[0], max_new_tokens=20)
    assert vlm.last_output_ids[0] == hf_greedy["portrait", PROMPTS[0]]
    second = chat.ask("And the color?", max_new_tokens=8)
    reference = VLM.load(bundle)
    messages = chat.messages[:-1]
    expected_ids = reference._encode(messages, [images["portrait"]])
    assert vlm.last_stats.reused_tokens == 0
    rows = reference.stream_requests([Request(messages=messages, images=[images["portrait"]])],
                                     reference_config(8))  # fmt: skip
    assert "".join(piece for _, piece in rows) == second
    assert len(expected_ids) == vlm.last_stats.prompt_tokens


def reference_config(max_new_tokens: int):
    from edgelvm.runtime.vlm import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens)


def test_too_long_qformer_prompt_is_a_clear_error(bundle, images):
    vlm = VLM.load(bundle)
    vlm.vision_text.max_length = 8
    with pytest.raises(PromptTooLongError, match="vision encoder's text input"):
        vlm.generate(images["portrait"], PROMPTS[1], max_new_tokens=2)


# ---- OPT, compression stages, refusals --------------------------------------------------------------------------
def test_opt_instructblip_exports_portable_only_and_matches_hf(tmp_path, images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelvm.export import ExportConfig, export
    from tests.fixtures.blip import build_tiny_instructblip

    checkpoint = build_tiny_instructblip(tmp_path / "opt", text="opt", seed=1)
    result = export(checkpoint, tmp_path / "b", ExportConfig(max_length=96))
    assert set(result.manifest.graphs) == {"vision", "embed", "decoder"}  # OPT: no fused decoder
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    vlm = VLM.load(result.bundle_dir)
    for prompt in PROMPTS:
        vlm.generate(images["landscape"], prompt, max_new_tokens=12)
        expected = _hf_generate(processor, model, images["landscape"], _text(processor, prompt), 12)
        assert vlm.last_output_ids[0] == expected, prompt

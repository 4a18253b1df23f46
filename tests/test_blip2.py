"""BLIP-2 (``blip-2``) with an OPT language model: ViT → Q-Former queries → language projection, the image's
query tokens before the prompt; export → runtime parity with Hugging Face on a tiny random checkpoint.

Reference: transformers' ``Blip2Processor`` with ``BlipImageProcessorPil`` (the backend transformers picks
without torchvision; the runtime reproduces that one) and ``Blip2ForConditionalGeneration.generate``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import ConfigError, EdgeLVMError, UnsupportedModelError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
QUERIES = 6  # tests.fixtures.blip.build_tiny_blip2's num_query_tokens


FAMILY = "blip2"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py


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
    assert type(processor).__name__ == "Blip2Processor"
    assert type(processor.image_processor).__name__ == "BlipImageProcessorPil"  # the backend compared against
    return processor, model


@pytest.fixture(scope="module")
def hf_greedy(artifacts):
    return artifacts.hf_greedy(FAMILY)


def _text(processor, prompt: str) -> str:
    """The prompt as a transformers user builds it: as given (the published checkpoints, like the test one, have no
    chat template), or rendered by a template kept on the tokenizer (``Blip2Processor`` holds none)."""
    if not processor.tokenizer.chat_template:
        return prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _hf_generate(processor, model, image, text: str, max_new_tokens: int = 20) -> list[int]:
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), {processor.tokenizer.eos_token_id})


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_preprocessing_and_prompt_ids_match_the_hf_processor(hf, bundle, images):
    """Pixels (exact resize, rescale, normalize) and prompt ids: the query tokens first, then BOS and the text."""
    from PIL import Image

    processor, _ = hf
    vlm = VLM.load(bundle)
    rng = np.random.default_rng(3)
    cases = {
        **images,
        "rgba": Image.fromarray(rng.integers(0, 256, (31, 45, 4), dtype=np.uint8), mode="RGBA"),
        "gray": Image.fromarray(rng.integers(0, 256, (29, 64), dtype=np.uint8), mode="L"),
        "large": Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
    }
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for name, image in cases.items():
        inputs = processor(images=[image], text=[_text(processor, "Hi")], return_tensors="np")
        got = vlm.preprocessor([image])
        assert got.shape == inputs["pixel_values"].shape == (1, 3, 32, 32), name
        assert np.abs(got - inputs["pixel_values"]).max() <= 1e-5, name
        ids = vlm.prompt_ids(Request(prompt="Hi", images=[image]))
        assert ids == inputs["input_ids"][0].tolist(), name
        assert ids[:QUERIES] == [image_id] * QUERIES and ids[QUERIES] == processor.tokenizer.bos_token_id
    # a camera frame (numpy array) and a batch
    frame = rng.integers(0, 256, (48, 90, 3), dtype=np.uint8)
    expected = processor.image_processor([Image.fromarray(frame), *images.values()], return_tensors="np")
    assert np.abs(vlm.preprocessor([frame, *images.values()]) - expected["pixel_values"]).max() <= 1e-5


def test_plain_prompt_without_a_template_matches_hf(hf, bundle, images):
    """Salesforce's BLIP-2 checkpoints have no chat template: the runtime then encodes the prompt as given, as
    ``processor(images=image, text=prompt)`` does."""
    processor, model = hf
    vlm = VLM.load(bundle)
    vlm.tokenizer.spec = dataclasses.replace(vlm.tokenizer.spec, chat_template=None)
    prompt = "Question: how many cats are there? Answer:"
    inputs = processor(images=[images["portrait"]], text=[prompt], return_tensors="np")
    assert vlm.prompt_ids(Request(prompt=prompt, images=[images["portrait"]])) == inputs["input_ids"][0].tolist()
    vlm.generate(images["portrait"], prompt, max_new_tokens=12)
    assert vlm.last_output_ids[0] == _hf_generate(processor, model, images["portrait"], prompt, 12)


def test_one_image_per_prompt_and_no_placeholder_in_the_text(bundle, images):
    vlm = VLM.load(bundle)
    with pytest.raises(EdgeLVMError, match="one image per prompt"):
        vlm.generate(list(images.values()), "Compare.", max_new_tokens=2)
    with pytest.raises(EdgeLVMError, match="places the image before the prompt"):
        vlm.generate(images["landscape"], "Look at <image> here", max_new_tokens=2)
    vlm.generate(None, "No image.", max_new_tokens=2)  # text only: no image tokens at all
    assert vlm.last_stats.prompt_tokens == len(vlm.tokenizer.encode(vlm.tokenizer.render(
        [{"role": "user", "content": [{"type": "text", "text": "No image."}]}])))  # fmt: skip


# ---- bundle ------------------------------------------------------------------------------------------------------
def test_bundle_is_portable_only_and_says_prefix_placement(hf, bundle, images):
    """OPT is outside the fused decoder's Llama family: auto mode writes the portable decoder only and the runtime
    runs it. The vision graph (ViT + Q-Former + projection) equals ``get_image_features``."""
    processor, model = hf
    manifest = Manifest.load(bundle)
    assert manifest.family == "blip-2" and manifest.created_from["text_model_type"] == "opt"
    assert set(manifest.graphs) == {"vision", "embed", "decoder"}
    for name in ("vision", "decoder"):
        assert manifest.graphs[name].parity["max_rel"] < 1e-4, name
    pre = manifest.preprocess
    assert (pre.image_placement, pre.tokens_per_image) == ("prefix", QUERIES)
    assert (pre.resize_mode, pre.center_crop) == ("exact", None)
    assert manifest.tokenizer.chat_template is None  # none in the checkpoint, and none added
    vlm = VLM.load(bundle)
    assert vlm.backend.fused is False
    with pytest.raises(ConfigError, match="no fused decoder"):
        VLM.load(bundle, decoder="fused")
    vlm = VLM.load(bundle, vision_cache_mb=0)
    pixels = processor.image_processor(list(images.values()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = model.get_image_features(pixels).pooler_output.numpy()
    got = np.stack(vlm._image_features(list(images.values())))
    assert got.shape == reference.shape == (2, QUERIES, 64)
    assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-4
    # Compatibility: the field is written only when it is not the default, and a manifest without it loads.
    data = manifest.to_dict()
    assert data["preprocess"]["image_placement"] == "prefix"
    plain = dataclasses.replace(manifest, preprocess=dataclasses.replace(pre, image_placement="placeholder"))
    data = plain.to_dict()
    assert "image_placement" not in data["preprocess"]
    assert Manifest.from_dict(data).preprocess.image_placement == "placeholder"


# ---- generation ------------------------------------------------------------------------------------------------
def test_padded_batch_equals_hf_batched_generate(hf, bundle, images, hf_greedy):
    """HF pads between the query tokens and BOS (the processor prepends them after padding the text); OPT's
    positions come from the mask, so both HF's batch and the runtime's left-padded one equal single requests."""
    processor, model = hf
    pairs = [(name, prompt) for name in images for prompt in PROMPTS]
    texts = [_text(processor, p) for _, p in pairs]
    inputs = processor(images=[images[n] for n, _ in pairs], text=texts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    eos = {processor.tokenizer.eos_token_id}
    batched = [trim_after_eos(row[inputs["input_ids"].shape[1] :].tolist(), eos) for row in out]
    assert batched == [hf_greedy[pair] for pair in pairs]
    vlm = VLM.load(bundle)
    vlm.generate_batch([(images[n], p) for n, p in pairs], max_new_tokens=20)
    assert vlm.last_output_ids == batched


# ---- what is refused ---------------------------------------------------------------------------------------------
def test_t5_blip2_is_a_clear_error_at_load(tmp_path):
    from edgelvm.models import load_model
    from tests.fixtures.blip import build_tiny_blip2

    checkpoint = build_tiny_blip2(tmp_path / "t5", text="t5", num_layers=1)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder") as info:
        load_model(str(checkpoint))
    assert "OPT" in info.value.fix


# ---- compression stages ----------------------------------------------------------------------------------------
def test_awq_scale_groups_fold_exactly(checkpoint, hf, images):
    """Every scale group the adapter names (LayerNorm → q/k/v, v → out_proj, LayerNorm → fc1, fc1 → ReLU → fc2)
    absorbs arbitrary positive per-channel scales without changing the model's output."""
    from edgelvm.models import load_model
    from edgelvm.quantize.folding import fold_scales

    processor, _ = hf
    adapter = load_model(str(checkpoint))
    groups = adapter.text_scale_groups()
    assert len(groups) == 4 * adapter.text_config.num_hidden_layers
    inputs = processor(images=[images["landscape"]], text=[_text(processor, PROMPTS[0])], return_tensors="pt")
    with torch.no_grad():
        before = adapter.model(**inputs).logits
        generator = torch.Generator().manual_seed(0)
        for group in groups:
            width = next(iter(group.linears.values())).in_features
            s = torch.rand(width, generator=generator) * 3 + 0.25
            fold_scales(group, list(group.linears), s)
        after = adapter.model(**inputs).logits
    assert (after - before).abs().max() / before.abs().max() < 1e-5


def test_quantize_cli_calibrates_a_checkpoint_without_a_template(checkpoint, images, tmp_path):
    """`edgelvm quantize BLIP2 --calib shapes --llm awq --vision int8` on a checkpoint shaped as the published ones
    (no chat template): the records are rendered as BLIP-2 is prompted ("Question: … Answer: …", the answer the
    target), and the output keeps the source's processor (no template added, the same prompt ids)."""
    from transformers import AutoProcessor
    from typer.testing import CliRunner

    from edgelvm.calibration.dataset import load_calibration_set
    from edgelvm.cli import app
    from edgelvm.data.batches import ConversationEncoder
    from edgelvm.models import load_model

    source = AutoProcessor.from_pretrained(checkpoint)
    assert source.tokenizer.chat_template is None and source.chat_template is None  # as Salesforce/blip2-opt-*
    record = load_calibration_set("shapes", 1).records[0]
    (question, answer) = (text for _, text in record.turns)
    encoded = ConversationEncoder.for_adapter(load_model(str(checkpoint))).encode(record)
    tokenizer = source.tokenizer
    assert tokenizer.decode(encoded.input_ids, skip_special_tokens=True).strip() == (
        f"Question: {question} Answer: {answer}"
    )
    target = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
    assert tokenizer.decode(target, skip_special_tokens=True).strip() == answer

    out = tmp_path / "q"
    args = ["quantize", str(checkpoint), "-o", str(out), "--calib", "shapes", "--calib-limit", "6", "--llm", "awq",
            "--vision", "int8", "--calibrator", "minmax", "--group-size", "32", "--batch-size", "3"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "int4.safetensors").is_file() and (out / "int8.safetensors").is_file()
    assert not list(out.glob("chat_template*"))
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.chat_template is None
    prompt = "Question: how many cats are there? Answer:"
    want = source(images=[images["landscape"]], text=[prompt], return_tensors="np")["input_ids"]
    assert processor(images=[images["landscape"]], text=[prompt], return_tensors="np")["input_ids"].tolist() == (
        want.tolist()
    )


def test_derived_students_are_a_clear_error(checkpoint):
    from edgelvm.distill.student import StudentSpec, derive_config
    from edgelvm.models import load_model

    adapter = load_model(str(checkpoint))  # pruning it is refused in test_families.py
    with pytest.raises(UnsupportedModelError, match="derived BLIP-2 students"):
        derive_config(adapter, StudentSpec(text_layers=1))

"""PaliGemma (``paligemma``): SigLIP → linear projector → Gemma (PaliGemma 1) or Gemma2 (PaliGemma 2), image tokens
before BOS + prompt + "\\n", prefix-LM attention over image + prompt; export → runtime parity with Hugging Face on
tiny random checkpoints.

Reference: transformers' ``PaliGemmaProcessor`` with ``SiglipImageProcessorPil`` (the backend transformers picks
without torchvision; the runtime reproduces that one) and ``PaliGemmaForConditionalGeneration.generate`` (which
passes the processor's ``token_type_ids``: the prompt is one bidirectional block).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import EdgeLVMError, ManifestError, UnsupportedModelError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "caption en"]
TOKENS = 16  # tests.fixtures.paligemma.build_tiny_paligemma: (32 / 8)^2 image tokens


FAMILY = "paligemma"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py


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
def vlm(bundle):
    return VLM.load(bundle)


@pytest.fixture(scope="module")
def hf(artifacts):
    processor, model = artifacts.hf(FAMILY)
    assert type(processor).__name__ == "PaliGemmaProcessor"
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil"  # the backend compared against
    assert processor.chat_template is None  # as the google checkpoints
    return processor, model


def _hf_generate(processor, model, images, texts, max_new_tokens: int = 12) -> list[list[int]]:
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert "token_type_ids" in inputs  # what makes HF's first forward prefix-LM
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = {processor.tokenizer.eos_token_id}
    return [trim_after_eos(row[inputs["input_ids"].shape[1] :].tolist(), eos) for row in ids]


def test_manifest_says_prefix_lm_prefix_images_and_the_prompt_wrapping(bundle):
    manifest = Manifest.load(bundle)
    assert manifest.family == "paligemma"
    assert manifest.attention == "prefix_lm"
    assert manifest.positions == {"kind": "1d"}  # the graph adds PaliGemma's 1-based offset
    assert manifest.preprocess.image_placement == "prefix"
    assert manifest.preprocess.tokens_per_image == TOKENS
    tokenizer = manifest.tokenizer
    assert (tokenizer.prompt_prefix, tokenizer.prompt_suffix, tokenizer.add_special_tokens) == ("<s>", "\n", False)
    assert tokenizer.chat_template is None  # the calibration-only template is not shipped
    # Gemma is outside the fused decoder's Llama family: `--decoder auto` skipped it
    assert set(manifest.graphs) == {"vision", "embed", "decoder"}
    # the new fields are written only when set, and an attention kind this runtime does not know is refused
    data = manifest.to_dict()
    assert data["attention"] == "prefix_lm" and Manifest.from_dict(data).tokenizer.prompt_suffix == "\n"
    bare = dataclasses.replace(tokenizer, prompt_prefix="", prompt_suffix="")
    plain = dataclasses.replace(manifest, attention="causal", tokenizer=bare)
    data = plain.to_dict()
    assert "attention" not in data and "prompt_prefix" not in data["tokenizer"]
    assert Manifest.from_dict(data).attention == "causal"
    with pytest.raises(ManifestError, match="attention 'sliding'"):
        Manifest.from_dict({**data, "attention": "sliding"})


def test_preprocessing_and_prompt_ids_match_the_processor(hf, vlm, images):
    processor, _ = hf
    for name, image in images.items():
        expected = processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
        got = vlm.preprocessor.prepare(image).pixels
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)
    for prompt in [*PROMPTS, "answer en où est le chat ?"]:
        expected = processor(images=[images["landscape"]], text=[prompt], return_tensors="np")["input_ids"][0]
        ids = vlm.prompt_ids(Request(prompt=prompt, images=[images["landscape"]]))
        assert ids == expected.tolist(), prompt
        assert ids[:TOKENS] == [vlm.manifest.preprocess.image_token_id] * TOKENS and ids[-1] != ids[-2]
    with pytest.raises(EdgeLVMError, match="one image per prompt"):
        vlm.prompt_ids(Request(prompt=PROMPTS[0], images=[images["landscape"], images["portrait"]]))
    with pytest.raises(EdgeLVMError, match="places the image before the prompt"):
        vlm.prompt_ids(Request(prompt="<image>" + PROMPTS[0], images=[images["landscape"]]))


def test_embedding_table_and_vision_graph_equal_what_the_decoder_gets_in_hf(hf, vlm, images):
    """The table holds Gemma's scaled embeddings (its module multiplies by sqrt(hidden)); the vision graph returns
    the projector's output unscaled, as ``get_image_features`` (HF splices it into the scaled embeddings)."""
    _, model = hf
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        scaled = embedding(torch.arange(embedding.weight.shape[0])).numpy()
    table = np.load(vlm.bundle_dir / vlm.manifest.graphs["embed"].file)
    np.testing.assert_array_equal(table, scaled)
    assert not np.allclose(table, embedding.weight.detach().numpy())
    pixels = np.concatenate([vlm.preprocessor.prepare(images[n]).pixels for n in ("landscape", "portrait", "gray")])
    got = vlm.backend.encode_images(pixels)
    with torch.no_grad():
        expected = model.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    assert got.shape == (3, TOKENS, model.config.text_config.hidden_size)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_padded_batch_equals_hf_batched_generate_and_shares_no_prefix(hf, vlm, images):
    """HF pads on the left (pads carry token_type_ids 0 but are masked out); the runtime's padded batch gives the
    same tokens. Two requests share their image and the start of their prompt — more than the runtime's shared-
    prefix threshold — yet nothing is prefilled separately: that would split the bidirectional prompt block."""
    processor, model = hf
    requests = [
        (images["landscape"], "What is on the table?"),
        (images["portrait"], "caption en"),
        (images["landscape"], "What is on the chair today?"),
        (images["gray"], "answer en how many?"),
    ]
    expected = _hf_generate(processor, model, [r[0] for r in requests], [r[1] for r in requests])
    vlm.generate_batch(requests, max_new_tokens=12)
    assert vlm.last_output_ids == expected
    assert vlm.last_stats.reused_tokens == 0


def test_prefix_lm_attention_is_what_makes_the_runtime_match(hf, vlm, images):
    """The evidence that the decoder's mask matters: the prompt prefilled in one step (one bidirectional block)
    gives HF's next-token logits; the same prompt fed one token per step — a causal prefill, what a plain causal
    decoder or a split prefill computes — is far from them."""
    processor, model = hf
    image = images["portrait"]
    inputs = processor(images=[image], text=[PROMPTS[0]], return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits[0, -1].numpy()
    ids = vlm.prompt_ids(Request(prompt=PROMPTS[0], images=[image]))
    row = vlm._embed(ids, vlm._image_features([image]))
    one_step = vlm.backend.step([row], vlm.backend.new_cache(1))[0]
    cache = vlm.backend.new_cache(1)
    for position in range(len(row)):
        causal = vlm.backend.step([row[position : position + 1]], cache)[0]
    scale = float(np.abs(reference).max())
    assert float(np.abs(one_step - reference).max()) < 1e-4 * scale
    assert float(np.abs(causal - reference).max()) > 1e-2 * scale


def test_paligemma2_gemma2_exports_and_matches_hf(images, tmp_path):
    """PaliGemma 2: Gemma2 (attention and final logit soft-capping, sliding-window layers) through the same prefix-LM
    decoder; a context longer than the sliding window is refused (transformers' cache would stop growing)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from tests.fixtures.paligemma import build_tiny_paligemma

    checkpoint = build_tiny_paligemma(tmp_path / "ckpt", text="gemma2")
    adapter = load_model(str(checkpoint))
    assert adapter.text_config.model_type == "gemma2"
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        adapter.kv_cache_spec(adapter.text_config.sliding_window + 1, "float32")
    vlm = VLM.load(export(adapter, tmp_path / "bundle", ExportConfig(max_length=96)).bundle_dir)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    for prompt in PROMPTS:
        expected = _hf_generate(processor, model, [images["landscape"]], [prompt])[0]
        vlm.generate(images["landscape"], prompt, max_new_tokens=12)
        assert vlm.last_output_ids[0] == expected, prompt
    requests = [(images["landscape"], PROMPTS[0]), (images["portrait"], "answer en how many?")]
    expected = _hf_generate(processor, model, [r[0] for r in requests], [r[1] for r in requests])
    vlm.generate_batch(requests, max_new_tokens=12)
    assert vlm.last_output_ids == expected


def test_pruned_gemma_keeps_one_kv_head_and_its_explicit_head_dim(artifacts):
    """The shared prune recipe (test_families.py) on Gemma: half the query heads, the one KV head and the explicit
    head_dim kept, a quarter of the MLP neurons cut."""
    report = artifacts.pruned(FAMILY).report
    assert report.kept["text"][0] == {"heads": 2, "kv_heads": 1, "head_dim": 16, "intermediate": 96}


def test_prune_and_quantize_keep_the_source_processor_files(artifacts, checkpoint, images):
    """A stage does not change the processor it was given: the google-style source has no chat template, and
    neither has the pruned or the quantized checkpoint (the shared stages of test_families.py, calibrated through
    this processor); their processor files are the source's and give the same ids (and pixels) for the same
    inputs."""
    from transformers import AutoProcessor

    pruned, quantized = artifacts.pruned(FAMILY).out, artifacts.quantized(FAMILY).out
    source = AutoProcessor.from_pretrained(checkpoint)
    files = ("tokenizer.json", "tokenizer_config.json", "processor_config.json")
    for out in (pruned, quantized):
        assert not list(out.glob("chat_template*")), out
        for name in files:
            assert (out / name).read_bytes() == (checkpoint / name).read_bytes(), (out, name)
        processor = AutoProcessor.from_pretrained(out)
        assert processor.chat_template is None and processor.tokenizer.chat_template is None
        for prompt in PROMPTS:
            want = source(images=[images["landscape"]], text=[prompt], return_tensors="np")
            got = processor(images=[images["landscape"]], text=[prompt], return_tensors="np")
            assert got["input_ids"].tolist() == want["input_ids"].tolist(), (out, prompt)
            assert np.array_equal(got["pixel_values"], want["pixel_values"])

"""Idefics v1 (``idefics``): CLIP-like tower → perceiver resampler → gated cross-attention in a Llama-style decoder;
export → runtime parity with Hugging Face on tiny random checkpoints.

The bundle's decoder takes the images' states and a per-position image mask every step
(``preprocess.image_placement = "cross_attention"``); the runtime never splices features into the embeddings.
Reference: ``IdeficsProcessor`` with ``IdeficsImageProcessorPil`` (the backend transformers picks without
torchvision) and ``IdeficsForVisionText2Text.generate``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import BackendError, BundleError, ConfigError, UnsupportedModelError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the picture"]
NEW_TOKENS = 10


FAMILY = "idefics"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py


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
    assert type(processor).__name__ == "IdeficsProcessor"
    assert type(processor.image_processor).__name__ == "IdeficsImageProcessorPil"  # the backend compared against
    assert type(model).__name__ == "IdeficsForVisionText2Text"
    return processor, model


def _hf_generate(hf, items: list[list], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    processor, model = hf
    inputs = processor(text=items, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    eos = {processor.tokenizer.eos_token_id}
    return [trim_after_eos(row[inputs["input_ids"].shape[1] :].tolist(), eos) for row in out]


# ---- preprocessing ---------------------------------------------------------------------------------------------------
def test_pixels_match_pil_image_processor(vlm, hf, images):
    processor, _ = hf
    for name, image in images.items():
        ours = vlm.preprocessor([image])
        ref = processor.image_processor([image], return_tensors="pt").numpy()
        assert ours.shape == ref.shape == (1, 3, 32, 32), name
        assert float(np.abs(ours - ref).max()) <= 1e-5, name


def test_prompt_ids_and_image_mask_match_processor(vlm, hf, images):
    """Prompt ids (BOS, fake tokens around each image, one ``<image>`` each, consecutive images sharing a fake token)
    and the cross-attention mask rule vs the processor's ``image_attention_mask``, with an end-of-document token in
    the text (positions after it attend to no image)."""
    processor, _ = hf
    cross = vlm.cross
    eos = processor.tokenizer.eos_token
    cases = [
        ([images["landscape"]], PROMPTS[0]),
        ([images["portrait"], images["gray"]], PROMPTS[1]),
        ([images["rgba"]], f"first part{eos} after the end"),
        ([], "no image at all"),
    ]
    for pics, prompt in cases:
        ref = processor(text=[[*pics, prompt]], return_tensors="pt")
        ids = vlm.prompt_ids(Request(prompt=prompt, images=pics))
        assert ids == ref["input_ids"][0].tolist(), prompt
        columns = ref["image_attention_mask"].shape[-1]
        mask = cross.rule(ids, len(pics), columns, cross.image_token_id, cross.reset_token_ids)
        assert np.array_equal(mask, ref["image_attention_mask"][0].numpy()), prompt
    # the fake token is an added token past vocab_size: the table carries the decoupled rows
    fake = processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    assert fake >= hf[1].config.vocab_size and vlm._embed_table.data.shape[0] == len(processor.tokenizer)


# ---- graphs ----------------------------------------------------------------------------------------------------------
def test_manifest_and_graph_parity(bundle):
    manifest = Manifest.load(bundle)
    pre = manifest.preprocess
    assert pre.image_placement == "cross_attention" and pre.cross_attention["mask_rule"] == "latest_image"
    names = [t.name for t in manifest.graphs["decoder"].inputs]
    assert names[3:5] == pre.cross_attention["inputs"] == ["cross_states", "cross_mask"]
    assert manifest.graphs["decoder"].inputs[3].shape == ["batch", "images", pre.tokens_per_image, 48]
    assert "decoder_ort" not in manifest.graphs  # no fused decoder for cross-attention models
    for graph in ("vision", "decoder"):
        assert manifest.graphs[graph].parity["max_rel"] < 1e-4, graph


def test_vision_graph_matches_transformers(vlm, hf, images):
    _, model = hf
    pixels = vlm.preprocessor([images["landscape"], images["portrait"]])
    ours = vlm.backend.encode_images(pixels)
    with torch.no_grad():
        states = model.model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        ref = model.model.perceiver_resampler(states).numpy()
    assert ours.shape == ref.shape == (2, 4, 48)
    assert float(np.abs(ours - ref).max()) <= 1e-4 * float(np.abs(ref).max())


def test_prefill_logits_match_transformers(vlm, hf, images):
    """The whole contract in one step: vision graph → states, the mask rule → mask, the decoder graph's last logits
    equal ``IdeficsForVisionText2Text(**processor(...)).logits[:, -1]``; and the image changes them."""
    processor, model = hf
    got = []
    for image in (images["landscape"], images["gray"]):
        request = Request(prompt=PROMPTS[0], images=[image])
        ids = vlm.prompt_ids(request)
        cross = vlm.cross.batch([ids], [vlm._image_features([image])], np.float32)
        logits = vlm.backend.step([vlm._embed(ids, [])], vlm.backend.new_cache(1), cross.prefill(0))
        with torch.no_grad():
            ref = model(**processor(text=[[image, PROMPTS[0]]], return_tensors="pt")).logits[:, -1].numpy()
        assert float(np.abs(logits - ref).max()) <= 1e-4 * float(np.abs(ref).max())
        got.append(logits)
    assert float(np.abs(got[0] - got[1]).max()) > 1e-2  # the answer depends on the image


# ---- runtime vs generate ---------------------------------------------------------------------------------------------
def test_two_images_in_one_prompt_and_text_only(vlm, hf, images):
    pics = [images["portrait"], images["gray"]]
    ref = _hf_generate(hf, [[*pics, PROMPTS[1]]])[0]
    vlm.generate(pics, PROMPTS[1], max_new_tokens=NEW_TOKENS)
    assert vlm.last_output_ids[0] == ref
    ref = _hf_generate(hf, [["Tell me a story"]])[0]  # HF encodes an all-zero image that no position attends to
    vlm.generate(None, "Tell me a story", max_new_tokens=NEW_TOKENS)
    assert vlm.last_output_ids[0] == ref


def test_padded_batch_matches_hf_batched_generate(vlm, hf, images):
    """Left-padded rows with 1, 2 and 0 images (states zero-padded to 2 images, mask columns off) equal HF's batched
    ``generate`` (which pads pixel_values / image_attention_mask the same way) and the single requests."""
    requests = [
        ([images["landscape"]], PROMPTS[0]),
        ([images["portrait"], images["rgba"]], "Compare them"),
        ([], PROMPTS[1]),
    ]
    ref = _hf_generate(hf, [[*pics, prompt] for pics, prompt in requests])
    vlm.generate_batch([Request(prompt=p, images=pics) for pics, p in requests], max_new_tokens=NEW_TOKENS)
    assert vlm.last_output_ids == ref
    for (pics, prompt), row in zip(requests, ref):
        vlm.generate(pics or None, prompt, max_new_tokens=NEW_TOKENS)
        assert vlm.last_output_ids[0] == row


def test_no_resampler_interval_two_variant(images, tmp_path):
    """Tower states straight into cross-attention (``use_resampler=False``: CLS + patches) and a cross-attention
    block every second layer."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelvm.export import ExportConfig, export
    from tests.fixtures.idefics import build_tiny_idefics

    checkpoint = build_tiny_idefics(tmp_path / "ckpt", use_resampler=False, cross_layer_interval=2, num_layers=4)
    bundle = export(checkpoint, tmp_path / "b", ExportConfig(max_length=64)).bundle_dir
    vlm = VLM.load(bundle)
    assert vlm.manifest.preprocess.tokens_per_image == 17  # (32 / 8)^2 patches + CLS
    hf = AutoProcessor.from_pretrained(checkpoint), AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    for name in ("landscape", "gray"):
        ref = _hf_generate(hf, [[images[name], PROMPTS[0]]])[0]
        vlm.generate(images[name], PROMPTS[0], max_new_tokens=NEW_TOKENS)
        assert vlm.last_output_ids[0] == ref, name


def test_teacher_forced_logits_match_transformers(vlm, hf, images):
    """``forced_logits`` (``edgelvm eval --reference``): every continuation position's logits equal HF's forward over
    prompt + continuation, whose ``image_attention_mask`` rows for the continuation repeat the prompt's last row (what
    ``generate`` feeds its new tokens)."""
    processor, model = hf
    continuation = [200, 17, 301, 2, 45]  # EOS inside: the mask is not reset for fed tokens, as in generate
    inputs = processor(text=[[images["portrait"], PROMPTS[1]]], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation])], dim=1)
    mask = inputs["image_attention_mask"]
    mask = torch.cat([mask, mask[:, -1:].expand(-1, len(continuation), -1)], dim=1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                    image_attention_mask=mask).logits[0, n - 1 : -1].numpy()  # fmt: skip
    got = vlm.forced_logits(images["portrait"], PROMPTS[1], continuation)
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-4 * float(np.abs(ref).max())


# ---- what is refused -------------------------------------------------------------------------------------------------
def test_tensorrt_build_and_fused_refused(vlm, bundle):
    from edgelvm.build.tensorrt_builder import BuildConfig, EngineBuildError, decoder_profiles
    from edgelvm.runtime.trt_backend import TrtBackend

    with pytest.raises(BackendError, match="cross-attention"):
        TrtBackend(bundle, vlm.manifest)
    with pytest.raises(EngineBuildError, match=r"\(cross_states, cross_mask\)") as info:  # before TensorRT loads
        decoder_profiles(vlm.manifest, BuildConfig())
    assert "onnxruntime" in info.value.fix
    with pytest.raises(ConfigError, match="no fused decoder"):
        VLM.load(bundle, decoder="fused")


def test_unknown_mask_rule_is_a_bundle_error(vlm):
    import dataclasses

    from edgelvm.runtime.images.cross_attention import cross_attention_inputs

    spec = vlm.manifest.preprocess
    broken = dataclasses.replace(spec, cross_attention={**spec.cross_attention, "mask_rule": "every_image_v9"})
    with pytest.raises(BundleError, match="every_image_v9"):
        cross_attention_inputs(broken)
    with pytest.raises(BundleError, match="no 'cross_attention' entry"):
        cross_attention_inputs(dataclasses.replace(spec, cross_attention=None))


def test_derived_students_and_distill_refused(checkpoint, tmp_path):
    from edgelvm.distill import DistillConfig, StudentSpec, distill
    from edgelvm.models import load_model

    adapter = load_model(checkpoint)  # pruning it is refused in test_families.py
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        adapter.sub_configs()  # what a derived student is built from
    with pytest.raises(UnsupportedModelError, match="distilling"):
        distill(adapter, StudentSpec(text_layers=1), [], DistillConfig(out=str(tmp_path / "d"), steps=1))


def test_quantized_checkpoint_keeps_cross_attention_float_and_changes_an_answer(artifacts, hf, images):
    """The shared quantize recipe (test_families.py: the bundle equals the quantized checkpoint in transformers):
    only the decoder layers' 7 linears are INT4 (the gated cross-attention blocks and the LM head stay float), and
    quantization changed some answer (the comparison would not notice a quantizer that did nothing otherwise)."""
    stage = artifacts.quantized(FAMILY)
    assert len([r for r in stage.report.layers if r["side"] == "text"]) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    vlm = VLM.load(stage.export.bundle_dir)
    changed = 0
    for name in ("landscape", "portrait"):
        for prompt in PROMPTS:
            vlm.generate(images[name], prompt, max_new_tokens=NEW_TOKENS)
            changed += vlm.last_output_ids[0] != _hf_generate(hf, [[images[name], prompt]])[0]
    assert changed >= 1

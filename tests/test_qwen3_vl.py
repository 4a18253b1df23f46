"""Qwen3-VL (``qwen3_vl``): what it adds to Qwen2-VL's layout — the tower's learned position table, DeepStack
(vision features added after the first decoder layers: an extra decoder input) and interleaved M-RoPE — exported
and run torch-free, against Hugging Face on a tiny random checkpoint (``tests/fixtures/qwen3_vl.py``).

The shared scenarios (greedy == HF ``generate``, padded batch, chat, torch-free, INT4 AWQ + INT8 vision) run on its
``FAMILIES`` row in ``tests/test_families.py``. Reference: ``Qwen3VLProcessor`` (built without its torchvision video
part) with ``Qwen2VLImageProcessorPil``, and ``Qwen3VLForConditionalGeneration``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import ConfigError, UnsupportedModelError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM, Request  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

FAMILY = "qwen3_vl"  # its row in tests/fixtures/families.py; the artifacts are shared with test_families.py
PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
WIDTH, LAYERS = 64, 2  # the tiny checkpoint's text hidden size and DeepStack layers


@pytest.fixture(scope="module")
def images(artifacts):
    return artifacts.images(FAMILY)  # landscape: 6x8 patches (12 tokens); portrait: 10x6 (15 tokens)


@pytest.fixture(scope="module")
def checkpoint(artifacts):
    return artifacts.checkpoint(FAMILY)


@pytest.fixture(scope="module")
def bundle(artifacts):
    return artifacts.bundle(FAMILY)


@pytest.fixture(scope="module")
def hf_greedy(artifacts):
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


def _hf_generate(adapter, image_list, messages, max_new_tokens: int = 20) -> list[int]:
    processor, model = adapter.processor, adapter.model
    inputs = processor(images=image_list or None, text=[_text(processor, messages)], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), set(model.generation_config.eos_token_id))


# ---- preprocessing and positions ---------------------------------------------------------------------------------
def test_preprocessing_grids_and_prompt_ids_match_the_hf_processor(adapter, vlm, images):
    """16-px patches in merge-block order (mean = std = 0.5), ``image_grid_thw`` and the expanded prompt ids, on
    images of different sizes and modes, and two images in one prompt."""
    from PIL import Image

    processor = adapter.processor
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    rng = np.random.default_rng(3)
    cases = {
        **images,
        "small": Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)),
        "large": Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
        "rgba": Image.fromarray(rng.integers(0, 256, (31, 45, 4), dtype=np.uint8), mode="RGBA"),
    }
    grids = {}
    for name, image in cases.items():
        inputs = processor(images=[image], text=[_text(processor, _messages("Hi"))], return_tensors="np")
        assert np.abs(vlm.preprocessor.views(image) - inputs["pixel_values"]).max() <= 1e-5, name
        grids[name] = vlm.preprocessor.tiling.grid(image.height, image.width)
        assert list(grids[name]) == inputs["image_grid_thw"][0].tolist(), name
        assert vlm.prompt_ids(Request(prompt="Hi", images=[image])) == inputs["input_ids"][0].tolist(), name
    assert len(set(grids.values())) >= 3
    pair = [images["portrait"], images["landscape"]]
    inputs = processor(images=pair, text=[_text(processor, _messages("Compare.", 2))], return_tensors="np")
    assert vlm.prompt_ids(Request(prompt="Compare.", images=pair)) == inputs["input_ids"][0].tolist()


def test_position_table_resampling_equals_transformers(vlm):
    """The tower's learned 6x6 position table resampled to each grid: the runtime's rows and weights are
    transformers' bitwise (grids smaller and larger than the table, several frames)."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    rule = vlm.preprocessor.tiling
    assert rule.position_table_side == 6
    for grid in [(1, 6, 8), (1, 10, 6), (1, 2, 2), (1, 24, 4), (2, 4, 6)]:
        indices, weights = get_vision_interpolation_indices_and_weights(
            torch.tensor([grid]), 6, mode="bilinear", align_corners=True, spatial_merge_size=2
        )
        got_indices, got_weights = rule.position_interpolation(*grid)
        assert np.array_equal(got_indices, indices.numpy()) and np.array_equal(got_weights, weights.numpy()), grid


def test_mrope_positions_equal_get_rope_index(adapter, vlm, images):
    """Qwen3-VL's ``get_rope_index`` (token types from the processor) on a left-padded batch: two images, one image,
    text only; generation continues where HF's rope deltas put it."""
    processor, model = adapter.processor, adapter.model
    requests = [
        (_messages(PROMPTS[0], 2), [images["landscape"], images["portrait"]]),
        (_messages("Hi"), [images["portrait"]]),
    ]
    texts = [_text(processor, m) for m, _ in requests]
    inputs = processor(images=[i for _, imgs in requests for i in imgs], text=texts, return_tensors="pt", padding=True)
    expected, deltas = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    for row, (messages, imgs) in enumerate(requests):
        ids = vlm.prompt_ids(Request(messages=messages, images=imgs))
        got = vlm._positions(ids, imgs)
        assert np.array_equal(got, expected[:, row, inputs["attention_mask"][row].bool()].numpy()), row
        assert vlm.positions.next_position(got) == len(ids) + int(deltas[row])
        assert not np.array_equal(got[1], got[2])
    assert vlm.manifest.positions["mrope_interleaved"] is True


# ---- bundle and graphs -------------------------------------------------------------------------------------------
def test_bundle_is_portable_with_deepstack_as_data(bundle):
    """No fused decoder (3-D rotary); the manifest names the position table and DeepStack; the vision graph returns
    token embeddings + 2 DeepStack features per token, the decoder takes ``deepstack_embeds [batch, seq, 2, 64]``."""
    manifest = Manifest.load(bundle)
    assert manifest.family == "qwen3_vl" and set(manifest.graphs) == {"vision", "embed", "decoder"}
    for name in ("vision", "decoder"):
        assert manifest.graphs[name].parity["max_rel"] < 1e-4, name
    assert manifest.preprocess.deepstack == {"input": "deepstack_embeds", "layers": LAYERS, "feature_dim": WIDTH}
    assert manifest.preprocess.tiling_params["position_table_side"] == 6
    vision = manifest.graphs["vision"]
    assert [t.name for t in vision.inputs] == ["pixel_values", "vision_position_ids", "vision_pos_indices",
                                               "vision_pos_weights"]  # fmt: skip
    assert vision.outputs[0].shape[-1] == (1 + LAYERS) * WIDTH
    decoder = {t.name: t.shape for t in manifest.graphs["decoder"].inputs}
    assert decoder["deepstack_embeds"] == ["batch", "seq", LAYERS, WIDTH]
    assert decoder["position_ids"][0] == 3
    with pytest.raises(ConfigError, match="no fused decoder"):
        VLM.load(bundle, decoder="fused")


def test_vision_wrapper_and_graph_equal_get_image_features(adapter, bundle, images):
    """Per image: the merger's output and each DeepStack merger's output, wrapper and graph vs transformers' packed
    ``get_image_features`` (``pooler_output``, ``deepstack_features``)."""
    processor, model = adapter.processor, adapter.model
    inputs = processor.image_processor(list(images.values()), return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        reference = [torch.cat([m, *(d[i] for d in out.deepstack_features)], dim=-1)
                     for i, m in enumerate(out.pooler_output)]  # fmt: skip
        wrapper = adapter.vision_encoder()
        for call, ref in zip(adapter.vision_inputs(inputs), reference):
            assert (wrapper(**call) - ref).abs().max() <= 1e-5
    got = VLM.load(bundle, vision_cache_mb=0)._image_features(list(images.values()))
    assert [g.shape for g in got] == [tuple(r.shape) for r in reference] == [(12, 192), (15, 192)]
    for g, ref in zip(got, reference):
        assert np.abs(g - ref.numpy()).max() / ref.abs().max() < 1e-4


# ---- DeepStack evidence --------------------------------------------------------------------------------------------
def _hf_forced_logits(adapter, image, prompt, continuation):
    processor, model = adapter.processor, adapter.model
    inputs = processor(images=[image], text=[_text(processor, _messages(prompt))], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation[:-1]])], dim=1)
    types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(continuation) - 1, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits  # fmt: skip
    return logits[0, n - 1 :].numpy()


def test_deepstack_inputs_reach_the_decoder(bundle, adapter, images, hf_greedy, monkeypatch):
    """With the DeepStack features the bundle's logits equal HF's to 1e-4; with them zeroed (the decoder input only:
    the token embeddings unchanged) the logits move far off and the greedy answer changes — so the decoder graph
    really adds them, and at the right positions."""
    from edgelvm.runtime.images import deepstack

    image, prompt = images["landscape"], PROMPTS[1]
    continuation = hf_greedy["landscape", prompt][:6]
    reference = _hf_forced_logits(adapter, image, prompt, continuation)
    vlm = VLM.load(bundle, vision_cache_mb=0)
    got = vlm.forced_logits(image, prompt, continuation)
    assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-4

    real = deepstack.DeepstackInputs._dense
    monkeypatch.setattr(deepstack.DeepstackInputs, "_dense", lambda self, *a: np.zeros_like(real(self, *a)))
    zeroed = VLM.load(bundle, vision_cache_mb=0)
    assert np.abs(zeroed.forced_logits(image, prompt, continuation) - reference).max() / np.abs(reference).max() > 1e-2
    answers = []
    for name in ("landscape", "portrait"):
        zeroed.generate(images[name], prompt, max_new_tokens=20)
        answers.append(zeroed.last_output_ids[0])
    assert answers != [hf_greedy[name, prompt] for name in ("landscape", "portrait")]


def test_decoder_module_equals_the_language_model_with_deepstack(adapter):
    """The export wrapper (dense addition of per-position features) vs ``Qwen3VLTextModel`` given the same features
    at masked positions (HF's own ``visual_pos_masks`` path), and zero features == no DeepStack at all."""
    module = adapter.decoder_module()
    lm = adapter.language_model()
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 9, WIDTH, generator=generator)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 2:6] = True
    features = torch.randn(1, 9, LAYERS, WIDTH, generator=generator) * mask[..., None, None]
    positions = torch.arange(9).expand(3, 1, 9)
    attention = torch.ones(1, 9, dtype=torch.int64)
    kv = adapter.kv_cache_spec(16, "float32")
    empty = [torch.zeros(1, kv.num_kv_heads, 0, kv.head_dim) for _ in range(2 * kv.num_layers)]
    with torch.no_grad():
        got = module(embeds, attention, positions, features, *empty)[0]
        hidden = lm(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=positions,
            visual_pos_masks=mask,
            deepstack_visual_embeds=[features[0, mask[0], i] for i in range(LAYERS)],
        ).last_hidden_state
        plain = lm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).last_hidden_state
        zero = module(embeds, attention, positions, torch.zeros_like(features), *empty)[0]
    head = adapter.lm_head()
    assert (got - head(hidden[:, -1])).abs().max() <= 1e-5
    assert (zero - head(plain[:, -1])).abs().max() <= 1e-5
    assert (got - zero).abs().max() > 1e-2
    assert not hasattr(lm, "__dict__") or "_deepstack_process" not in lm.__dict__  # the patch does not leak


# ---- generation --------------------------------------------------------------------------------------------------
def test_two_images_and_text_only_equal_hf(adapter, vlm, images):
    pair = [images["portrait"], images["landscape"]]
    vlm.generate(pair, "Compare the two images.", max_new_tokens=16)
    assert vlm.last_output_ids[0] == _hf_generate(adapter, pair, _messages("Compare the two images.", 2), 16)
    vlm.generate(None, "Read the sign.", max_new_tokens=12)
    assert vlm.last_output_ids[0] == _hf_generate(adapter, [], _messages("Read the sign.", 0), 12)


def test_left_padded_batch_equals_hf_batched_generate(adapter, vlm, images, hf_greedy):
    """Different grids and prompts (different lengths), one row text-only: HF's left-padded batch (DeepStack at each
    row's own image positions) == the runtime's batch == the single requests."""
    processor, model = adapter.processor, adapter.model
    pairs = [("landscape", PROMPTS[0]), ("portrait", PROMPTS[1]), ("portrait", PROMPTS[0])]
    inputs = processor(images=[images[n] for n, _ in pairs], text=[_text(processor, _messages(p)) for _, p in pairs],
                       return_tensors="pt", padding=True)  # fmt: skip
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    eos = set(model.generation_config.eos_token_id)
    batched = [trim_after_eos(row[inputs["input_ids"].shape[1] :].tolist(), eos) for row in out]
    assert batched == [hf_greedy[pair] for pair in pairs]
    vlm.generate_batch([(images[n], p) for n, p in pairs], max_new_tokens=20)
    assert vlm.last_output_ids == batched
    vlm.generate_batch([(images["landscape"], p) for p in PROMPTS], max_new_tokens=20)  # a shared prefix
    assert vlm.last_stats.reused_tokens >= 12
    assert vlm.last_output_ids == [hf_greedy["landscape", p] for p in PROMPTS]


def test_chat_turn_two_reuses_the_cache_and_equals_hf(adapter, vlm, images, hf_greedy):
    chat = vlm.chat(images["portrait"])
    first = chat.ask(PROMPTS[0], max_new_tokens=20)
    assert vlm.last_output_ids[0] == hf_greedy["portrait", PROMPTS[0]]
    chat.ask("And the color?", max_new_tokens=12)
    assert vlm.last_stats.reused_tokens > 15
    messages = [*_messages(PROMPTS[0]), {"role": "assistant", "content": first},
                {"role": "user", "content": [{"type": "text", "text": "And the color?"}]}]  # fmt: skip
    assert vlm.last_output_ids[0] == _hf_generate(adapter, [images["portrait"]], messages, 12)


# ---- compression stages and sizes ----------------------------------------------------------------------------------
def test_awq_scale_groups_fold_exactly(checkpoint, adapter, images):
    """Qwen3 layers (q_norm / k_norm after q_proj / k_proj): input norm → q/k/v, post-attention norm → gate/up,
    up → down absorb arbitrary per-channel scales without changing the output."""
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


def test_language_model_head_and_mlp_pruning_reloads_exports_and_equals_hf(checkpoint, images, tmp_path):
    """Qwen3 text configs carry ``head_dim``, so whole text heads (q_norm / k_norm act per head) and MLP neurons are
    cut; the result reloads, exports (DeepStack kept) and its greedy tokens equal HF's on the pruned model."""
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from edgelvm.prune import PruneConfig, prune

    config = PruneConfig(out=tmp_path / "pruned", text_heads=0.5, text_mlp=0.25, importance="magnitude",
                         progress=False)  # fmt: skip
    report = prune(str(checkpoint), None, config)
    assert {layer["heads"] for layer in report.kept["text"]} == {2}
    pruned = load_model(str(tmp_path / "pruned"))
    result = export(pruned, tmp_path / "bundle", ExportConfig(max_length=256))
    assert result.manifest.preprocess.deepstack["layers"] == LAYERS
    vlm = VLM.load(result.bundle_dir)
    vlm.generate(images["landscape"], PROMPTS[0], max_new_tokens=12)
    assert vlm.last_output_ids[0] == _hf_generate(pruned, [images["landscape"]], _messages(PROMPTS[0]), 12)


def test_prune_and_distill_refusals_name_the_real_reason(checkpoint, adapter, tmp_path):
    from edgelvm.distill.student import StudentSpec, derive_config
    from edgelvm.prune import PruneConfig, prune

    reasons = {"vision_heads": "vision blocks have one fused qkv", "vision_mlp": "packed as \\[patches, dim\\]"}
    for option, reason in reasons.items():
        config = PruneConfig(out=tmp_path / option, importance="magnitude", progress=False, **{option: 0.25})
        with pytest.raises(UnsupportedModelError, match=reason) as info:
            prune(str(checkpoint), None, config)
        assert "pruning Qwen3-VL's" in info.value.problem, option
        assert not (tmp_path / option).exists()
    with pytest.raises(UnsupportedModelError, match="derived Qwen3-VL students"):
        derive_config(adapter, StudentSpec(text_layers=1))


def test_config_parameter_counts_equal_the_model(adapter):
    from edgelvm.models.base import VLMAdapter

    config_only = type(adapter).for_config(adapter.config)
    assert config_only.config_parameter_counts() == VLMAdapter.config_parameter_counts(config_only)
    assert config_only.config_parameter_counts() == adapter.parameter_counts()


def test_a_tower_without_deepstack_gives_plain_features_and_decoder(adapter):
    """What a Qwen3.5-style subclass gets (``deepstack = False``): the same wrapper, rule and positions, token
    embeddings only from the vision graph, the standard decoder module and no ``preprocess.deepstack``."""
    from edgelvm.models.export_wrappers import DecoderForExport

    class NoDeepstack(type(adapter)):
        deepstack = False

    plain = NoDeepstack(adapter.model, adapter.processor, adapter.source)
    assert plain.deepstack_layers() == [] and plain.decoder_example_inputs(1, 2, torch.float32) == {}
    assert type(plain.decoder_module()) is DecoderForExport
    spec = plain.preprocess_spec()
    assert spec.deepstack is None and spec.tiling_params["position_table_side"] == 6
    with torch.no_grad():
        call = plain.example_vision_inputs(2)
        assert plain.vision_encoder()(**call).shape[-1] == WIDTH
        assert torch.equal(plain.vision_encoder()(**call), adapter.vision_encoder()(**call)[:, :WIDTH])

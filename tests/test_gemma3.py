"""Gemma 3 (``gemma3``): SigLIP → average-pooled soft tokens → Gemma3 text model (sliding-window and global layers),
bidirectional attention among each image's tokens; what only Gemma 3 adds beyond the shared scenarios of
``test_families.py`` (its row there: ``gemma3``).

Reference: transformers' ``Gemma3Processor`` with ``Gemma3ImageProcessorPil`` prompted through
``apply_chat_template`` (as the model card does; its ``token_type_ids`` make the image blocks bidirectional) and
``Gemma3ForConditionalGeneration.generate``.
"""

from __future__ import annotations

import dataclasses
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


def test_a_context_within_the_window_keeps_plain_caches_and_filling_it_matches_hf(images, tmp_path):
    """Up to the sliding window nothing is hidden: a bundle at exactly the window (here 64 tokens, a global layer
    first, the LM head tied to the table as in the google checkpoints) keeps full-length caches for every layer (no
    ``kv_cache.windows``: it reads in runtimes older than the field) and answers like HF with the context full."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from tests.fixtures.reference import hf_generate

    checkpoint = build_tiny_gemma3(tmp_path / "ckpt", sliding_window=64, tie_word_embeddings=True, seed=3,
                                   layer_types=("full_attention", "sliding_attention"))  # fmt: skip
    adapter = load_model(str(checkpoint))
    assert adapter.kv_cache_spec(65, "float32").windows == [None, 64]
    vlm = VLM.load(export(adapter, tmp_path / "bundle", ExportConfig(max_length=64)).bundle_dir)
    assert vlm.manifest.kv_cache.windows is None and "windows" not in vlm.manifest.to_dict()["kv_cache"]
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    prompt_tokens = len(vlm.prompt_ids(Request(prompt=PROMPTS[0], images=[images["landscape"]])))
    new_tokens = 64 - prompt_tokens
    expected = hf_generate(gemma3_inputs, processor, model, [images["landscape"]], PROMPTS[0], new_tokens)
    vlm.generate(images["landscape"], PROMPTS[0], max_new_tokens=new_tokens)
    assert vlm.last_output_ids[0] == expected and len(expected) == new_tokens  # the context filled to the window


# ---- past the sliding window: window-sized caches for the local layers ------------------------------------------
WINDOW = 12  # the windowed checkpoint's local layers (two of three); an image block (16 tokens) is longer


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A checkpoint whose local layers see 12 positions, its bundle at 160 tokens, and transformers' model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model

    root = tmp_path_factory.mktemp("gemma3_window")
    checkpoint = build_tiny_gemma3(root / "ckpt", sliding_window=WINDOW, seed=3)
    bundle = export(load_model(str(checkpoint)), root / "bundle", ExportConfig(max_length=160)).bundle_dir
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    return VLM.load(bundle), processor, model


def test_local_layers_keep_window_minus_one_positions_and_answer_like_hf(windowed, images):
    """The bundle says which layers are local (``kv_cache.windows``) and its decoder takes their key positions;
    after a prompt the local caches hold the last ``window - 1`` positions (the global one all of them), and stay
    that size while decoding. The next-token logits equal HF's, and are far from what full-length local attention
    gives (HF with the window widened): the window is what is reproduced. 40 greedy tokens after a prompt of four
    windows = HF's."""
    from tests.fixtures.reference import hf_generate

    vlm, processor, model = windowed
    kv = vlm.manifest.kv_cache
    assert kv.windows == [WINDOW, WINDOW, None] and vlm.manifest.to_dict()["kv_cache"]["windows"] == kv.windows
    assert "window_positions" in [spec.name for spec in vlm.manifest.graphs["decoder"].inputs]
    image, prompt = images["landscape"], "Describe the image in one sentence, then the table."
    ids = vlm.prompt_ids(Request(prompt=prompt, images=[image]))
    row = vlm._embed(ids, vlm._image_features([image]))
    cache = vlm.backend.new_cache(1)
    blocks = {"image_blocks": image_blocks(ids, vlm.manifest.preprocess.image_token_id)[None]}
    got = vlm.backend.step([row], cache, blocks)[0]
    assert [cache.past(i).shape[2] for i in range(6)] == [WINDOW - 1] * 4 + [len(ids)] * 2
    np.testing.assert_array_equal(cache.windows.positions, [np.arange(len(ids) - WINDOW + 1, len(ids))])
    for _ in range(3):
        vlm.backend.step([row[:1]], cache, {"image_blocks": np.zeros((1, 1), np.int64)})
    assert cache.past(0).shape[2] == WINDOW - 1 and cache.past(4).shape[2] == len(ids) + 3
    inputs = gemma3_inputs(processor, [image], prompt)
    with torch.no_grad():
        reference = model(**inputs).logits[0, -1].numpy()
        text = model.config.text_config
        text.sliding_window = 10**6
        try:
            full = model(**inputs).logits[0, -1].numpy()
        finally:
            text.sliding_window = WINDOW
    scale = float(np.abs(reference).max())
    assert float(np.abs(got - reference).max()) < 1e-4 * scale
    assert float(np.abs(full - reference).max()) > 1e-2 * scale
    expected = hf_generate(gemma3_inputs, processor, model, [image], prompt, 40)
    vlm.generate(image, prompt, max_new_tokens=40)
    assert vlm.last_output_ids[0] == expected and len(expected) > 3 * WINDOW


def test_padded_batches_and_shared_prefixes_past_the_window_equal_hf(windowed, images):
    """A left-padded batch of different lengths, and requests sharing their image whose suffixes differ in length
    (a padding gap after the shared prefix, and the short row's suffix shorter than the window: each row keeps its
    own last positions, across the gap), equal HF's batched greedy ``generate`` over 24 tokens."""
    vlm, processor, model = windowed
    requests = [
        ([images["landscape"]], PROMPTS[0]),
        ([images["portrait"]], "caption"),
        ([images["rgba"]], "What is on the chair today, and why is it there?"),
    ]
    expected = _hf_batch(processor, model, requests, new_tokens=24)
    vlm.generate_batch([Request(messages=_messages(i, p, False), images=i) for i, p in requests], max_new_tokens=24)
    assert vlm.last_output_ids == expected
    same = [([images["portrait"]], "a"), ([images["portrait"]], "What is on the chair today, and why is it there?")]
    expected = _hf_batch(processor, model, same, new_tokens=24)
    vlm.generate_batch([(i[0], p) for i, p in same], max_new_tokens=24)
    assert vlm.last_output_ids == expected
    assert vlm.last_stats.reused_tokens > TOKENS  # the shared image was prefilled once


def test_a_chat_turn_past_the_window_rewinds_to_the_last_prompt_and_equals_hf(windowed, images):
    """Turn 2 re-renders turn 1's answer: the local layers, which no longer hold turn 1's early positions, rewind
    to the end of turn 1's prompt (saved there), so turn 1's prompt is reused and turn 2's answer equals HF
    ``generate`` over the whole conversation."""
    vlm, processor, model = windowed
    image = images["portrait"]
    chat = vlm.chat(image)
    first = chat.ask(PROMPTS[0], max_new_tokens=20)
    prompt_tokens = vlm.last_stats.prompt_tokens
    chat.ask("And the color?", max_new_tokens=20)
    assert vlm.last_stats.reused_tokens >= prompt_tokens > WINDOW
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPTS[0]}]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "text", "text": "And the color?"}]},
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    expected = trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), eos_ids(model, processor.tokenizer))
    assert vlm.last_output_ids[0] == expected


def test_sliding_window_cache_keeps_each_rows_last_positions_and_rewinds_where_it_can():
    """The runtime cache alone (numpy; a fake decoder that writes each column's position into its keys): rows with
    padding gaps keep their own last ``window - 1`` positions; a crop works anywhere while nothing was dropped, and
    past that only to the end of the latest prompt (its saved copy) or to 0."""
    from edgelvm.manifest import KVCacheSpec
    from edgelvm.runtime.kv_cache import PingPongCache

    spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=2, dtype="float32", max_length=64, windows=[4, None])
    cache = PingPongCache(spec, 2, np.float32)

    def step(lengths: list[int]) -> None:
        rows = [np.zeros((n, 1), np.float32) for n in lengths]
        _, mask, _ = cache.pad.pack(rows, np.float32)
        positions = cache.window_positions(mask)
        seq = max(lengths)
        for index in range(4):
            past, present = cache.past(index), cache.target(index, cache.length + seq)
            present[:, :, : past.shape[2]] = past
            present[:, :, past.shape[2] :] = positions[:, -seq:, None][:, None]
        cache.advance(cache.length + seq)

    def held(row: int) -> list[int]:
        keys = cache.past(0)[row, 0, :, 0]
        assert (keys == np.where(cache.windows.positions[row] >= 0, cache.windows.positions[row], keys)).all()
        return [int(p) for p in cache.windows.positions[row] if p >= 0]

    step([2, 2])
    assert cache.windows.complete and held(0) == [0, 1] and cache.rewind_point(1) == 1
    step([6, 1])  # row 1: a gap of 5 padded columns after its 2 positions
    assert held(0) == [5, 6, 7] and held(1) == [0, 1, 2] and cache.past(0).shape[2] == 3
    assert not cache.windows.complete and cache.rewind_point(7) == 0  # row 0's positions 0-4 are gone
    step([1, 1])
    assert held(0) == [6, 7, 8] and held(1) == [1, 2, 3] and cache.rewind_point(8) == 8
    cache.crop(8)  # back to the end of the [6, 1] step, from its saved copy
    assert cache.length == 8 and held(0) == [5, 6, 7] and held(1) == [0, 1, 2]
    with pytest.raises(BackendError, match="rewind_point"):
        cache.crop(6)
    cache.crop(0)
    step([3, 1])
    assert cache.windows.complete and held(0) == [0, 1, 2] and held(1) == [0]
    cache.crop(2)  # nothing dropped yet: any length
    assert held(0) == [0, 1] and held(1) == [] and cache.length == 2


def test_pan_and_scan_checkpoints_are_refused_at_load(tmp_path):
    from edgelvm.models import load_model

    checkpoint = build_tiny_gemma3(tmp_path / "pas", pan_and_scan=True)
    with pytest.raises(UnsupportedModelError, match="pan-and-scan") as err:
        load_model(str(checkpoint))
    assert "do_pan_and_scan" in err.value.fix


def test_plan_counts_a_4b_class_config_with_window_sized_local_caches(tmp_path):
    """google/gemma-3-4b-it's shape (config.json as published, sparse; defaults fill the rest): the config-only
    arithmetic equals the modules transformers builds on ``meta``; the plain-data reading equals transformers'
    config classes; past the 1024-token window the export's KV geometry has window-sized local caches, and the fit
    check counts the 29 local layers at 1024 positions and the 5 global ones per token (by hand below)."""
    from edgelvm.devices.profiles import load_profile
    from edgelvm.models.base import VLMAdapter
    from edgelvm.models.config_json import PlainConfig
    from edgelvm.models.registry import adapter_for_model_type, load_config
    from edgelvm.plan import footprint_of_adapter, plan_config, plan_model

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
    assert adapter.kv_cache_spec(1024, "float16").windows is None  # within the window: plain caches
    local = [i for i in range(34) if (i + 1) % 6]  # Gemma 3's pattern: every 6th layer global
    for either in (adapter, plain_adapter):
        spec = either.kv_cache_spec(32768, "float16")
        assert spec.windows == [1024 if i in local else None for i in range(34)] and spec.window == 1024
    footprint = footprint_of_adapter(plain_adapter, from_config=True)
    assert (footprint.kv_layers, footprint.window_layers, footprint.window) == (34, 29, 1024)
    assert (footprint.kv_heads, footprint.head_dim) == (4, 256)
    per_layer = 2 * 4 * 256 * 2  # key + value, 4 KV heads x 256, fp16: 4096 bytes per position and layer
    profile = load_profile("jetson-orin-nano-8gb")
    for length in (4096, 32768):
        plan = plan_model(footprint, [profile], precision="int4", max_length=length).rows[0].plan
        budget = plan.budget
        assert budget[f"KV cache, global layers ({length} tok × 1 × 2 buf)"] == 5 * per_layer * length * 2
        assert budget["KV cache, sliding-window layers (1024 tok × 1 × 2 buf)"] == 29 * per_layer * 1024 * 2
    # 4096 tokens: 160 MiB + 232 MiB, against 1088 MiB if every layer kept the whole context
    assert 5 * per_layer * 4096 * 2 == 160 * 2**20 and 29 * per_layer * 1024 * 2 == 232 * 2**20
    row = plan_model(footprint, [profile], precision="int4", max_length=32768).rows[0]
    assert row.plan.fits and row.longest_context >= 32768  # an 8 GB Orin holds 32k tokens of an INT4 4B...
    full = dataclasses.replace(footprint, window_layers=0, window=0)
    assert not plan_model(full, [profile], precision="int4", max_length=32768).rows[0].plan.fits  # ...not 34 full


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

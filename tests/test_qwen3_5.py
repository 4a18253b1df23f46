"""Qwen3.5 (``qwen3_5``): a hybrid language model (Gated DeltaNet layers between gated attention layers) behind
Qwen3-VL's tower without DeepStack — the bundle's state beyond the KV cache, on a tiny random checkpoint
(``tests/fixtures/qwen3_5.py``).

The shared scenarios (greedy == HF ``generate``, a padded batch of different prompt lengths, chat, torch-free,
INT4 RTN + INT8 vision, the prune refusal) run on its ``FAMILIES`` row in ``tests/test_families.py``. This file holds
what the hybrid state adds: the manifest's description, evidence that the states carry the sequence, chat turns that
prefill only their new tokens, prefix sharing without a padding gap, the fit check's arithmetic and the refusals.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import ManifestError, UnsupportedModelError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

FAMILY = "qwen3_5"
PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
#: the tiny checkpoint: layers 0 and 2 linear (2 key heads x 16, 4 value heads x 16, kernel 4), 1 and 3 attention
CONV_DIM = 2 * 2 * 16 + 4 * 16


@pytest.fixture(scope="module")
def images(artifacts):
    return artifacts.images(FAMILY)


@pytest.fixture(scope="module")
def bundle(artifacts):
    return artifacts.bundle(FAMILY)


@pytest.fixture(scope="module")
def adapter(artifacts):
    from edgelvm.models import load_model

    return load_model(str(artifacts.checkpoint(FAMILY)))


@pytest.fixture(scope="module")
def vlm(bundle):
    return VLM.load(bundle)


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def _hf_generate(adapter, images, messages, max_new_tokens: int) -> list[int]:
    processor, model = adapter.processor, adapter.model
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[text], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return trim_after_eos(ids[0, inputs["input_ids"].shape[1] :].tolist(), set(model.generation_config.eos_token_id))


# ---- the bundle describes the hybrid cache as data ------------------------------------------------------------------
def test_manifest_describes_attention_layers_and_fixed_size_states(bundle):
    manifest = Manifest.load(bundle)
    kv = manifest.kv_cache
    assert (kv.num_layers, kv.kv_layers) == (2, [1, 3])
    assert [(s.layer, s.kind, s.shape, s.dtype) for s in kv.states] == [
        (0, "conv", [CONV_DIM, 3], "float32"), (0, "recurrent", [4, 16, 16], "float32"),
        (2, "conv", [CONV_DIM, 3], "float32"), (2, "recurrent", [4, 16, 16], "float32"),
    ]  # fmt: skip
    inputs = [t.name for t in manifest.graphs["decoder"].inputs]
    assert inputs[3:] == [*kv.io_names()[0], "logits_keep"] and "past_key_values.0.conv" in inputs
    assert "past_key_values.0.key" not in inputs  # linear layers have no keys and values
    assert set(manifest.graphs) == {"vision", "embed", "decoder"}  # the fused decoder is Llama-family only
    assert kv.state_bytes(batch=1) == 2 * (CONV_DIM * 3 + 4 * 16 * 16) * 4


def test_a_state_of_an_unknown_kind_is_refused_naming_the_field(bundle, tmp_path):
    data = json.loads((bundle / "edgelvm.json").read_text())
    data["kv_cache"]["states"][1]["kind"] = "ssm"
    with pytest.raises(ManifestError, match=r"kv_cache\.states\[1\]\.kind"):
        Manifest.from_dict(data)


def test_the_states_carry_the_sequence(bundle, vlm, images):
    """The decode step's logits depend on the states the prefill left: zeroing them changes the next token's
    logits, carrying them reproduces one prefill over the whole sequence."""
    import onnxruntime as ort

    manifest = Manifest.load(bundle)
    session = ort.InferenceSession(str(bundle / manifest.graphs["decoder"].file))
    past, _ = manifest.kv_cache.io_names()
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 9, 64)).astype(np.float32)
    mask = np.ones((1, 9), np.int64)
    positions = np.broadcast_to(np.arange(9), (3, 1, 9)).astype(np.int64)

    def run(start, stop, cache):
        feeds = {"inputs_embeds": embeds[:, start:stop], "attention_mask": mask[:, :stop],
                 "position_ids": np.ascontiguousarray(positions[:, :, start:stop]),
                 **dict(zip(past, cache))}  # fmt: skip
        out = session.run(None, feeds)
        return out[0], out[1:]

    empty = [np.zeros((1, 2, 0, 16), np.float32)] * 4 + [np.zeros((1, *s.shape), np.float32)
                                                          for s in manifest.kv_cache.states]  # fmt: skip
    whole, _ = run(0, 9, empty)
    _, cache = run(0, 8, empty)
    carried, _ = run(8, 9, cache)
    zeroed, _ = run(8, 9, [*cache[:4], *(np.zeros_like(s) for s in cache[4:])])
    assert np.abs(carried - whole).max() < 1e-4
    assert np.abs(zeroed - whole).max() > 1e-2


# ---- chat turns and batches ----------------------------------------------------------------------------------------
def test_a_chat_turn_prefills_only_its_new_tokens_and_equals_hf(adapter, vlm, images):
    """Turn 2 re-renders the conversation; its answer tokens need not re-tokenize as generated, so the states
    rewind to the end of turn 1's prompt (saved after its prefill) — the image is not fed again."""
    chat = vlm.chat(images["portrait"])
    first = chat.ask(PROMPTS[0], max_new_tokens=12)
    first_prompt = vlm.last_stats.prompt_tokens
    chat.ask("And the color?", max_new_tokens=8)
    stats = vlm.last_stats
    assert stats.reused_tokens >= first_prompt
    assert stats.prefill_tokens == stats.prompt_tokens - stats.reused_tokens
    messages = [*_messages(PROMPTS[0]), {"role": "assistant", "content": first},
                {"role": "user", "content": [{"type": "text", "text": "And the color?"}]}]  # fmt: skip
    assert vlm.last_output_ids[0] == _hf_generate(adapter, [images["portrait"]], messages, 8)


def test_a_hybrid_cache_rewinds_only_to_its_last_prompt_end():
    """Keys and values crop anywhere; states rewind only to the copy saved after the latest multi-token step (a
    prefill), or to zero — anything else would silently keep positions the states already absorbed."""
    from edgelvm.errors import BackendError
    from edgelvm.manifest import KVCacheSpec, StateSpec
    from edgelvm.runtime.kv_cache import PingPongCache

    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32", max_length=16, layers=[1],
                       states=[StateSpec(layer=0, kind="recurrent", shape=[2], dtype="float32")])  # fmt: skip
    cache = PingPongCache(spec, batch=1, dtype=np.float32)

    def step(seq: int, state: float) -> None:  # what a decoder step does: write the present, then advance
        cache.target(0, cache.length + seq)[...] = 1.0
        cache.target(1, cache.length + seq)[...] = 1.0
        cache.target(2, cache.length + seq)[...] = state
        cache.advance(cache.length + seq)

    step(5, 5.0)  # a prompt: saved
    step(1, 6.0)
    step(1, 7.0)
    assert (cache.rewind_point(7), cache.rewind_point(6), cache.rewind_point(4)) == (7, 5, 0)
    with pytest.raises(BackendError, match="saved only at 5"):
        cache.crop(6)
    cache.crop(5)
    assert cache.length == 5 and cache.past(2).tolist() == [[5.0, 5.0]]
    cache.crop(0)
    assert cache.past(2).tolist() == [[0.0, 0.0]]


def test_shared_prefix_batches_fork_only_without_a_padding_gap(vlm, images):
    """One image, several questions: rows of equal length share the image's prefill; rows of different lengths
    (padding would sit between the prefix and the shorter row's own tokens, inside the states) are prefilled whole —
    both equal single requests."""
    image, same_length = images["landscape"], ("What is on the table?", "Who is on the table?")
    singles, lengths = [], []
    for prompt in (*same_length, PROMPTS[1]):
        vlm.generate(image, prompt, max_new_tokens=8)
        singles.append(vlm.last_output_ids[0])
        lengths.append(vlm.last_stats.prompt_tokens)
    assert lengths[0] == lengths[1] != lengths[2]
    vlm.generate_batch([(image, prompt) for prompt in same_length], max_new_tokens=8)
    assert vlm.last_output_ids == singles[:2]
    assert vlm.last_stats.reused_tokens > 0
    vlm.generate_batch([(image, same_length[0]), (image, PROMPTS[1])], max_new_tokens=8)
    assert vlm.last_output_ids == [singles[0], singles[2]]
    assert vlm.last_stats.reused_tokens == 0


# ---- the fit check -------------------------------------------------------------------------------------------------
QWEN3_5_2B = {  # Qwen/Qwen3.5-2B config.json (text and vision sizes)
    "model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"], "tie_word_embeddings": True,
    "image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
    "vision_end_token_id": 248054,
    "text_config": {
        "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "max_position_embeddings": 262144, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "mrope_section": [11, 11, 10],
                            "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    },
    "vision_config": {
        "model_type": "qwen3_5_vision", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
        "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
    },
}  # fmt: skip


def test_the_fit_check_counts_a_2b_hybrid_by_hand(tmp_path):
    """Qwen3.5-2B at 4096 tokens, fp16: KV only in its 6 attention layers — 2 (k, v) x 6 x 2 KV heads x 256 x 2 B =
    12,288 B per token; each of its 18 linear layers holds a conv state (6144 channels x 3 x 2 B = 36,864 B) and a
    recurrent state (16 x 128 x 128 x 4 B = 1,048,576 B) whatever the length: 19,537,920 B per sequence. With the
    plan's two buffers: 100,663,296 B of KV and 39,075,840 B of states (an all-attention 24-layer model: 402,653,184 B
    of KV)."""
    from edgelvm.devices.profiles import load_profile
    from edgelvm.plan import footprint_from_config, plan_model

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_5_2B))
    footprint = footprint_from_config(tmp_path)
    assert (footprint.kv_layers, footprint.kv_heads, footprint.head_dim) == (6, 2, 256)
    assert footprint.kv_bytes_per_token("float16") == 12_288
    assert footprint.state_bytes == 18 * (6144 * 3 * 2 + 16 * 128 * 128 * 4) == 19_537_920
    orin = load_profile("jetson-orin-nano-8gb")
    for length in (4096, 16384):
        plan = plan_model(footprint, [orin], precision="int4", max_length=length).rows[0].plan
        budget = dict(plan.budget)
        kv = next(v for k, v in budget.items() if k.startswith("KV cache"))
        states = next(v for k, v in budget.items() if k.startswith("decoder states"))
        assert kv == 12_288 * length * 2
        assert states == 19_537_920 * 2  # constant in length
    assert 12_288 * 4096 * 2 == 100_663_296


# ---- refusals ------------------------------------------------------------------------------------------------------
def test_tensorrt_refuses_a_hybrid_bundle_before_touching_the_gpu(bundle):
    from edgelvm.build.tensorrt_builder import build_engines

    with pytest.raises(UnsupportedModelError, match="hybrid decoder"):
        build_engines(bundle)


def test_awq_is_refused_with_the_methods_that_work(artifacts, tmp_path):
    from edgelvm.data import write_split
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.quantize import AWQConfig, quantize

    write_split(tmp_path / "calib", seed=5, n=2, image_size=96)
    with pytest.raises(UnsupportedModelError, match="rtn"):
        quantize(str(artifacts.checkpoint(FAMILY)), load_jsonl_dataset(tmp_path / "calib"), [AWQConfig()],
                 out=tmp_path / "q")  # fmt: skip

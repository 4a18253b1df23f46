"""The decoder returns the logits of each row's last K positions of a step on request (``Backend.step(..., last=K)``,
the decoder graph's ``logits_keep`` input, the fused decoder's flat ``logits_index``): what speculative decoding
verifies K drafted tokens with. K positions fed in one step must give the logits of feeding them one at a time, and
HF's for those positions; ``last=1`` is the ``[B, vocab]`` of before; a bundle exported before ``logits_keep`` still
runs and refuses ``last > 1`` by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import BackendError  # noqa: E402
from edgelvm.manifest import LOGITS_KEEP, Manifest  # noqa: E402
from edgelvm.runtime import VLM  # noqa: E402
from edgelvm.runtime.embeddings import EmbeddingTable  # noqa: E402

LLAVA = "llava-llama-clip"  # the session's shared tiny LLaVA (Llama + CLIP): portable and fused decoders
PROMPT, K = 11, 4


def _ids(manifest: Manifest, count: int, seed: int) -> np.ndarray:
    """Random text token ids (never the image token: HF would look for an image)."""
    vocab = int(manifest.graphs["decoder"].outputs[0].shape[-1])
    ids = np.random.default_rng(seed).integers(3, vocab, size=count)
    return np.where(ids == manifest.preprocess.image_token_id, 5, ids)


def _embeds(vlm: VLM, bundle, ids: np.ndarray) -> np.ndarray:
    return EmbeddingTable(bundle, vlm.manifest.graphs["embed"]).rows(ids, vlm.backend.embed_dtype)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _together_and_one_by_one(vlm, bundle, ids, prompt, k, extra=lambda seq: {}):
    """After a ``prompt``-token prefill, ``(the logits of the step's last k positions when the rest of ids is fed
    in one step with last=k [k, vocab], the logits of those positions when fed one token per step)``;
    ``extra(seq)``: the family's further decoder inputs for a step of ``seq`` tokens."""
    backend, embeds = vlm.backend, _embeds(vlm, bundle, ids)
    cache = backend.new_cache(1)
    backend.step([embeds[:prompt]], cache, extra(prompt))
    together = backend.step([embeds[prompt:]], cache, extra(len(ids) - prompt), last=k)
    assert together.shape[:2] == (1, k)
    cache = backend.new_cache(1)
    backend.step([embeds[:prompt]], cache, extra(prompt))
    single = [backend.step([embeds[i : i + 1]], cache, extra(1)) for i in range(prompt, len(ids))]
    assert all(s.shape == (1, together.shape[-1]) for s in single)  # last=1: [B, vocab], as before
    return together[0], np.concatenate(single[-k:])


@pytest.fixture(scope="module")
def llava(artifacts):
    return artifacts.bundle(LLAVA)


@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_k_tokens_in_one_step_equal_one_at_a_time_and_hf(artifacts, llava, decoder):
    """After a prompt, 4 tokens in one step with last=4 (the fused decoder: a multi-token step after cached tokens,
    run row by row) give the logits of feeding them one at a time, and HF's at those positions."""
    vlm = VLM.load(llava, decoder=decoder, vision_cache_mb=0)
    assert vlm.backend.fused == (decoder == "fused")
    assert vlm.backend.max_last_logits == vlm.manifest.kv_cache.max_length
    ids = _ids(vlm.manifest, PROMPT + K, seed=1)
    together, single = _together_and_one_by_one(vlm, llava, ids, PROMPT, K)
    assert _rel(together, single) < 1e-4
    _, model = artifacts.hf(LLAVA)
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(ids)[None]).logits[0, PROMPT : PROMPT + K].numpy()
    assert _rel(together, hf) < 1e-4
    assert np.abs(np.diff(together, axis=0)).max() > 1e-2  # four different positions, not one repeated


@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_a_padded_batch_gives_each_row_its_own_last_positions(llava, decoder):
    """Two rows of different lengths (left padding in the portable graph, right padding in the fused one) as a first
    prompt and then a 3-token step after the cache: last=3 gives each row's own last 3 positions — those of the row
    run alone — and last=1 the last of them as ``[B, vocab]``. More positions than a row feeds are refused."""
    vlm = VLM.load(llava, decoder=decoder, vision_cache_mb=0)
    backend = vlm.backend
    ids = [_ids(vlm.manifest, n, seed=n) for n in (12, 8)]
    rows = [_embeds(vlm, llava, i) for i in ids]
    prompts, steps = [r[:-3] for r in rows], [r[-3:] for r in rows]
    batch = backend.new_cache(2)
    first = backend.step(prompts, batch, last=3)
    after = backend.step(steps, batch, last=3)
    vocab = first.shape[-1]
    assert first.shape == after.shape == (2, 3, vocab)
    for r in range(2):
        alone = backend.new_cache(1)
        assert _rel(first[r], backend.step([prompts[r]], alone, last=3)[0]) < 1e-4
        assert _rel(after[r], backend.step([steps[r]], alone, last=3)[0]) < 1e-4
    plain = backend.new_cache(2)
    last_only = backend.step(prompts, plain)
    assert last_only.shape == (2, vocab) and _rel(last_only, first[:, -1]) < 1e-4
    with pytest.raises(BackendError, match=r"more positions than the step feeds \(1 tokens"):
        backend.step([r[:1] for r in steps], plain, last=2)
    with pytest.raises(BackendError, match="positive int"):
        backend.step([r[:1] for r in steps], plain, last=0)


def test_hybrid_decoder_lfm2_vl_k_step(tmp_path_factory):
    """LFM2 (short-convolution states besides the KV cache): a 4-token step's last 3 logits equal those of feeding
    the tokens one per step."""
    from edgelvm.export import ExportConfig, export
    from tests.fixtures.lfm2_vl import build_tiny_lfm2_vl

    root = tmp_path_factory.mktemp("lfm2_keep")
    bundle = export(build_tiny_lfm2_vl(root / "ckpt"), root / "b", ExportConfig(max_length=64)).bundle_dir
    vlm = VLM.load(bundle, vision_cache_mb=0)
    assert vlm.manifest.kv_cache.states and LOGITS_KEEP in [t.name for t in vlm.manifest.graphs["decoder"].inputs]
    together, single = _together_and_one_by_one(vlm, bundle, _ids(vlm.manifest, 13, seed=2), 9, 3)  # 4 fed
    assert _rel(together, single) < 1e-4


def test_gemma3_windowed_k_step_equals_one_at_a_time_and_hf(tmp_path_factory):
    """Gemma 3's own decoder module (image blocks, window-sized local caches past an 8-token window): a 4-token step
    after a prompt longer than the window, its last 3 logits equal one token per step, and HF's logits."""
    from transformers import AutoModelForImageTextToText

    from edgelvm.export import ExportConfig, export
    from tests.fixtures.gemma3 import build_tiny_gemma3

    root = tmp_path_factory.mktemp("gemma3_keep")
    checkpoint = build_tiny_gemma3(root / "ckpt", sliding_window=8, seed=3)
    bundle = export(checkpoint, root / "b", ExportConfig(max_length=48)).bundle_dir
    vlm = VLM.load(bundle, vision_cache_mb=0)
    assert vlm.manifest.kv_cache.windows  # the local layers keep window-sized caches
    ids = _ids(vlm.manifest, 18, seed=3)
    text = lambda seq: {"image_blocks": np.zeros((1, seq), np.int64)}  # noqa: E731  text tokens: no image block
    together, single = _together_and_one_by_one(vlm, bundle, ids, 14, 3, text)  # 4 fed, the last 3 kept
    assert _rel(together, single) < 1e-4
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(ids)[None]).logits[0, 15:18].numpy()
    assert _rel(together, hf) < 1e-4


def test_a_bundle_exported_before_logits_keep_runs_last_1_and_refuses_more(llava, copy_bundle):
    """An older portable decoder: no ``logits_keep`` input (here: the input replaced by a constant of one element,
    and the manifest without it). It loads, steps and generates as before; ``last=2`` is refused by name."""
    import onnx
    from onnx import helper, numpy_helper

    bundle = copy_bundle(llava)
    path = bundle / "decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    graph.input.remove(next(v for v in graph.input if v.name == LOGITS_KEEP))
    graph.initializer.remove(next(t for t in graph.initializer if t.name == LOGITS_KEEP))
    graph.node.insert(0, helper.make_node("Constant", [], [LOGITS_KEEP],
                                          value=numpy_helper.from_array(np.zeros(1, np.int64))))  # fmt: skip
    onnx.save(model, str(path))
    data = json.loads((bundle / "edgelvm.json").read_text())
    decoder = data["graphs"]["decoder"]
    decoder["inputs"] = [t for t in decoder["inputs"] if t["name"] != LOGITS_KEEP]
    decoder["outputs"][0]["shape"] = ["batch", decoder["outputs"][0]["shape"][-1]]
    (bundle / "edgelvm.json").write_text(json.dumps(data))

    old = VLM.load(bundle, decoder="portable", verify=False, vision_cache_mb=0)
    new = VLM.load(llava, decoder="portable", vision_cache_mb=0)
    assert old.backend.max_last_logits == 1
    ids = _ids(new.manifest, 9, seed=4)
    embeds = _embeds(new, llava, ids)
    got = old.backend.step([embeds], old.backend.new_cache(1))
    assert got.shape == (1, new.manifest.graphs["decoder"].outputs[0].shape[-1])
    assert _rel(got, new.backend.step([embeds], new.backend.new_cache(1))) < 1e-5
    with pytest.raises(BackendError, match=f"no {LOGITS_KEEP} input") as info:
        old.backend.step([embeds], old.backend.new_cache(1), last=2)
    assert info.value.fix == "re-export the bundle with this edgelvm"
    assert old.generate(None, "What is on the table?", max_new_tokens=6) == new.generate(
        None, "What is on the table?", max_new_tokens=6
    )


def test_a_caller_that_does_not_feed_logits_keep_gets_the_last_logits(llava):
    """The graph's ``logits_keep`` has a one-element default: a session fed without it (an older runtime, a script)
    returns ``[B, vocab]``, the last position's logits; fed ``[K]``, the last K positions, row-major."""
    import onnxruntime as ort

    manifest = Manifest.load(llava)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns that an input with a default is not constant-folded
    session = ort.InferenceSession(str(llava / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    kv = manifest.kv_cache
    past, _ = kv.io_names()
    rng = np.random.default_rng(0)
    hidden = manifest.graphs["decoder"].inputs[0].shape[-1]
    feeds = {"inputs_embeds": rng.standard_normal((2, 5, hidden)).astype(np.float32),
             "attention_mask": np.ones((2, 5), np.int64), "position_ids": np.tile(np.arange(5), (2, 1)),
             **{n: np.zeros((2, kv.num_kv_heads, 0, kv.head_dim), np.float32) for n in past}}  # fmt: skip
    default = session.run(["logits"], feeds)[0]
    kept = session.run(["logits"], {**feeds, LOGITS_KEEP: np.zeros(3, np.int64)})[0]
    assert default.shape == (2, kept.shape[-1]) and kept.shape[0] == 2 * 3
    assert np.abs(kept.reshape(2, 3, -1)[:, -1] - default).max() < 1e-5


def test_tensorrt_profiles_give_logits_keep_one_position(llava):
    """``edgelvm build`` and ORT's TensorRT provider profile ``logits_keep`` at one element (the engines return each
    row's last logits); where the parsed network has no such input (TensorRT's parser makes an input with a default
    a constant) the build leaves it out of the profiles. Never run on TensorRT here."""
    from edgelvm.build import BuildConfig
    from edgelvm.build import tensorrt_builder as tb
    from edgelvm.runtime.ort_backend import tensorrt_profile_shapes

    manifest = Manifest.load(llava)
    for profile in tb.decoder_profiles(manifest, BuildConfig(max_batch=2)):
        assert profile.shapes[LOGITS_KEEP] == {"min": [1], "opt": [1], "max": [1]}
        network = {name: (-1,) for name in profile.shapes if name != LOGITS_KEEP}
        assert LOGITS_KEEP not in tb.for_network(profile, network).shapes
        tb.check_network_inputs(network, tb.for_network(profile, network), "decoder")
        assert tb.for_network(profile, {**network, LOGITS_KEEP: (-1,)}) is profile
    shapes = tensorrt_profile_shapes(manifest, "decoder", max_batch=2)
    assert shapes is not None and f"{LOGITS_KEEP}:1" in shapes["trt_profile_max_shapes"].split(",")

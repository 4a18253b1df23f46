"""LFM2-VL (``lfm2_vl``): a SigLIP2 NaFlex tower (views at their own patch grids, padded to the longest, a learned
position table resampled per grid) and LFM2, a hybrid language model whose short-convolution layers keep a fixed-size
``conv`` state instead of keys and values — on a tiny random checkpoint (``tests/fixtures/lfm2_vl.py``).

The reference is transformers' ``Lfm2VlForConditionalGeneration.generate``. Its processor is torchvision-only, which
this project does not install, so HF's inputs here come from the processor edgelvm loads in its place
(``Lfm2VlDataProcessor``: the checkpoint tokenizer's chat template, the runtime's rule for each image's prompt ids and
pixel inputs) — which ``tests/test_lfm2_vl_preprocess.py`` compares with ``Lfm2VlImageProcessor`` /
``Lfm2VlProcessor`` where torchvision is installed (layout, masks and prompt ids equal; pixels within one grey level).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import UnsupportedModelError  # noqa: E402
from edgelvm.manifest import Manifest  # noqa: E402
from edgelvm.runtime import VLM  # noqa: E402
from tests.fixtures.reference import trim_after_eos  # noqa: E402

PROMPTS = ["What is on the table?", "Describe the image in one sentence."]
#: (height, width): a landscape and a portrait single view, and a wide image that splits into 1x2 tiles + thumbnail
SIZES = {"landscape": (40, 50), "portrait": (70, 33), "wide": (150, 260)}
HIDDEN, KERNEL = 64, 3  # the fixture's language model: conv layers 0, 2, 3; attention layers 1, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.fixtures.lfm2_vl import build_tiny_lfm2_vl

    return build_tiny_lfm2_vl(tmp_path_factory.mktemp("lfm2_vl") / "ckpt")


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    from edgelvm.export import ExportConfig, export

    return export(checkpoint, tmp_path_factory.mktemp("lfm2_vl_bundle") / "b", ExportConfig(max_length=160)).bundle_dir


@pytest.fixture(scope="module")
def vlm(bundle):
    return VLM.load(bundle)


@pytest.fixture(scope="module")
def model(checkpoint):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(7)
    return {name: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for name, (h, w) in SIZES.items()}


def _messages(prompt: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [*[{"type": "image"}] * n_images, {"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def processor(checkpoint):
    """The processor edgelvm loads without torchvision (``Lfm2VlDataProcessor``: ``Lfm2VlProcessor``'s ids, masks and
    shapes, compared where torchvision is installed in ``test_lfm2_vl_preprocess.py``)."""
    from edgelvm.models.lfm2_vl import load_lfm2_vl_processor

    return load_lfm2_vl_processor(str(checkpoint))


def _hf_inputs(processor, images: list, messages: list[dict]) -> dict:
    """The model inputs a transformers user passes: ``processor(images, text=[template(messages)])``."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=images or None, text=[text], return_tensors="pt")


def _hf_generate(model, inputs: dict, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return trim_after_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), set(model.generation_config.eos_token_id))


# ---- the bundle ----------------------------------------------------------------------------------------------------
def test_manifest_describes_attention_layers_conv_states_and_the_rule(bundle):
    manifest = Manifest.load(bundle)
    kv = manifest.kv_cache
    assert (kv.num_layers, kv.kv_layers) == (2, [1, 4])
    assert [(s.layer, s.kind, s.shape) for s in kv.states] == [(i, "conv", [HIDDEN, KERNEL - 1]) for i in (0, 2, 3)]
    assert kv.state_bytes(batch=1) == 3 * HIDDEN * (KERNEL - 1) * 4
    assert set(manifest.graphs) == {"vision", "embed", "decoder"}  # the fused decoder is Llama-family only
    vision_inputs = [t.name for t in manifest.graphs["vision"].inputs]
    assert vision_inputs == ["pixel_values", "pixel_attention_mask", "spatial_shapes", "token_patches"]
    assert (manifest.preprocess.tiling, manifest.preprocess.resize_mode) == ("lfm2_tiles", "none")
    assert manifest.preprocess.tiling_params["tile_size"] == 64


# ---- greedy tokens == transformers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("image", list(SIZES))
def test_greedy_tokens_equal_hf_generate(processor, vlm, model, images, image):
    """Each image (one split into tiles and a thumbnail) x 2 prompts; the runtime's prompt ids are HF's too."""
    from edgelvm.runtime.generate import Request

    for prompt in PROMPTS:
        inputs = _hf_inputs(processor, [images[image]], _messages(prompt))
        assert vlm.prompt_ids(Request(prompt=prompt, images=[images[image]])) == inputs["input_ids"][0].tolist()
        vlm.generate([images[image]], prompt, max_new_tokens=12)
        assert vlm.last_output_ids[0] == _hf_generate(model, inputs, 12)


def test_the_image_and_the_split_matter(vlm, images):
    """Evidence the comparisons see the tower: different images give different answers."""
    answers = set()
    for image in SIZES:
        vlm.generate([images[image]], PROMPTS[0], max_new_tokens=12)
        answers.add(tuple(vlm.last_output_ids[0]))
    assert len(answers) == len(SIZES)


def test_two_images_in_one_prompt_equal_hf(processor, vlm, model, images):
    """Two views of different patch counts in one prompt: padded together, as the processor batches them."""
    pair = [images["wide"], images["portrait"]]
    inputs = _hf_inputs(processor, pair, _messages("Compare them.", n_images=2))
    vlm.generate(pair, "Compare them.", max_new_tokens=10)
    assert vlm.last_output_ids[0] == _hf_generate(model, inputs, 10)


def test_a_padded_batch_equals_single_requests(vlm, images):
    """Different images and prompt lengths left-padded together: padding enters the conv states as zeros."""
    requests = [(images["landscape"], PROMPTS[0]), (images["wide"], PROMPTS[1]), (images["portrait"], "Why?")]
    singles = []
    for image, prompt in requests:
        vlm.generate([image], prompt, max_new_tokens=10)
        singles.append(vlm.last_output_ids[0])
    vlm.generate_batch([([image], prompt) for image, prompt in requests], max_new_tokens=10)
    assert vlm.last_output_ids == singles


def test_a_chat_turn_prefills_only_its_new_tokens_and_equals_hf(processor, vlm, model, images):
    """Turn 2 rewinds the states to the end of turn 1's prompt (saved after its prefill): the image is not fed
    again, and the answer equals HF on the whole conversation."""
    chat = vlm.chat(images["wide"])
    first = chat.ask(PROMPTS[0], max_new_tokens=10)
    first_prompt = vlm.last_stats.prompt_tokens
    chat.ask("And the color?", max_new_tokens=8)
    stats = vlm.last_stats
    assert stats.reused_tokens >= first_prompt
    assert stats.prefill_tokens == stats.prompt_tokens - stats.reused_tokens
    messages = [*_messages(PROMPTS[0]), {"role": "assistant", "content": first},
                {"role": "user", "content": [{"type": "text", "text": "And the color?"}]}]  # fmt: skip
    assert vlm.last_output_ids[0] == _hf_generate(model, _hf_inputs(processor, [images["wide"]], messages), 8)


def test_the_conv_states_carry_the_sequence(bundle):
    """A decode step's logits depend on the conv states the prefill left: zeroed, they change; carried, they equal
    one prefill over the whole sequence."""
    import onnxruntime as ort

    manifest = Manifest.load(bundle)
    session = ort.InferenceSession(str(bundle / manifest.graphs["decoder"].file))
    past, _ = manifest.kv_cache.io_names()
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 9, HIDDEN)).astype(np.float32)
    mask, positions = np.ones((1, 9), np.int64), np.arange(9, dtype=np.int64)[None]

    def run(start, stop, cache):
        feeds = {"inputs_embeds": embeds[:, start:stop], "attention_mask": mask[:, :stop],
                 "position_ids": positions[:, start:stop], **dict(zip(past, cache))}  # fmt: skip
        out = session.run(None, feeds)
        return out[0], out[1:]

    kv = manifest.kv_cache
    empty = [np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), np.float32)] * 4 + [
        np.zeros((1, *s.shape), np.float32) for s in kv.states
    ]
    whole, _ = run(0, 9, empty)
    _, cache = run(0, 8, empty)
    carried, _ = run(8, 9, cache)
    zeroed, _ = run(8, 9, [*cache[:4], *(np.zeros_like(s) for s in cache[4:])])
    assert np.abs(carried - whole).max() < 1e-4
    assert np.abs(zeroed - whole).max() > 1e-2


def test_the_runtime_does_not_import_torch(bundle):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "from edgelvm.runtime import VLM\n"
        f"vlm = VLM.load({str(bundle)!r})\n"
        "image = Image.fromarray(np.full((150, 260, 3), 90, np.uint8))\n"
        "print(vlm.generate([image], 'What is it?', max_new_tokens=4) is not None)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split("\n")[:2] == ["True", "[]"]


# ---- stages --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "match"),
    [("prune", "pruning LFM2-VL is not supported"), ("distill", "distilling LFM2-VL is not supported")],
)
def test_prune_and_distill_are_refused_with_the_reason(checkpoint, stage, match):
    from edgelvm.models import load_model

    with pytest.raises(UnsupportedModelError, match=match):
        load_model(str(checkpoint)).check_stage(stage)


def test_int8_vision_calibrated_through_the_data_processor(checkpoint, processor, images, tmp_path):
    """INT8 QDQ vision + INT4 RTN, calibrated on records encoded by ``Lfm2VlDataProcessor`` (views padded across a
    batch, as the processor pads them): the bundle answers as the quantized checkpoint run with the vision linears'
    inputs fake-quantized as the INT8 graph quantizes them; the source's processor files are kept as they were."""
    from edgelvm.data import write_split
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.export import ExportConfig, export
    from edgelvm.export.quantized import quantized_graph_rewrites
    from edgelvm.models import load_model
    from edgelvm.quantize import Int8VisionConfig, RTNConfig, quantize

    write_split(tmp_path / "calib", seed=5, n=8, image_size=96)
    out = tmp_path / "q8"
    report = quantize(str(checkpoint), load_jsonl_dataset(tmp_path / "calib"), [RTNConfig(group_size=32),
                      Int8VisionConfig()], out=out, batch_size=4)  # fmt: skip
    assert {r["side"] for r in report.layers} == {"text", "vision"}
    assert (out / "preprocessor_config.json").read_text() == (checkpoint / "preprocessor_config.json").read_text()
    manifest = export(out, tmp_path / "bundle8", ExportConfig(max_length=160)).manifest
    assert (manifest.graphs["vision"].precision, manifest.graphs["decoder"].precision) == ("int8", "int4")
    adapter = load_model(str(out))
    rewrite, encoder = quantized_graph_rewrites(adapter)["vision"], adapter.vision_encoder()
    vlm = VLM.load(tmp_path / "bundle8")
    for image in ("portrait", "wide"):
        inputs = _hf_inputs(processor, [images[image]], _messages(PROMPTS[0]))
        with rewrite.reference_context(encoder):
            expected = _hf_generate(adapter.model, inputs, 10)
        vlm.generate([images[image]], PROMPTS[0], max_new_tokens=10)
        assert vlm.last_output_ids[0] == expected, image


def test_awq_is_refused_with_the_methods_that_work(checkpoint, tmp_path):
    from edgelvm.data import write_split
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.quantize import AWQConfig, quantize

    write_split(tmp_path / "calib", seed=5, n=2, image_size=96)
    with pytest.raises(UnsupportedModelError, match="rtn"):
        quantize(str(checkpoint), load_jsonl_dataset(tmp_path / "calib"), [AWQConfig()], out=tmp_path / "a")


# ---- the fit check -------------------------------------------------------------------------------------------------
LFM2_VL_450M = {  # LiquidAI/LFM2-VL-450M: LFM2-350M's language model (its public config), a SigLIP2 base/16 tower
    "model_type": "lfm2_vl", "architectures": ["Lfm2VlForConditionalGeneration"], "image_token_id": 396,
    "downsample_factor": 2, "projector_hidden_size": 2560, "tie_word_embeddings": True,
    "text_config": {
        "model_type": "lfm2", "vocab_size": 65536, "hidden_size": 1024, "intermediate_size": 6656,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8, "conv_L_cache": 3,
        "block_auto_adjust_ff_dim": True, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
        "max_position_embeddings": 128000, "norm_eps": 1e-05, "tie_word_embeddings": True,
        "layer_types": ["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv",
                        "full_attention", "conv", "full_attention", "conv", "full_attention", "conv",
                        "full_attention", "conv"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "vision_config": {
        "model_type": "siglip2_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "patch_size": 16, "num_patches": 256, "vision_use_head": False,
    },
}  # fmt: skip


def test_the_fit_check_counts_the_conv_states_by_hand(tmp_path):
    """LFM2-VL-450M at fp16: keys and values only in its 6 attention layers — 2 (k, v) x 6 x 8 KV heads x 64 x 2 B =
    12,288 B per token; each of its 10 convolution layers keeps 1024 channels x 2 inputs x 2 B = 4,096 B whatever the
    length: 40,960 B per sequence (an all-attention 16-layer model: 32,768 B per token)."""
    from edgelvm.devices.profiles import load_profile
    from edgelvm.plan import footprint_from_config, plan_model

    (tmp_path / "config.json").write_text(json.dumps(LFM2_VL_450M))
    footprint = footprint_from_config(tmp_path)
    assert (footprint.kv_layers, footprint.kv_heads, footprint.head_dim) == (6, 8, 64)
    assert footprint.kv_bytes_per_token("float16") == 12_288
    assert footprint.state_bytes == 10 * 1024 * 2 * 2 == 40_960
    orin = load_profile("jetson-orin-nano-8gb")
    for length in (4096, 32768):
        budget = dict(plan_model(footprint, [orin], precision="int4", max_length=length).rows[0].plan.budget)
        assert next(v for k, v in budget.items() if k.startswith("KV cache")) == 12_288 * length * 2
        assert next(v for k, v in budget.items() if k.startswith("decoder states")) == 40_960 * 2


def test_tensorrt_refuses_the_hybrid_bundle_before_touching_the_gpu(bundle):
    from edgelvm.build.tensorrt_builder import build_engines

    with pytest.raises(UnsupportedModelError, match="hybrid decoder"):
        build_engines(bundle)

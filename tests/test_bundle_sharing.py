"""A bundle stores each weight once: the fused decoder points into the portable decoder's data file, a tied LM head
into the embedding table — and both decoders still answer exactly as Hugging Face does."""

from __future__ import annotations

import mmap
from collections import defaultdict

import pytest
import torch

from edgelvm.runtime import VLM
from tests.fixtures.families import LLAVA_PROMPTS as PROMPTS
from tests.fixtures.reference import trim_after_eos


@pytest.fixture(scope="module")
def tied(tied_qwen2):
    """A tied-embedding Qwen2 LLaVA wide enough that its matrices are shared (≥ 64 KiB each), exported with every
    graph's weights as external data (the path real sizes take): conftest.py's ``tied_qwen2``."""
    return tied_qwen2


def _external_tensors(bundle):
    """(graph, initializer name) -> (file, offset, length) for every external initializer of the bundle's graphs."""
    import onnx

    from edgelvm.export.external_data import external_info

    found = {}
    for graph in ("decoder.onnx", "decoder_ort.onnx", "vision.onnx"):
        model = onnx.load(str(bundle / graph), load_external_data=False)
        for tensor in model.graph.initializer:
            info = external_info(tensor)
            if info is not None:
                found[(graph, tensor.name)] = info
    return found


def test_every_large_tensor_is_stored_once(tied):
    from edgelvm.export.external_data import SHARE_BYTES, digest

    checkpoint, bundle = tied
    tensors = _external_tensors(bundle)
    fused = {name: info for (graph, name), info in tensors.items() if graph == "decoder_ort.onnx"}
    # every fused matmul weight and the LM head lie in files the portable decoder and the table already hold
    for name in [n for n in fused if n.split(".")[-1] in ("q", "k", "v", "o_proj", "gate", "up", "down")]:
        assert fused[name].file == "decoder.onnx.data", name
    assert fused["lm_head"].file == "embed.npy"  # tied: the table is the head
    portable_head = [i for (graph, _), i in tensors.items() if graph == "decoder.onnx" and i.file == "embed.npy"]
    assert len(portable_head) == 1  # the traced graph's tied head too

    by_digest = defaultdict(set)
    maps = {}
    for info in tensors.values():
        if info.file not in maps:
            with open(bundle / info.file, "rb") as handle:
                maps[info.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        if info.length >= SHARE_BYTES:
            by_digest[digest(maps[info.file][info.offset : info.offset + info.length])].add(info)
    assert by_digest and all(len(places) == 1 for places in by_digest.values())  # no bytes stored in two places

    weights = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    stored = sum(p.stat().st_size for p in bundle.iterdir() if p.suffix in (".onnx", ".data", ".npy"))
    assert stored < 1.15 * weights, (stored, weights)  # graphs' protobufs and alignment padding on top of the weights


@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_shared_bundle_answers_as_hf_generate(tied, decoder, test_images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checkpoint, bundle = tied
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    vlm = VLM.load(bundle, decoder=decoder)
    eos = set(vlm.manifest.generation["eos_token_ids"])
    for image in test_images:
        for prompt in PROMPTS[:2]:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(images=[image], text=[text], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            expected = trim_after_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), eos)
            vlm.generate(image, prompt, max_new_tokens=12)
            assert vlm.last_output_ids[0] == expected, (decoder, prompt)

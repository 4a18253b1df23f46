"""``--image-tokens``: VisionZip-style dominant image tokens chosen inside the exported vision graph (LLaVA).

The references are transformers' own: the tower's eager attention probabilities (``output_attentions=True``) rank
the tokens, ``get_image_features`` projects them, and ``generate`` answers with those features spliced into the
prompt's embeddings. The graph recomputes the attention itself (q/k of the scoring layer), so agreement here is
evidence that it scores the layer transformers would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgelvm.errors import ConfigError, EdgeLVMError, ManifestError, UnsupportedModelError
from edgelvm.manifest import Manifest
from edgelvm.models.token_reduction import parse_image_tokens, reduce_image_tokens
from edgelvm.runtime import VLM, Request
from tests.fixtures.reference import chat_text, eos_ids, trim_after_eos

FULL = 16  # tokens per image of the tiny LLaVA towers (32-px images, 8-px patches)
KEEP = 6  # what the CLI's "0.375" keeps: round(0.375 * 16)


def _eager(checkpoint):
    """The checkpoint as transformers loads it, with eager attention (the one that returns its probabilities)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return AutoProcessor.from_pretrained(checkpoint), model


def _reference(model, pixels: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept features ``[images, keep, hidden]``, their token indices) by VisionZip's rule on transformers' outputs:
    the attention of the layer producing ``vision_feature_layer`` — the CLS row (CLIP) or each token's mean received
    attention (SigLIP), averaged over heads — ranks the tokens the feature strategy keeps; the top ``keep`` in raster
    order, gathered from ``get_image_features``."""
    config = model.config
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        layer = config.vision_feature_layer % len(out.hidden_states) - 1  # the layer whose output is the features
        probs = out.attentions[layer]  # [images, heads, tokens, tokens]
        clip = config.vision_config.model_type.startswith("clip")
        scores = probs[:, :, 0, :].mean(dim=1) if clip else probs.mean(dim=(1, 2))
        if config.vision_feature_select_strategy == "default":
            scores = scores[:, 1:]
        full = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    index = scores.topk(keep, dim=1).indices.sort(dim=1).values
    kept = torch.stack([full[i, index[i]] for i in range(len(full))])
    return kept, index


def _cut_image_runs(ids: list[int], image_id: int) -> list[int]:
    """The processor's ids with each image's FULL image tokens cut to its first KEEP (the k-th image token of the
    prompt is token k % FULL of its image)."""
    out, seen = [], 0
    for token in ids:
        if token == image_id:
            seen += 1
            if (seen - 1) % FULL >= KEEP:
                continue
        out.append(token)
    return out


@pytest.fixture(scope="module")
def reduced_bundle(tiny_checkpoints, tmp_path_factory):
    """The Llama + CLIP LLaVA exported by the CLI with ``--image-tokens 0.375`` (6 of 16 tokens per image)."""
    from edgelvm.cli import app

    bundle = tmp_path_factory.mktemp("reduced") / "bundle"
    args = ["export", str(tiny_checkpoints["llama-clip"]), "-o", str(bundle), "--max-length", "128", "--decoder",
            "portable", "--image-tokens", "0.375"]  # fmt: skip
    result = CliRunner(env={"COLUMNS": "240"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"image tokens: {KEEP} of {FULL} per image" in result.output
    return bundle


def test_the_graph_keeps_the_tokens_transformers_attention_ranks_highest(reduced_bundle, tiny_checkpoints):
    """CLIP (CLS attention, CLS dropped by the strategy): the ONNX graph's output equals the reference to 1e-4."""
    import onnxruntime as ort

    _, model = _eager(tiny_checkpoints["llama-clip"])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected, index = _reference(model, pixels, KEEP)
    session = ort.InferenceSession(str(reduced_bundle / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": pixels.numpy()})[0]
    assert got.shape == (3, KEEP, model.config.text_config.hidden_size)
    assert np.abs(got - expected.numpy()).max() / np.abs(expected.numpy()).max() < 1e-4
    # the selection is not trivial: not the leading tokens, and it depends on the image
    assert not torch.equal(index[0], torch.arange(KEEP)) and len({tuple(i.tolist()) for i in index}) > 1


def test_siglip_ranks_by_the_mean_attention_each_token_receives(tiny_checkpoints, tmp_path):
    """SigLIP has no CLS: the graph (exported by export's own vision step) keeps the tokens that receive the most
    attention in the last layer, as transformers' probabilities say."""
    import onnxruntime as ort

    from edgelvm.export.onnx_graphs import export_vision
    from edgelvm.models import load_model

    adapter = load_model(tiny_checkpoints["qwen2-siglip"])
    reduced, reduction = reduce_image_tokens(adapter, 5)
    assert reduction.score == "mean_attention_received" and reduction.vision_layer == 1
    assert adapter.tokens_per_image() == FULL and reduced.tokens_per_image() == 5  # the loaded adapter is unchanged
    spec = export_vision(reduced, tmp_path / "vision.onnx", "fp32")
    assert spec.outputs[0].shape == ["batch", 5, adapter.text_config.hidden_size]

    _, model = _eager(tiny_checkpoints["qwen2-siglip"])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    expected, _ = _reference(model, pixels, 5)
    got = ort.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels.numpy()}
    )[0]
    assert np.abs(got - expected.numpy()).max() / np.abs(expected.numpy()).max() < 1e-4


@pytest.mark.parametrize("images", [1, 2])
def test_greedy_answers_equal_hf_generate_on_the_reduced_features(images, reduced_bundle, tiny_checkpoints,
                                                                  test_images):  # fmt: skip
    """The bundle's prompt holds KEEP image tokens per image (the processor's prompt with each image's run cut to
    KEEP), and its greedy tokens equal transformers' ``generate`` on embeddings with the reference features
    spliced in at those positions."""
    processor, model = _eager(tiny_checkpoints["llama-clip"])
    vlm = VLM.load(reduced_bundle)
    image_id = model.config.image_token_id
    chosen = test_images[:images]
    for prompt in ("Describe the image.", "What color is the sky?"):
        inputs = processor(images=chosen, text=[chat_text(processor, prompt, images)], return_tensors="pt")
        full_ids = inputs["input_ids"][0].tolist()
        ids = _cut_image_runs(full_ids, image_id)
        assert sum(t == image_id for t in full_ids) == images * FULL
        assert vlm.prompt_ids(Request(prompt=prompt, images=chosen)) == ids
        assert sum(t == image_id for t in ids) == images * KEEP

        features, _ = _reference(model, inputs["pixel_values"], KEEP)
        ids_t = torch.tensor([ids])
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids_t)
            embeds[ids_t == image_id] = features.reshape(-1, features.shape[-1])
            out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids_t), max_new_tokens=12,
                                 do_sample=False)  # fmt: skip
        expected = trim_after_eos(out[0].tolist(), eos_ids(model, processor.tokenizer))
        vlm.generate(chosen, prompt, max_new_tokens=12)
        assert vlm.last_output_ids[0] == expected
        assert vlm.last_stats.prompt_tokens == len(ids) == len(full_ids) - images * (FULL - KEEP)


def test_the_manifest_records_the_reduction_and_a_bundle_without_it_reads_as_before(reduced_bundle, tmp_path):
    data = json.loads((reduced_bundle / "edgelvm.json").read_text())
    manifest = Manifest.from_dict(data)
    assert manifest.preprocess.tokens_per_image == KEEP  # what the runtime places
    assert manifest.image_token_reduction == {
        "tokens_per_image": KEEP, "full_tokens_per_image": FULL, "score": "cls_attention", "vision_layer": 0,
        "method": "visionzip_dominant", "order": "raster",
    }  # fmt: skip
    assert manifest.graphs["vision"].outputs[0].shape[1] == KEEP
    assert manifest.created_from["recipe"][-1]["image_tokens"] == KEEP  # inspect shows the recipe
    assert manifest.to_dict()["image_token_reduction"] == data["image_token_reduction"]

    del data["image_token_reduction"]  # a bundle exported without the option (or by an older edgelvm)
    plain = Manifest.from_dict(data)
    assert plain.image_token_reduction is None and "image_token_reduction" not in plain.to_dict()
    data["image_token_reduction"] = "6 tokens"
    with pytest.raises(ManifestError, match="image_token_reduction"):
        Manifest.from_dict(data)


def test_bad_values_are_refused_naming_the_option(tiny_checkpoints, tmp_path):
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model

    adapter = load_model(tiny_checkpoints["llama-clip"])
    for value in (0, -3, FULL + 1, 0.0, -0.5, 1.5, float("nan"), True, "4"):
        with pytest.raises(ConfigError, match="--image-tokens") as err:
            reduce_image_tokens(adapter, value)
        assert err.value.where == "--image-tokens" and err.value.fix
    assert reduce_image_tokens(adapter, 0.25)[1].tokens_per_image == 4
    assert reduce_image_tokens(adapter, 1)[1].tokens_per_image == 1
    assert reduce_image_tokens(adapter, FULL) == (adapter, None)  # every token: nothing to reduce, today's graph
    assert reduce_image_tokens(adapter, 1.0) == (adapter, None)
    assert reduce_image_tokens(adapter, None) == (adapter, None)
    assert parse_image_tokens("144") == 144 and parse_image_tokens("0.25") == 0.25
    with pytest.raises(ConfigError, match="neither a token count nor a fraction"):
        parse_image_tokens("a quarter")
    # through export: refused before anything is written
    with pytest.raises(ConfigError, match=f"outside 1..{FULL}"):
        export(tiny_checkpoints["llama-clip"], tmp_path / "b", ExportConfig(image_tokens=FULL + 1))
    assert not (tmp_path / "b").exists()


def test_families_that_cannot_drop_tokens_are_refused_with_the_reason(artifacts, tmp_path):
    """Qwen2-VL (M-RoPE positions from the token grid): refused from config.json before its weights load, and a
    loaded adapter of a family without the capability is refused too — never exported in full silently."""
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model

    checkpoint = artifacts.checkpoint("qwen2_vl")
    with pytest.raises(UnsupportedModelError, match="M-RoPE") as err:
        export(checkpoint, tmp_path / "b", ExportConfig(image_tokens=4))
    assert err.value.where == "--image-tokens" and "without --image-tokens" in err.value.fix
    assert not (tmp_path / "b").exists()
    with pytest.raises(EdgeLVMError, match="--image-tokens is not supported for qwen2_vl"):
        reduce_image_tokens(load_model(checkpoint), 0.5)


def test_the_export_check_accepts_a_near_tie_ranked_the_other_way_and_nothing_else():
    """Export compares a reducing graph with PyTorch at the tokens the graph kept when they are a valid top-N: a
    near tie (within float rounding) ranked the other way is accepted; a lower token, or tokens out of raster order,
    leave PyTorch's own selection as the reference, which the parity check then fails."""
    from edgelvm.models.token_reduction import reference_at_graph_tokens

    full = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([[0.5, 0.3, 0.30001, 0.1, 0.05]])  # tokens 1 and 2 tie up to 2e-5 of the largest score
    own = full[:, [0, 2]]  # PyTorch keeps 0 and 2

    def reference(rows: list[int]) -> torch.Tensor:
        return reference_at_graph_tokens(full, scores, full[:, rows].numpy(), keep=2)

    assert torch.equal(reference([0, 2]), own)
    assert torch.equal(reference([0, 1]), full[:, [0, 1]])  # the tie the other way: compared where the graph chose
    assert torch.equal(reference([0, 3]), own)  # token 3 is far below the cut
    assert torch.equal(reference([2, 0]), own)  # not in raster order

"""The scenarios every family shares, run over the FAMILIES table (tests/fixtures/families.py): exported bundle vs
Hugging Face greedy ``generate`` on both decoders, padded batches, chat sessions, the torch-free runtime, and the
quantized / pruned / distilled checkpoints exported and compared again (or the stage's refusal).

Each family's checkpoint, bundle and reference answers are built once per session (tests/fixtures/artifacts.py) and
shared with its own ``test_<family>.py``, which holds what only that family does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import ConfigError, UnsupportedModelError  # noqa: E402
from edgelvm.runtime import VLM  # noqa: E402
from tests.fixtures.families import FAMILIES, Family, manifest_field, rows  # noqa: E402
from tests.fixtures.reference import HEAVY_MODULES, hf_generate  # noqa: E402


def _params(selected: list[Family], scenario: str | None = None) -> list:
    """One param per row; a row that leaves ``scenario`` to the slow suite (``Family.slow``) is marked slow."""
    return [pytest.param(f.name, id=f.name, marks=[pytest.mark.slow] if scenario in f.slow else [])
            for f in selected]  # fmt: skip


def _decoder_params() -> list:
    return [pytest.param(f.name, d, id=f"{f.name}-{d}") for f in FAMILIES.values() for d in f.decoders]


def _assert_manifest(row: Family, manifest) -> None:
    for path, expected in row.manifest.items():
        assert manifest_field(manifest, path) == expected, path


def _assert_answers_equal_hf(row: Family, bundle, processor, model, images, cases, decoder: str | None = None):
    """The bundle's greedy answers equal ``generate``'s on ``model`` for each (image, prompt) case."""
    vlm = VLM.load(bundle, decoder=decoder) if decoder else VLM.load(bundle)
    for image, prompt in cases:
        expected = hf_generate(row.hf_inputs, processor, model, [images[image]], prompt, row.short_tokens)
        vlm.generate(images[image], prompt, max_new_tokens=row.short_tokens)
        assert vlm.last_output_ids[0] == expected, (image, prompt, decoder)


# ---- export parity: the bundle answers as transformers does ----------------------------------------------------
@pytest.mark.parametrize("name, decoder", _decoder_params())
def test_greedy_tokens_equal_hf_generate(name, decoder, artifacts):
    row, images, hf_greedy = FAMILIES[name], artifacts.images(name), artifacts.hf_greedy(name)
    vlm = VLM.load(artifacts.bundle(name), decoder=decoder)
    assert vlm.backend.fused == (decoder == "fused")
    _assert_manifest(row, vlm.manifest)
    processor, _ = artifacts.hf(name)
    compared = 0
    for (image, prompt), expected in hf_greedy.items():
        text = vlm.generate(images[image], prompt, max_new_tokens=row.new_tokens)
        assert vlm.last_output_ids[0] == expected, (image, prompt)
        if row.decoded_text:
            assert text == processor.tokenizer.decode(expected, skip_special_tokens=True)
        compared += len(expected)
    if row.full_answers:  # not a vacuous early-EOS pass
        assert compared >= len(hf_greedy) * row.new_tokens * row.full_answers
    assert len({tuple(ids) for ids in hf_greedy.values()}) >= row.distinct_answers
    if row.image_matters:
        first, second = row.greedy[:2]
        for prompt in row.prompts:
            assert hf_greedy[first, prompt] != hf_greedy[second, prompt], prompt


@pytest.mark.parametrize("name", _params(list(FAMILIES.values())))
def test_padded_batch_equals_single_requests(name, artifacts):
    """All greedy requests (different images, so different prompt lengths) in one left-padded batch."""
    images, hf_greedy = artifacts.images(name), artifacts.hf_greedy(name)
    vlm = VLM.load(artifacts.bundle(name))
    vlm.generate_batch(
        [(images[image], prompt) for image, prompt in hf_greedy], max_new_tokens=FAMILIES[name].new_tokens
    )
    assert vlm.last_output_ids == list(hf_greedy.values())


@pytest.mark.parametrize("name", _params(rows(lambda f: isinstance(f.chat, tuple))))
def test_chat_first_turn_equals_a_single_request_and_turn_two_reuses_the_cache(name, artifacts):
    row, images, hf_greedy = FAMILIES[name], artifacts.images(name), artifacts.hf_greedy(name)
    image, cached = row.chat
    vlm = VLM.load(artifacts.bundle(name))
    chat = vlm.chat(images[image])
    chat.ask(row.prompts[0], max_new_tokens=row.new_tokens)
    assert vlm.last_output_ids[0] == hf_greedy[image, row.prompts[0]]
    chat.ask("And the color?", max_new_tokens=8)
    assert vlm.last_stats.reused_tokens > cached  # the image stayed in the cache


@pytest.mark.parametrize("name", _params(rows(lambda f: isinstance(f.chat, str))))
def test_chat_is_refused_clearly(name, artifacts):
    vlm = VLM.load(artifacts.bundle(name))
    with pytest.raises(ConfigError, match=FAMILIES[name].chat):
        vlm.chat(artifacts.images(name)[FAMILIES[name].greedy[0]])


#: Families whose decoders speculative decoding cannot keep exact, and the reason the refusal names.
SPECULATION_REFUSED = {
    "qwen2_vl": "per-step inputs", "qwen3_vl": "per-step inputs", "qwen3_5": "recurrent", "idefics": "per-step inputs",
    "gemma3": "image-block masks", "paligemma": "logits of 1 position",
}  # fmt: skip


class _NoisyDraft:
    """The draft's backend with noise on its logits: a weaker draft of the same bundle, so that some proposals are
    rejected and the rewinding paths run on every family's own prompts and caches."""

    def __init__(self, backend, scale: float) -> None:
        self.backend, self.scale, self.rng = backend, scale, np.random.default_rng(0)

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step(self, *args, **kwargs):
        logits = self.backend.step(*args, **kwargs)
        return logits + self.rng.normal(0, self.scale, size=logits.shape).astype(logits.dtype)


@pytest.mark.parametrize("name", _params(list(FAMILIES.values())))
def test_speculative_decoding_keeps_the_hf_greedy_tokens_or_is_refused(name, artifacts):
    """With a draft (the family's bundle again, its logits made noisy: some proposals rejected), every greedy answer
    is HF ``generate``'s, token for token, one request at a time and in a padded batch; or the pair is refused
    with the family's reason."""
    images, hf_greedy, bundle = artifacts.images(name), artifacts.hf_greedy(name), artifacts.bundle(name)
    vlm = VLM.load(bundle)
    draft = VLM.load(bundle)
    if name in SPECULATION_REFUSED:
        with pytest.raises(ConfigError, match=SPECULATION_REFUSED[name]):
            vlm.use_draft(draft, tokens=3)
        return
    vlm.use_draft(draft, tokens=3)
    draft.backend = _NoisyDraft(draft.backend, scale=2.0)
    tokens = FAMILIES[name].new_tokens
    drafted = accepted = 0
    for (image, prompt), expected in hf_greedy.items():
        vlm.generate(images[image], prompt, max_new_tokens=tokens)
        assert vlm.last_output_ids[0] == expected, (image, prompt)
        drafted, accepted = drafted + vlm.last_stats.draft_tokens, accepted + vlm.last_stats.accepted_tokens
    assert 0 < accepted < drafted  # proposals both kept and rejected
    vlm.generate_batch([(images[image], prompt) for image, prompt in hf_greedy], max_new_tokens=tokens)
    assert vlm.last_output_ids == list(hf_greedy.values())


def test_runtime_runs_every_family_bundle_without_torch(artifacts):
    """One fresh interpreter loads every family's bundle and answers; torch, transformers and onnx stay unloaded."""
    bundles = {name: str(artifacts.bundle(name)) for name in FAMILIES}
    code = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from edgelvm.runtime import VLM
        frame = np.random.default_rng(0).integers(0, 256, (48, 90, 3), dtype=np.uint8)
        for name, bundle in json.loads({json.dumps(json.dumps(bundles))}).items():
            vlm = VLM.load(bundle)
            vlm.generate(frame, "What is on the table?", max_new_tokens=4)
            assert vlm.last_stats.new_tokens >= 1, name
        print("HEAVY=" + ",".join(m for m in {HEAVY_MODULES!r} if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY=")


# ---- compression stages: the result exports and still matches its own transformers model ------------------------
@pytest.mark.parametrize("name", _params(rows(lambda f: bool(f.quantize)), "quantize"))
def test_quantized_checkpoint_exports_and_matches(name, artifacts):
    """INT4 AWQ language model + INT8 QDQ vision, calibrated through the family's processor. Fused families: the
    fused (MatMulNBits) decoder answers like the portable (DequantizeLinear) one; ``quantize_reference="hf"``: both
    equal the quantized checkpoint in transformers, run with the vision linears' inputs fake-quantized as the INT8
    graph quantizes them."""
    from edgelvm.export.quantized import quantized_graph_rewrites
    from edgelvm.models import load_model

    row, images = FAMILIES[name], artifacts.images(name)
    stage = artifacts.quantized(name)
    assert {r["side"] for r in stage.report.layers} == {"text", "vision"}
    manifest, bundle = stage.export.manifest, stage.export.bundle_dir
    _assert_manifest(row, manifest)
    graphs = manifest.graphs
    assert graphs["vision"].precision == "int8"
    if "fused" in row.decoders:
        assert graphs["decoder_ort"].parity["max_rel"] < 1e-3
    else:
        assert set(graphs) == {"vision", "embed", "decoder"}
        assert graphs["decoder"].precision == "int4"
    if row.quantize_reference == "portable":
        fused, portable = VLM.load(bundle, decoder="fused"), VLM.load(bundle, decoder="portable")
        for image, prompt in row.quantize:
            fused.generate(images[image], prompt, max_new_tokens=row.short_tokens)
            portable.generate(images[image], prompt, max_new_tokens=row.short_tokens)
            assert fused.last_output_ids == portable.last_output_ids, image
            assert len(fused.last_output_ids[0]) >= row.quantize_min_tokens, image
        return
    assert graphs["decoder"].precision == "int4"
    adapter = load_model(str(stage.out))
    vision_rewrite, encoder = quantized_graph_rewrites(adapter)["vision"], adapter.vision_encoder()
    for decoder in row.decoders:
        vlm = VLM.load(bundle, decoder=decoder)
        for image, prompt in row.quantize:
            with vision_rewrite.reference_context(encoder):  # the wrapper shares its linears with the model
                expected = hf_generate(row.hf_inputs, adapter.processor, adapter.model, [images[image]], prompt,
                                       row.short_tokens)  # fmt: skip
            vlm.generate(images[image], prompt, max_new_tokens=row.short_tokens)
            assert vlm.last_output_ids[0] == expected, (image, prompt, decoder)


@pytest.mark.parametrize("name", _params(rows(lambda f: isinstance(f.prune, tuple) and bool(f.prune)), "prune"))
def test_pruned_checkpoint_reloads_exports_and_matches_hf(name, artifacts):
    """Activation importance on calibration data through the family's processor; heads and neurons of both towers;
    the result reloads as the same family and model type, exports, and its greedy tokens equal HF's."""
    from edgelvm.models import load_model

    row = FAMILIES[name]
    stage = artifacts.pruned(name)
    assert stage.report.kept["text"][0]["heads"] == 2 and stage.report.kept["vision"][0]["heads"] == 2
    adapter = load_model(str(stage.out))
    source_type = json.loads((artifacts.checkpoint(name) / "config.json").read_text())["model_type"]
    assert (adapter.family, adapter.config.model_type) == (row.family, source_type)
    _assert_manifest(row, stage.export.manifest)
    _assert_answers_equal_hf(row, stage.export.bundle_dir, adapter.processor, adapter.model, artifacts.images(name),
                             row.prune)  # fmt: skip


@pytest.mark.parametrize("name", _params(rows(lambda f: isinstance(f.prune, str))))
def test_prune_is_refused_clearly(name, artifacts, tmp_path):
    from edgelvm.models import load_model
    from edgelvm.prune import PruneConfig, prune

    adapter = load_model(str(artifacts.checkpoint(name)))
    config = PruneConfig(out=tmp_path / "p", text_heads=0.5, importance="magnitude", progress=False)
    with pytest.raises(UnsupportedModelError, match=FAMILIES[name].prune):
        prune(adapter, None, config)


@pytest.mark.parametrize("name", _params(rows(lambda f: f.student is not None), "distill"))
def test_distilled_student_keeps_the_family_exports_and_matches_hf(name, artifacts):
    """The family as teacher and (derived) student, with the image-position and projector-feature losses; the
    student keeps the family's rules and model type, has the asked shape, and its bundle matches HF."""
    from transformers import AutoModelForImageTextToText

    from edgelvm.models import load_model

    row = FAMILIES[name]
    stage = artifacts.distilled(name)
    assert stage.report.finished and stage.report.student_params < stage.report.teacher_params
    _assert_manifest(row, stage.export.manifest)
    student = load_model(str(stage.out))
    source_type = json.loads((artifacts.checkpoint(name) / "config.json").read_text())["model_type"]
    assert (student.family, student.config.model_type) == (row.family, source_type)
    assert student.text_config.num_hidden_layers == row.student["text_layers"]
    if "text_hidden" in row.student:
        assert student.text_config.hidden_size == row.student["text_hidden"]
    processor = row.load_processor(stage.out)
    model = AutoModelForImageTextToText.from_pretrained(stage.out).eval()
    _assert_answers_equal_hf(row, stage.export.bundle_dir, processor, model, artifacts.images(name), row.distill)

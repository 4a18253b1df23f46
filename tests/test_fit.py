"""The fit check against hand calculations for a 7B-class LLaVA on a Jetson Orin Nano 8GB."""

from __future__ import annotations

import pytest

from edgelvm.devices.fit import FitError, UnsupportedPrecisionError, plan_for_target
from edgelvm.devices.profiles import load_profile

GIB = 1 << 30
# CLIP ViT-L/336 + projector ≈ 0.3e9 params in fp16; Llama-7B-shaped LLM: 6.74e9 params.
VISION_BYTES = int(0.3e9 * 2)
LLM_FP16 = int(6.74e9 * 2)  # 13_480_000_000
LLM_INT4 = int(6.74e9 * 4.5 / 8)  # 4.5 bits/param effective (4-bit + group-128 scales + kept layers) = 3_791_250_000
# 32 layers × (key + value) × 32 KV heads × head_dim 128 × 2 bytes (fp16) = 524_288 bytes per token
KV_PER_TOKEN = 32 * 2 * 32 * 128 * 2


@pytest.fixture(scope="module")
def nano():
    return load_profile("jetson-orin-nano-8gb")


def test_fp16_7b_is_refused_with_computed_suggestions(nano):
    with pytest.raises(FitError) as err:
        plan_for_target(
            nano,
            vision_weight_bytes=VISION_BYTES,
            llm_weight_bytes=LLM_FP16,
            kv_bytes_per_token=KV_PER_TOKEN,
            max_length=4096,
            precision="fp16",
        )
    text = str(err.value)
    # total = 0.6e9 + 13.48e9 + 524288 × 4096 × 2 buffers (4 GiB) + 0.5 GiB + 0.75 GiB = 19_717_144_576 B = 18.36 GiB
    total = VISION_BYTES + LLM_FP16 + KV_PER_TOKEN * 4096 * 2 + GIB // 2 + 3 * GIB // 4
    assert total == 14_080_000_000 + 4 * GIB + GIB // 2 + 3 * GIB // 4 == 19_717_144_576
    assert f"needs {total / GIB:.2f} GiB" in text and "18.36 GiB" in text
    assert "6.50 GiB usable" in text
    # INT4 LLM: 3.79125e9 B = 3.53 GiB; total 0.6e9 + 3.79125e9 + 5.25 GiB = 9.34 GiB, still short by 2.84 GiB
    assert "its weights would need 3.53 GiB instead of 12.55 GiB, total 9.34 GiB — still short by 2.84 GiB" in text
    # INT4 + the longest multiple of 256 that fits: (6.5 GiB − (0.6e9 + 3.79125e9 + 1.25 GiB)) / 1 MiB per token
    # = (6_979_321_856 − 5_733_430_272) / 1_048_576 = 1188 tokens → 1024
    assert "INT4 the LLM and export with --max-length 1024: fits" in text
    assert "--max-length 2048 saves 2.00 GiB of KV cache (not enough alone)" in text
    assert (
        "a larger device as is: jetson-agx-orin-32gb" in text
    )  # Jetsons first; jetson-orin-nx-16gb (14.3 GiB) is too small


def test_int4_7b_fits_at_2048_with_an_in_place_cache(nano):
    plan = plan_for_target(
        nano,
        vision_weight_bytes=VISION_BYTES,
        llm_weight_bytes=LLM_INT4,
        kv_bytes_per_token=KV_PER_TOKEN,
        max_length=2048,
        precision="int4",
        kv_buffers=1,
    )
    # 600_000_000 + 3_791_250_000 + 524_288 × 2048 (1 GiB) + 0.5 GiB + 0.75 GiB = 6_807_169_104 bytes
    assert plan.total_bytes == 600_000_000 + 3_791_250_000 + 1_073_741_824 + 536_870_912 + 805_306_368
    assert plan.total_bytes == 6_807_169_104
    assert plan.usable_bytes == int(6.5 * GIB) == 6_979_321_856
    assert plan.fits and plan.headroom_bytes == 172_152_752
    # roofline: 68e9 B/s / 3.79125e9 B = 17.94 tok/s; at 2048 context: 68e9 / (3.79125e9 + 1.073741824e9) = 13.98
    assert plan.decode_tokens_per_s == pytest.approx(17.936, abs=1e-3)
    assert plan.decode_tokens_per_s_at_max_length == pytest.approx(13.978, abs=1e-3)
    # build peak: 4 × 3.79125e9 + 0.75 GiB = 15_970_306_368 > usable → a warning, not a refusal
    assert plan.build_peak_bytes == 15_970_306_368 and not plan.build_fits
    assert any("swap" in w for w in plan.warnings)
    target = plan.to_manifest()
    assert target["profile"] == "jetson-orin-nano-8gb" and target["fits"] is True
    assert target["predicted_decode_tokens_per_s"] == 17.94
    assert sum(target["budget_bytes"].values()) == target["total_bytes"]


def test_int4_7b_at_2048_with_todays_ping_pong_cache_suggests_1024(nano):
    with pytest.raises(FitError) as err:
        plan_for_target(
            nano,
            vision_weight_bytes=VISION_BYTES,
            llm_weight_bytes=LLM_INT4,
            kv_bytes_per_token=KV_PER_TOKEN,
            max_length=2048,
            precision="int4",
        )
    # 6_807_169_104 + 1 GiB (second KV buffer) = 7_880_910_928 > 6_979_321_856
    text = str(err.value)
    assert "needs 7.34 GiB" in text and "KV cache (2048 tok × 1 × 2 buf)" in text and "2.00 GiB" in text
    # longest with 2 buffers: (6_979_321_856 − 5_733_430_272) / (524_288 × 2) = 1188 → 1024
    assert "--max-length 1024 (from 2048) saves 1.00 GiB of KV cache: fits" in text
    assert "INT4 the LLM" not in text  # already INT4
    # and the refusal says what it is that does not fit: with one buffer it would need 6_807_169_104 B = 6.34 GiB
    assert "with an in-place cache (1 buffer" in text and "would need 6.34 GiB — fits" in text


def test_gqa_7b_llava_in_int4_fits_at_2048_with_todays_ping_pong_cache(nano):
    """A 7B-class LLaVA whose LLM has grouped-query attention fits at 2048 even with two KV buffers.

    BakLLaVA-1-shaped (llava-hf/bakLlava-v1-hf: the LLaVA-1.5 layout, CLIP-L/336 + Mistral-7B): 32 layers, 8 KV heads
    (not 32), head_dim 128 → a quarter of Llama-2-7B's KV bytes per token."""
    llm_int4 = int(7.24e9 * 4.5 / 8)  # Mistral-7B, 7.24e9 params incl. the embedding table = 4_072_500_000 bytes
    kv_per_token = 32 * 2 * 8 * 128 * 2  # = 131_072 bytes (128 KiB)
    assert llm_int4 == 4_072_500_000 and kv_per_token == 131_072
    plan = plan_for_target(
        nano,
        vision_weight_bytes=VISION_BYTES,
        llm_weight_bytes=llm_int4,
        kv_bytes_per_token=kv_per_token,
        max_length=2048,
        precision="int4",
    )
    assert plan.kv_buffers == 2
    # 600_000_000 + 4_072_500_000 + 131_072 × 2048 × 2 (0.5 GiB) + 0.5 GiB + 0.75 GiB = 6_551_548_192 B = 6.10 GiB
    assert plan.total_bytes == 600_000_000 + 4_072_500_000 + 536_870_912 + 536_870_912 + 805_306_368 == 6_551_548_192
    assert plan.fits and plan.headroom_bytes == 6_979_321_856 - 6_551_548_192 == 427_773_664  # 0.40 GiB
    # roofline: 68e9 / 4.0725e9 = 16.70 tok/s; at 2048: 68e9 / (4.0725e9 + 131_072 × 2048) = 15.66 tok/s
    assert plan.decode_tokens_per_s == pytest.approx(16.697, abs=1e-3)
    assert plan.decode_tokens_per_s_at_max_length == pytest.approx(15.665, abs=1e-3)
    # 4096 does not: 6_014_677_280 (all but KV) + 1 GiB = 7_088_419_104 B = 6.60 GiB; the longest that fits is
    # (6_979_321_856 − 6_014_677_280) / 262_144 = 3679 → 3584, saving 512 × 262_144 = 0.125 GiB
    with pytest.raises(FitError) as err:
        plan_for_target(
            nano,
            vision_weight_bytes=VISION_BYTES,
            llm_weight_bytes=llm_int4,
            kv_bytes_per_token=kv_per_token,
            max_length=4096,
            precision="int4",
        )
    text = str(err.value)
    assert "needs 6.60 GiB" in text and "--max-length 3584 (from 4096) saves 0.12 GiB of KV cache: fits" in text
    assert "would need 6.10 GiB — fits" in text  # 6_014_677_280 + 0.5 GiB with one buffer


def test_strict_build_refuses_what_cannot_be_built(nano):
    with pytest.raises(FitError, match="TensorRT build does not fit"):
        plan_for_target(
            nano,
            vision_weight_bytes=VISION_BYTES,
            llm_weight_bytes=LLM_INT4,
            kv_bytes_per_token=KV_PER_TOKEN,
            max_length=1024,
            precision="int4",
            strict_build=True,
        )


def test_fp8_on_orin_is_an_error_naming_devices_that_have_it(nano):
    with pytest.raises(UnsupportedPrecisionError) as err:
        plan_for_target(
            nano, vision_weight_bytes=1, llm_weight_bytes=1, kv_bytes_per_token=1, max_length=8, precision="fp8"
        )
    assert "cannot run fp8" in str(err.value) and "h100" in str(err.value) and "l4" in str(err.value)
    assert isinstance(err.value, FitError)


def test_batch_suggestion_from_the_numbers():
    assert plan_for_target(
        load_profile("h200"),
        vision_weight_bytes=VISION_BYTES,
        llm_weight_bytes=LLM_FP16,
        kv_bytes_per_token=KV_PER_TOKEN,
        max_length=4096,
        precision="fp16",
        max_batch=8,
    ).fits
    # L4: 23.5 GiB usable = 25_232_932_864; fixed = 0.6e9 + 13.48e9 + 1.25 GiB = 15_422_177_280;
    # room 9_810_755_584 / (524_288 × 2048 × 2 buffers = 2 GiB per sequence) = 4.57 → batch 4
    with pytest.raises(FitError, match=r"--max-batch 4: fits \(KV cache 8.00 GiB\)"):
        plan_for_target(
            load_profile("l4"),
            vision_weight_bytes=VISION_BYTES,
            llm_weight_bytes=LLM_FP16,
            kv_bytes_per_token=KV_PER_TOKEN,
            max_length=2048,
            precision="fp16",
            max_batch=8,
        )


def test_export_with_target_writes_the_plan_and_refuses_what_does_not_fit(tiny_checkpoints, tmp_path):
    """`edgelvm export --target`: the tiny model fits a Jetson and its plan lands in the manifest; an unknown
    device and an unsupported precision fail before any tracing, leaving nothing behind."""
    from edgelvm.errors import EdgeLVMError
    from edgelvm.export import ExportConfig, export
    from edgelvm.manifest import Manifest

    bundle = export(
        tiny_checkpoints["llama-clip"],
        tmp_path / "b",
        ExportConfig(max_length=128, dtype="fp16", target="jetson-orin-nano-8gb"),
    )
    plan = Manifest.load(bundle.bundle_dir).target
    assert plan["profile"] == "jetson-orin-nano-8gb" and plan["fits"] and plan["max_length"] == 128
    assert plan["predicted_decode_tokens_per_s"] > 0
    with pytest.raises(EdgeLVMError, match="jetson-orin-nano-8gb"):
        export(tiny_checkpoints["llama-clip"], tmp_path / "c", ExportConfig(target="jetson-orin-nano-9gb"))
    assert not (tmp_path / "c").exists()

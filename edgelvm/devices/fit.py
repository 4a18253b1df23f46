"""The fit check: will this model, at this precision and context, run on that device — and if not, what would?

Plain numbers in, plain numbers out (no torch, no bundle): ``edgelvm export --target`` computes the byte counts from
the model it is exporting, and anyone can call it from a notebook with numbers from a model card.

Budget (all resident at once during generation)::

    vision weights + LLM weights + KV cache (kv_bytes_per_token × max_length × max_batch × kv_buffers)
      + hybrid decoders' fixed-size states (state_bytes × max_batch × kv_buffers: constant in max_length)
      + sliding-window layers' caches (window_kv_bytes_per_token × min(max_length, window) × max_batch × kv_buffers)
      + activations (TensorRT's activation scratch; DEFAULT_ACTIVATION_BYTES unless given)
      + runtime overhead (RUNTIME_OVERHEAD_BYTES: CUDA context, TensorRT/cuBLAS kernels, the Python process)
    ≤ profile.usable_memory_bytes

``kv_buffers`` defaults to 2 because every GPU path today runs the portable decoder graph, which concatenates past
and new keys (a plain transformers export): the TensorRT backend keeps two full-length device buffers per layer and
ping-pongs between them (the present output cannot alias the past input: its stride along the sequence differs), and
ONNX Runtime's CUDA provider allocates each step's present while the past is still bound (at least two at the
peak). The fused decoder (``decoder_ort.onnx``) writes its cache in place — one buffer — but the runtime runs it on
ONNX Runtime CPU only (its cache is bound from host memory; TensorRT cannot parse its contrib ops). Pass
``kv_buffers=1`` for that path; a refusal that only the second buffer causes says so in its suggestions.

The TensorRT *build* is checked separately: the builder holds about 3-4x the parameter bytes of the graph it builds
(TensorRT-Edge-LLM's measurement), and edgelvm builds on the device. Graphs are built one at a time, so the peak
is BUILD_PEAK_FACTOR × the larger graph's weights + runtime overhead. A build that does not fit is a warning with a
swap suggestion (it can still succeed, slowly, with swap), or an error with ``strict_build=True``.

Decode speed is bandwidth-bound: each token reads every LLM weight once plus the KV cache so far, so
tokens/s ≤ bandwidth / (LLM weight bytes + KV bytes at that context) (edgelvm.devices.roofline).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgelvm.devices.profiles import GIB, DeviceProfile, list_profiles
from edgelvm.errors import EdgeLVMError

log = logging.getLogger(__name__)

#: CUDA context (lazy module loading) + TensorRT runtime and its cuBLAS/cuDNN kernels + the Python process with
#: numpy/tokenizers. An estimate (0.75 GiB), not a measurement: ``edgelvm bench`` reports the real peak.
RUNTIME_OVERHEAD_BYTES = 3 * GIB // 4
#: TensorRT activation scratch (the engine's device memory) when the caller does not know it: 0.5 GiB. After
#: ``edgelvm build`` the measured value from the engine should be passed instead.
DEFAULT_ACTIVATION_BYTES = GIB // 2
#: The TensorRT builder's peak relative to the parameter bytes of the graph being built (TensorRT-Edge-LLM: ~3-4x; we
#: take the upper end so "fits" means fits).
BUILD_PEAK_FACTOR = 4.0
#: Effective bits per parameter of each weight format, scales included. int4: 4-bit weights, group 128, an fp16
#: scale per group (+0.125) and the layers kept in higher precision (norms, lm_head rows) rounded up to 4.5 in
#: total — the figure quoted for AWQ/GPTQ 7B checkpoints. fp4 (NVFP4): 4 bits + an fp8 scale per 16 = 4.5.
#: int8 / fp8: per-channel scales are negligible (< 0.01 bit).
BITS_PER_PARAM = {
    "fp32": 32.0,
    "tf32": 32.0,
    "fp16": 16.0,
    "bf16": 16.0,
    "int8": 8.0,
    "fp8": 8.0,
    "int4": 4.5,
    "fp4": 4.5,
}
#: Context lengths are suggested in multiples of this (TensorRT profiles and attention kernels like round numbers).
LENGTH_STEP = 256


class FitError(EdgeLVMError):
    """The model does not fit the target device's memory (the message holds the budget and what would fit)."""


class UnsupportedPrecisionError(FitError):
    """The target device cannot run a requested precision (e.g. fp8 on Orin, which is SM 8.7)."""


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass
class TargetPlan:
    """The fit check's verdict for one device, with every number it used."""

    profile: DeviceProfile
    precision: str
    vision_precision: str
    max_length: int
    max_batch: int
    budget: dict[str, int]  # item → bytes, in table order; sums to total_bytes
    total_bytes: int
    usable_bytes: int
    build_peak_bytes: int
    decode_tokens_per_s: float  # roofline, batch 1, empty context
    decode_tokens_per_s_at_max_length: float  # roofline, batch 1, context = max_length
    suggestions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kv_buffers: int = 2
    kv_bytes_per_token: int = 0
    state_bytes: int = 0  # per sequence (hybrid decoders), whatever the length
    window_kv_bytes_per_token: int = 0  # sliding-window layers, counted at min(max_length, window) positions
    window: int = 0

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    @property
    def build_fits(self) -> bool:
        return self.build_peak_bytes <= self.usable_bytes

    def longest_fitting_length(self) -> int:
        """The largest context whose KV cache fits next to everything else (exact, in tokens; 0 if none)."""
        per_token = self.kv_bytes_per_token * self.max_batch * self.kv_buffers
        fixed = self.total_bytes - per_token * self.max_length
        return max(0, (self.usable_bytes - fixed) // per_token) if per_token > 0 else 0

    def table(self) -> str:
        width = max(len(k) for k in self.budget) + 2
        lines = [f"  {k:<{width}}{gib(v):>12}" for k, v in self.budget.items()]
        lines.append(f"  {'total':<{width}}{gib(self.total_bytes):>12}")
        lines.append(f"  {'usable on device':<{width}}{gib(self.usable_bytes):>12}")
        lines.append(f"  {'headroom':<{width}}{gib(self.headroom_bytes):>12}")
        lines.append(f"  {'TensorRT build peak':<{width}}{gib(self.build_peak_bytes):>12}")
        return "\n".join(lines)

    def summary(self) -> str:
        verdict = "fits" if self.fits else f"does NOT fit (short by {gib(-self.headroom_bytes)})"
        head = (
            f"{self.profile.display_name} [{self.profile.name}], LLM {self.precision}, vision {self.vision_precision}, "
            f"max_length {self.max_length}, batch {self.max_batch}: {verdict}; roofline decode "
            f"≤ {self.decode_tokens_per_s:.1f} tok/s ({self.decode_tokens_per_s_at_max_length:.1f} at full context)"
        )
        return "\n".join([head, self.table(), *(f"  ! {w}" for w in self.warnings)])

    def to_manifest(self) -> dict[str, Any]:
        """Plain JSON for ``Manifest.target``."""
        return {
            "profile": self.profile.name,
            "display_name": self.profile.display_name,
            "compute_capability": self.profile.compute_capability,
            "precision": self.precision,
            "vision_precision": self.vision_precision,
            "max_length": self.max_length,
            "max_batch": self.max_batch,
            "budget_bytes": dict(self.budget),
            "total_bytes": self.total_bytes,
            "usable_bytes": self.usable_bytes,
            "headroom_bytes": self.headroom_bytes,
            "fits": self.fits,
            "build_peak_bytes": self.build_peak_bytes,
            "build_fits": self.build_fits,
            "predicted_decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "predicted_decode_tokens_per_s_at_max_length": round(self.decode_tokens_per_s_at_max_length, 2),
            "memory_bandwidth_gbps": self.profile.memory_bandwidth_gbps,
            "assumptions": {
                "runtime_overhead_bytes": RUNTIME_OVERHEAD_BYTES,
                "build_peak_factor": BUILD_PEAK_FACTOR,
                "kv_buffers": self.kv_buffers,
                "bits_per_param": BITS_PER_PARAM[self.precision],
            },
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class _Inputs:
    vision_weight_bytes: int
    llm_weight_bytes: int
    kv_bytes_per_token: int
    max_length: int
    max_batch: int
    activation_bytes: int
    kv_buffers: int
    state_bytes: int = 0
    window_kv_bytes_per_token: int = 0
    window: int = 0

    def window_positions(self, length: int) -> int:
        return min(length, self.window) if self.window else length

    def budget(self, llm_bytes: int | None = None, max_length: int | None = None, batch: int | None = None) -> dict:
        length = self.max_length if max_length is None else max_length
        rows = self.max_batch if batch is None else batch
        kv = f"KV cache ({length} tok × {rows} × {self.kv_buffers} buf)"
        if self.window_kv_bytes_per_token:
            kv = f"KV cache, global layers ({length} tok × {rows} × {self.kv_buffers} buf)"
        states = {f"decoder states (any length × {rows} × {self.kv_buffers} buf)": self.state_bytes * rows
                  * self.kv_buffers} if self.state_bytes else {}  # fmt: skip
        if self.window_kv_bytes_per_token:
            held = self.window_positions(length)
            states[f"KV cache, sliding-window layers ({held} tok × {rows} × {self.kv_buffers} buf)"] = (
                self.window_kv_bytes_per_token * held * rows * self.kv_buffers
            )
        return {
            "vision weights": self.vision_weight_bytes,
            "LLM weights": self.llm_weight_bytes if llm_bytes is None else llm_bytes,
            kv: self.kv_bytes_per_token * length * rows * self.kv_buffers,
            **states,
            "activations": self.activation_bytes,
            "runtime overhead": RUNTIME_OVERHEAD_BYTES,
        }


def check_precision(profile: DeviceProfile, precision: str, what: str = "precision") -> None:
    if precision not in BITS_PER_PARAM:
        raise UnsupportedPrecisionError(
            f"unknown {what} {precision!r}", where=what, fix=f"use one of: {', '.join(BITS_PER_PARAM)}"
        )
    if not profile.supports(precision):
        others = [p.name for p in list_profiles() if p.supports(precision)]
        raise UnsupportedPrecisionError(
            f"{profile.display_name} (SM {profile.compute_capability}) cannot run {precision} "
            f"(it supports: {', '.join(profile.precisions)})",
            where=what,
            fix=f"choose one of {', '.join(profile.precisions)}"
            + (f", or target a device that has {precision}: {', '.join(others)}" if others else ""),
        )


def plan_for_target(
    profile: DeviceProfile,
    *,
    vision_weight_bytes: int,
    llm_weight_bytes: int,
    kv_bytes_per_token: int,
    max_length: int,
    precision: str,
    max_batch: int = 1,
    activation_bytes: int | None = None,
    vision_precision: str = "fp16",
    kv_buffers: int = 2,
    strict_build: bool = False,
    candidates: Sequence[DeviceProfile] | None = None,
    state_bytes: int = 0,
    window_kv_bytes_per_token: int = 0,
    window: int = 0,
) -> TargetPlan:
    """Check that a model fits ``profile``; return the plan or raise :class:`FitError` with suggestions.

    :func:`evaluate_target` takes the same arguments and returns the plan either way (``plan.fits``).

    ``llm_weight_bytes``: the decoder's weights as stored (lm_head included; the embedding table only if it is kept
    resident — it is memory-mapped and gathered, so usually only touched rows are). ``precision``: the LLM weights'
    format (``fp16``, ``int8``, ``int4``, ...), used for the precision check and to compute what INT4 would save.
    ``kv_bytes_per_token``: 2 × layers × kv_heads × head_dim × bytes per element (attention layers only).
    ``state_bytes``: a hybrid decoder's fixed-size states per sequence (linear-attention / convolution layers), read
    and written every step whatever the context. ``window_kv_bytes_per_token`` / ``window``: sliding-window layers
    whose caches hold at most ``window`` positions (``kv_bytes_per_token`` then counts the global layers only).
    ``candidates``: devices to suggest instead (default: every known profile).
    """
    plan = evaluate_target(
        profile,
        vision_weight_bytes=vision_weight_bytes,
        llm_weight_bytes=llm_weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token,
        max_length=max_length,
        precision=precision,
        max_batch=max_batch,
        activation_bytes=activation_bytes,
        vision_precision=vision_precision,
        kv_buffers=kv_buffers,
        candidates=candidates,
        state_bytes=state_bytes,
        window_kv_bytes_per_token=window_kv_bytes_per_token,
        window=window,
    )
    if plan.fits and not (strict_build and not plan.build_fits):
        for warning in plan.warnings:
            log.warning("%s: %s", profile.name, warning)
        return plan
    what = "the TensorRT build does not fit" if plan.fits else "the model does not fit"
    raise FitError(
        f"{what} on {profile.display_name}: needs {gib(plan.total_bytes)} at runtime"
        f" ({gib(plan.build_peak_bytes)} to build), {gib(plan.usable_bytes)} usable\n{plan.table()}\n"
        + "\n".join(f"  ! {w}" for w in plan.warnings),
        where=f"target {profile.name}",
        fix="\n" + "\n".join(f"  - {s}" for s in plan.suggestions),
    )


def evaluate_target(
    profile: DeviceProfile,
    *,
    vision_weight_bytes: int,
    llm_weight_bytes: int,
    kv_bytes_per_token: int,
    max_length: int,
    precision: str,
    max_batch: int = 1,
    activation_bytes: int | None = None,
    vision_precision: str = "fp16",
    kv_buffers: int = 2,
    candidates: Sequence[DeviceProfile] | None = None,
    state_bytes: int = 0,
    window_kv_bytes_per_token: int = 0,
    window: int = 0,
) -> TargetPlan:
    """:func:`plan_for_target`'s numbers without the verdict: the plan whether it fits or not (suggestions filled
    in when it does not fit at runtime or to build). Raises only for an unsupported precision or a bad size."""
    check_precision(profile, precision, "precision")
    check_precision(profile, vision_precision, "vision_precision")
    for name, value in (("max_length", max_length), ("max_batch", max_batch), ("kv_buffers", kv_buffers)):
        if value < 1:
            raise FitError(f"{name} must be ≥ 1, got {value}", where=name, fix="pass a positive number")
    inputs = _Inputs(
        vision_weight_bytes=int(vision_weight_bytes),
        llm_weight_bytes=int(llm_weight_bytes),
        kv_bytes_per_token=int(kv_bytes_per_token),
        max_length=int(max_length),
        max_batch=int(max_batch),
        activation_bytes=DEFAULT_ACTIVATION_BYTES if activation_bytes is None else int(activation_bytes),
        kv_buffers=int(kv_buffers),
        state_bytes=int(state_bytes),
        window_kv_bytes_per_token=int(window_kv_bytes_per_token),
        window=int(window),
    )
    budget = inputs.budget()
    window_read = inputs.window_kv_bytes_per_token * inputs.window_positions(inputs.max_length)
    bandwidth = profile.bandwidth_bytes_per_s
    plan = TargetPlan(
        profile=profile,
        precision=precision,
        vision_precision=vision_precision,
        max_length=inputs.max_length,
        max_batch=inputs.max_batch,
        budget=budget,
        total_bytes=sum(budget.values()),
        usable_bytes=profile.usable_memory_bytes,
        build_peak_bytes=int(BUILD_PEAK_FACTOR * max(inputs.vision_weight_bytes, inputs.llm_weight_bytes))
        + RUNTIME_OVERHEAD_BYTES,
        decode_tokens_per_s=bandwidth / (inputs.llm_weight_bytes + 2 * inputs.state_bytes),
        decode_tokens_per_s_at_max_length=bandwidth
        / (
            inputs.llm_weight_bytes
            + 2 * inputs.state_bytes
            + inputs.kv_bytes_per_token * inputs.max_length
            + window_read
        ),
        kv_buffers=inputs.kv_buffers,
        kv_bytes_per_token=inputs.kv_bytes_per_token,
        state_bytes=inputs.state_bytes,
        window_kv_bytes_per_token=inputs.window_kv_bytes_per_token,
        window=inputs.window,
    )
    if not plan.build_fits:
        swap = plan.build_peak_bytes - plan.usable_bytes
        plan.warnings.append(
            f"the on-device TensorRT build peaks at ~{gib(plan.build_peak_bytes)} ({BUILD_PEAK_FACTOR:g}x the larger "
            f"graph's weights + overhead) but {gib(plan.usable_bytes)} is usable: add ≥ {gib(swap)} of swap "
            "(NVMe on Jetson) for `edgelvm build`, which then runs slowly"
        )
    if not (plan.fits and plan.build_fits):
        plan.suggestions = _suggestions(plan, inputs, candidates)
    return plan


def _longest_fitting(usable: int, fixed: int, per_token: int) -> int:
    """Largest multiple of LENGTH_STEP whose KV cache fits next to ``fixed`` bytes (0 if none)."""
    if per_token <= 0:
        return 0
    return max(0, (usable - fixed) // per_token // LENGTH_STEP * LENGTH_STEP)


def _suggestions(plan: TargetPlan, inputs: _Inputs, candidates: Sequence[DeviceProfile] | None) -> list[str]:
    usable, out = plan.usable_bytes, []
    kv_row = inputs.kv_bytes_per_token * inputs.max_batch * inputs.kv_buffers
    fixed = plan.total_bytes - kv_row * inputs.max_length  # everything except the KV cache
    # 1. INT4 (or FP4) LLM weights.
    llm_params = inputs.llm_weight_bytes * 8 / BITS_PER_PARAM[plan.precision]
    int4_bytes = int(llm_params * BITS_PER_PARAM["int4"] / 8)
    if plan.precision not in ("int4", "fp4") and plan.profile.supports("int4"):
        total = sum(inputs.budget(llm_bytes=int4_bytes).values())
        verdict = "fits" if total <= usable else f"still short by {gib(total - usable)}"
        out.append(
            f"INT4 the LLM (AWQ, {BITS_PER_PARAM['int4']:g} bits/param effective): its weights would need "
            f"{gib(int4_bytes)} instead of {gib(inputs.llm_weight_bytes)}, total {gib(total)} — {verdict}"
        )
        int4_fixed = fixed - inputs.llm_weight_bytes + int4_bytes
        longest = min(_longest_fitting(usable, int4_fixed, kv_row), inputs.max_length)
        if total > usable and longest >= LENGTH_STEP:
            out.append(f"INT4 the LLM and export with --max-length {longest}: fits (KV cache {gib(longest * kv_row)})")
    # 2. A shorter context.
    longest = _longest_fitting(usable, fixed, kv_row)
    if longest >= LENGTH_STEP and longest < inputs.max_length:
        saved = (inputs.max_length - longest) * kv_row
        out.append(f"--max-length {longest} (from {inputs.max_length}) saves {gib(saved)} of KV cache: fits")
    elif inputs.max_length > LENGTH_STEP:
        half = max(LENGTH_STEP, inputs.max_length // 2 // LENGTH_STEP * LENGTH_STEP)
        out.append(
            f"--max-length {half} saves {gib((inputs.max_length - half) * kv_row)} of KV cache (not enough alone)"
        )
    # 3. A smaller batch.
    if inputs.max_batch > 1:
        per_batch = inputs.kv_bytes_per_token * inputs.max_length * inputs.kv_buffers
        rows = (usable - fixed) // per_batch if usable > fixed else 0
        if 1 <= rows < inputs.max_batch:
            out.append(f"--max-batch {rows}: fits (KV cache {gib(rows * per_batch)})")
    # 4. An in-place cache: named when the second buffer alone is what does not fit, so the reader sees why (it is
    #    not an option on a GPU today). A lower-precision KV cache is not offered: the KV dtype follows the graph's.
    if inputs.kv_buffers > 1:
        one = inputs.kv_bytes_per_token * inputs.max_length * inputs.max_batch
        in_place = fixed + one
        if in_place <= usable:
            out.append(
                f"the KV cache above counts {inputs.kv_buffers} buffers (GPU runtimes today ping-pong past and "
                f"present); with an in-place cache (1 buffer: the fused decoder, ONNX Runtime CPU only so far) it "
                f"would need {gib(in_place)} — fits"
            )
    # 5. A larger device, same numbers.
    bigger = [
        p
        for p in (candidates if candidates is not None else list_profiles())
        if p.name != plan.profile.name
        and p.supports(plan.precision)
        and p.supports(plan.vision_precision)
        and p.usable_memory_bytes >= plan.total_bytes
    ]
    bigger.sort(key=lambda p: (p.kind != plan.profile.kind, p.usable_memory_bytes, p.name))  # same kind first
    if bigger:
        listed = ", ".join(f"{p.name} ({gib(p.usable_memory_bytes)} usable)" for p in bigger[:3])
        out.append(f"a larger device as is: {listed}")
    if not plan.build_fits:
        out.append(
            f"for the on-device build: add ≥ {gib(plan.build_peak_bytes - usable)} of swap (NVMe on Jetson), or "
            "build where the same GPU has more memory"
        )
    return out

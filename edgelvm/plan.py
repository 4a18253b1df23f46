"""``edgelvm plan``: will it fit? Answered from the config alone, before a byte of weights is loaded.

The byte counts come from the family's adapter over the transformers config
(:meth:`~edgelvm.models.base.VLMAdapter.config_parameter_counts`: plain arithmetic, equal to the loaded model's
parameter counts) and go through the same fit check as ``edgelvm export --target``
(:func:`edgelvm.devices.fit.evaluate_target`), which computes them from the loaded model with
:func:`footprint_of_adapter`: the two give the same numbers (``tests/test_plan.py``). Where the checkpoint's weights
are present, the safetensors headers (JSON at the head of each file — never tensor data) are read to cross-check
the parameter count the config describes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelvm.devices.fit import BITS_PER_PARAM, LENGTH_STEP, TargetPlan, evaluate_target
from edgelvm.devices.profiles import DeviceProfile
from edgelvm.errors import ConfigError, ExportError
from edgelvm.models.checkpoint.quantized import RECORD

#: Weight formats ``edgelvm plan --precision`` / ``--vision-precision`` accept.
PLAN_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
#: The context ``edgelvm export`` defaults to: the model's max_position_embeddings, capped here.
DEFAULT_MAX_LENGTH_CAP = 4096


def weight_bytes(params: int, precision: str) -> int:
    """Bytes of ``params`` parameters stored as ``precision`` (BITS_PER_PARAM: int4 is 4.5 bits with its scales)."""
    return int(params * BITS_PER_PARAM[precision] / 8)


def default_head_precision(precision: str) -> str:
    """The LM head's precision when not given: the model's for float precisions; fp16 next to INT8/INT4 layers,
    as ``edgelvm quantize`` keeps the head float unless ``--lm-head int8|int4``."""
    return precision if precision in ("fp32", "fp16", "bf16") else "fp16"


def quantized_precisions(config: Any, dtype: str) -> tuple[str, str]:
    """``(layers, head)`` precisions of a checkpoint exported in ``dtype``: its ``edgelvm_quantization`` record's
    (a plain dict, or an attribute of a transformers config) where it has one."""
    record = config.get(RECORD) if isinstance(config, dict) else getattr(config, RECORD, None)
    llm = (record or {}).get("llm") or {}
    layers = f"int{llm['bits']}" if llm.get("bits") in (4, 8) else dtype
    head_bits = (llm.get("lm_head") or {}).get("bits")
    return layers, f"int{head_bits}" if head_bits in (4, 8) else ("fp16" if dtype == "fp16" else "fp32")


def kv_dtype_for(precision: str) -> str:
    """The KV cache's element type: the graph's compute type (fp32 graphs keep fp32, everything else fp16)."""
    return "float32" if precision == "fp32" else "float16"


@dataclass(frozen=True)
class ModelFootprint:
    """What the fit check needs from a model, in parameters and KV geometry (precision-free)."""

    source: str
    family: str
    vision_params: int
    decoder_params: int
    kv_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int
    checkpoint_params: int | None = None  # from the safetensors headers, when the weights are present
    notes: tuple[str, ...] = ()
    head_params: int = 0  # the LM head's share of decoder_params (vocab x hidden), which may have its own precision
    #: a hybrid decoder's fixed-size states per sequence (linear-attention / convolution layers; kv_layers then
    #: counts its attention layers only), at their own dtype: the same at any context length
    state_bytes: int = 0
    #: sliding-window layers (of ``kv_layers``) whose caches hold at most ``window`` positions at any context
    window_layers: int = 0
    window: int = 0

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """Per token of context: the layers that keep the whole context (global layers)."""
        layers = self.kv_layers - self.window_layers
        return 2 * layers * self.kv_heads * self.head_dim * (4 if kv_dtype == "float32" else 2)

    def window_kv_bytes_per_token(self, kv_dtype: str) -> int:
        """Per position of the sliding-window layers' caches (counted at ``min(max_length, window)``)."""
        return 2 * self.window_layers * self.kv_heads * self.head_dim * (4 if kv_dtype == "float32" else 2)

    def default_max_length(self) -> int:
        return min(self.max_positions, DEFAULT_MAX_LENGTH_CAP)

    def fit_arguments(
        self, *, precision: str, vision_precision: str, max_length: int, kv_dtype: str | None = None,
        head_precision: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Keyword arguments for :func:`~edgelvm.devices.fit.plan_for_target` / ``evaluate_target``.
        ``head_precision``: the LM head's (default :func:`default_head_precision`)."""
        head = head_precision or default_head_precision(precision)
        llm_bytes = weight_bytes(self.decoder_params - self.head_params, precision)
        return {
            "vision_weight_bytes": weight_bytes(self.vision_params, vision_precision),
            "llm_weight_bytes": llm_bytes + weight_bytes(self.head_params, head),
            "kv_bytes_per_token": self.kv_bytes_per_token(kv_dtype or kv_dtype_for(precision)),
            "state_bytes": self.state_bytes,
            "window_kv_bytes_per_token": self.window_kv_bytes_per_token(kv_dtype or kv_dtype_for(precision)),
            "window": self.window,
            "max_length": max_length,
            "precision": precision,
            "vision_precision": vision_precision,
        }

    def check_max_length(self, max_length: int, option: str = "--max-length") -> int:
        if max_length < 2 or max_length > self.max_positions:
            raise ConfigError(
                f"max_length {max_length} is outside [2, {self.max_positions}] (the model's max_position_embeddings)",
                where=option,
                fix=f"pick a value up to {self.max_positions}",
            )
        return max_length


def footprint_of_adapter(adapter: Any, *, from_config: bool = False) -> ModelFootprint:
    """The footprint of a loaded adapter (its modules' parameters) or, with ``from_config``, of an adapter built by
    :meth:`~edgelvm.models.base.VLMAdapter.for_config` (arithmetic over the config)."""
    counts = adapter.config_parameter_counts() if from_config else adapter.parameter_counts()
    kv = adapter.kv_cache_spec(max_length=1, dtype="float16")
    windows = adapter.kv_windows() or []
    return ModelFootprint(
        source=str(adapter.source),
        family=adapter.family,
        vision_params=counts.vision,
        decoder_params=counts.decoder,
        kv_layers=kv.num_layers,
        kv_heads=kv.num_kv_heads,
        head_dim=kv.head_dim,
        max_positions=adapter.max_positions(),
        head_params=int(adapter.text_config.vocab_size) * int(adapter.text_config.hidden_size),
        state_bytes=kv.state_bytes(),
        window_layers=sum(w is not None for w in windows),
        window=max((w for w in windows if w is not None), default=0),
    )


def plan_config(model: str | Path) -> tuple[Any, str]:
    """``(config, source)`` for the plan's arithmetic. A local directory of a family that counts by arithmetic is
    read as plain data (:mod:`edgelvm.models.config_json`: no transformers import, ~3 s less per process); other
    families, hub ids and classes outside the defaults snapshot go through transformers."""
    from edgelvm.models.base import VLMAdapter
    from edgelvm.models.config_json import read_plain_config
    from edgelvm.models.registry import adapter_for_model_type, load_config, read_config_json

    path = Path(model)
    if path.is_dir():
        raw = read_config_json(path)
        adapter = adapter_for_model_type(raw["model_type"], where=path)
        if adapter.config_parameter_counts is not VLMAdapter.config_parameter_counts:
            plain = read_plain_config(adapter.plain_config_layout(raw), where=path / "config.json")
            if plain is not None:
                return plain, str(path)
    return load_config(model)


def footprint_from_config(model: str | Path) -> ModelFootprint:
    """The footprint of a checkpoint from its config.json (a local directory; or a hub id, online) — no weights
    read, no torch model built. Local weights, if any, are cross-checked through their safetensors headers."""
    from edgelvm.models.registry import adapter_for_model_type

    config, source = plan_config(model)
    adapter = adapter_for_model_type(config.model_type, where=source).for_config(config, source)
    try:
        footprint = footprint_of_adapter(adapter, from_config=True)
    except (AttributeError, TypeError, ValueError, KeyError, ZeroDivisionError) as err:
        raise ExportError(
            f"config.json does not describe the model's sizes ({type(err).__name__}: {err})",
            where=Path(source) / "config.json" if Path(source).is_dir() else source,
            fix="restore the checkpoint's config.json (a hand-edited or truncated file?)",
        ) from None
    path = Path(source)
    if not path.is_dir():
        return footprint
    counted = checkpoint_parameter_count(path)
    if counted is None:
        return footprint
    notes = []
    text = adapter.text_config
    described = footprint.vision_params + footprint.decoder_params
    embedding = int(text.vocab_size) * int(text.hidden_size)
    if not 0.99 * described <= counted <= 1.01 * (described + embedding):
        notes.append(
            f"the weights hold {counted / 1e9:.3f}B parameters (safetensors headers) but the config describes "
            f"{described / 1e9:.3f}B–{(described + embedding) / 1e9:.3f}B: a pruned or modified checkpoint? The plan "
            "counts what the config describes; `edgelvm export --target` counts the loaded model"
        )
    return ModelFootprint(**{**footprint.__dict__, "checkpoint_params": counted, "notes": tuple(notes)})


_DTYPE_OK = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2")


def checkpoint_parameter_count(model_dir: str | Path) -> int | None:
    """Elements of every tensor in the checkpoint's safetensors weight files, from their headers only (the first
    8 + N bytes of each file); ``None`` without safetensors weights or with an unreadable header."""
    from edgelvm.models.registry import weight_files

    files = [f for f in weight_files(model_dir) if f.suffix == ".safetensors"]
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with file.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > 100_000_000:
                    return None
                header = json.loads(handle.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
            return None
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            count = 1
            for dim in entry.get("shape", []):
                count *= int(dim)
            total += count
    return total


@dataclass
class PlanRow:
    """One device's answer."""

    profile: DeviceProfile
    plan: TargetPlan | None  # None: the device cannot run the precision
    error: str | None = None
    longest_context: int = 0  # tokens, capped at the model's max_position_embeddings
    tokens_per_s_short: float = 0.0
    tokens_per_s_at_max: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"profile": self.profile.name, "display_name": self.profile.display_name}
        if self.plan is None:
            return {**out, "supported": False, "error": self.error}
        plan = self.plan
        return {
            **out,
            "supported": True,
            **{k: v for k, v in plan.to_manifest().items() if k not in ("profile", "display_name")},
            "longest_fitting_context": self.longest_context,
            "suggestions": list(plan.suggestions),
        }


@dataclass
class ModelPlan:
    """``edgelvm plan``'s answer: the footprint, the settings and one row per device."""

    footprint: ModelFootprint
    precision: str
    vision_precision: str
    max_length: int
    max_batch: int
    kv_dtype: str
    rows: list[PlanRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        fp = self.footprint
        return {
            "model": fp.source,
            "family": fp.family,
            "parameters": {
                "vision": fp.vision_params,
                "decoder": fp.decoder_params,
                "checkpoint": fp.checkpoint_params,
            },
            "kv_cache": {
                "layers": fp.kv_layers,
                "kv_heads": fp.kv_heads,
                "head_dim": fp.head_dim,
                "dtype": self.kv_dtype,
                "bytes_per_token": fp.kv_bytes_per_token(self.kv_dtype),
                "state_bytes_per_sequence": fp.state_bytes,
                "window_layers": fp.window_layers,
                "window": fp.window,
                "window_bytes_per_position": fp.window_kv_bytes_per_token(self.kv_dtype),
            },
            "max_position_embeddings": fp.max_positions,
            "precision": self.precision,
            "vision_precision": self.vision_precision,
            "max_length": self.max_length,
            "max_batch": self.max_batch,
            "notes": list(fp.notes),
            "targets": [row.to_dict() for row in self.rows],
        }


def plan_model(
    footprint: ModelFootprint,
    profiles: Sequence[DeviceProfile],
    *,
    precision: str = "fp16",
    vision_precision: str | None = None,
    max_length: int | None = None,
    max_batch: int = 1,
    candidates: Sequence[DeviceProfile] | None = None,
    head_precision: str | None = None,
) -> ModelPlan:
    """The fit check of ``footprint`` on every profile (never raises for a model that does not fit: see rows)."""
    from edgelvm.devices.fit import UnsupportedPrecisionError

    for option, value in (("--precision", precision), ("--vision-precision", vision_precision or precision),
                          ("--lm-head-precision", head_precision or precision)):  # fmt: skip
        if value not in PLAN_PRECISIONS:
            fix = f"use one of {', '.join(PLAN_PRECISIONS)}"
            raise ConfigError(f"unknown precision {value!r}", where=option, fix=fix)
    # INT8 / INT4 apply to the LLM's weights; the vision graph stays fp16 unless told (INT8 is `--vision int8`).
    vision_precision = vision_precision or ("fp32" if precision == "fp32" else "fp16")
    length = footprint.check_max_length(max_length or footprint.default_max_length())
    if max_batch < 1:
        raise ConfigError(f"batch {max_batch} must be ≥ 1", where="--batch", fix="pass a positive number")
    kv_dtype = kv_dtype_for(precision)
    result = ModelPlan(footprint, precision, vision_precision, length, max_batch, kv_dtype)
    args = footprint.fit_arguments(precision=precision, vision_precision=vision_precision, max_length=length,
                                   head_precision=head_precision)  # fmt: skip
    for profile in profiles:
        try:
            plan = evaluate_target(profile, max_batch=max_batch, candidates=candidates, **args)
        except UnsupportedPrecisionError as err:
            result.rows.append(PlanRow(profile, None, error=err.problem))
            continue
        longest = min(plan.longest_fitting_length(), footprint.max_positions)
        if longest < footprint.max_positions:
            longest = longest // LENGTH_STEP * LENGTH_STEP if longest >= LENGTH_STEP else longest
        result.rows.append(
            PlanRow(
                profile,
                plan,
                longest_context=longest,
                tokens_per_s_short=plan.decode_tokens_per_s,
                tokens_per_s_at_max=plan.decode_tokens_per_s_at_max_length,
            )
        )
    return result

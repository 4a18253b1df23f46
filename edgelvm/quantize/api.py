"""``quantize(model, calib_data, QuantConfig) -> QuantReport`` — so far: INT4 weight-only RTN of the language model.

The quantized checkpoint is a normal Hugging Face checkpoint whose language-model linear weights are the
*dequantized* INT4 values (so PyTorch runs exactly the quantized model), plus ``int4.safetensors`` with the codes and
scales and a ``config.edgelvm_quantization`` record. ``edgelvm export`` writes those codes into the fused decoder as
``com.microsoft.MatMulNBits``; the portable decoder keeps the dequantized float weights for now.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import ConfigError
from edgelvm.fsutil import write_dir_atomically

RECORD = "edgelvm_quantization"
SIDECAR = "int4.safetensors"
LLM_METHODS = ("rtn",)


@dataclass
class QuantConfig:
    out: str | Path = "quantized"
    llm: str = "rtn"
    group_size: int = 128
    symmetric: bool = True
    force: bool = False

    def validate(self) -> None:
        from edgelvm.quantize.int4 import check_block_size

        if self.llm not in LLM_METHODS:
            raise ConfigError(
                f"llm method {self.llm!r} is not available yet",
                where="QuantConfig.llm",
                fix=f"use one of {', '.join(LLM_METHODS)} (AWQ and GPTQ are planned)",
            )
        check_block_size(self.group_size)


@dataclass
class QuantReport:
    out: str
    method: str
    group_size: int
    layers: list[dict[str, Any]] = field(default_factory=list)  # name, K, N, relative weight error
    kept_float: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _linear_layers(adapter: Any) -> dict[str, Any]:
    """``layers.{i}.<path>`` -> Linear, for every linear layer inside the language model's decoder layers."""
    import torch

    out = {}
    for i, layer in enumerate(adapter.layer_stacks()["text"]):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"layers.{i}.{name}"] = module
    return out


def quantize(model: str | Path | Any, calib_data: Any = None, config: QuantConfig | None = None) -> QuantReport:
    import torch
    from safetensors.numpy import save_file

    from edgelvm.models import load_model
    from edgelvm.quantize.int4 import quantize_rtn

    cfg = config or QuantConfig()
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.force:
        raise ConfigError("the output directory is not empty", where=out, fix="choose another --out, or pass --force")
    adapter = model if hasattr(model, "processor") else load_model(str(model))
    report = QuantReport(out=str(out), method=cfg.llm, group_size=cfg.group_size)
    report.kept_float = ["vision tower (INT8 planned)", "projector", "token embedding", "lm_head"]
    tensors: dict[str, np.ndarray] = {}
    for name, linear in _linear_layers(adapter).items():
        w = linear.weight.detach().float().numpy().T.copy()  # [K, N]; a copy: the weight is overwritten below
        q = quantize_rtn(w, cfg.group_size, cfg.symmetric)
        deq = q.dequantize()
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(deq.T.copy()).to(linear.weight.dtype))
        tensors[f"{name}.packed"] = q.packed
        tensors[f"{name}.scales"] = q.scales
        if q.zero_points is not None:
            tensors[f"{name}.zero_points"] = q.zero_points
        tensors[f"{name}.shape"] = np.array([q.k, q.n, q.block_size], dtype=np.int64)
        rel = float(np.linalg.norm(deq - w) / (np.linalg.norm(w) + 1e-12))
        report.layers.append({"name": name, "K": q.k, "N": q.n, "relative_error": round(rel, 6)})
        report.weight_bytes_before += w.size * 4
        report.weight_bytes_after += q.packed.size + q.scales.size * 4
    setattr(adapter.config, RECORD, {"llm": {"method": cfg.llm, "bits": 4, "group_size": cfg.group_size,
                                             "symmetric": cfg.symmetric, "file": SIDECAR}})  # fmt: skip

    def write(stage: Path) -> None:
        from edgelvm.prune.surgery import save_checkpoint_files

        save_checkpoint_files(adapter.model, adapter.processor, stage)
        save_file(tensors, str(stage / SIDECAR))
        (stage / "quant_report.json").write_text(json.dumps(report.to_dict(), indent=2))

    write_dir_atomically(out, write)
    return report


def load_int4(source: str | Path) -> dict[str, Any]:
    """The INT4 weights of a quantized checkpoint, by ``layers.{i}.<path>`` name."""
    from safetensors.numpy import load_file

    from edgelvm.quantize.int4 import Int4Weight

    tensors = load_file(str(Path(source) / SIDECAR))
    out = {}
    for key in tensors:
        if key.endswith(".shape"):
            name = key[: -len(".shape")]
            k, n, block = (int(x) for x in tensors[key])
            zp = tensors.get(f"{name}.zero_points")
            out[name] = Int4Weight(tensors[f"{name}.packed"], tensors[f"{name}.scales"], zp, k, n, block)
    return out

"""A quantized checkpoint's integer half: the record and sidecar files ``edgelvm quantize`` writes next to the
dequantized weights, and reading them back (export's writers, the fused decoder and the loader read them here).

- ``int4.safetensors`` (:data:`SIDECAR`): per language-model linear ``layers.{i}.<path>`` the packed INT4 codes,
  block scales, optional zero points and ``[K, N, block]`` (:class:`~edgelvm.models.checkpoint.codes.Int4Weight`);
- ``int8.safetensors`` (:data:`VISION_SIDECAR`): the vision encoder's INT8 layers by their path in the
  export-facing vision module; ``int8_llm.safetensors`` (:data:`LLM_INT8_SIDECAR`): SmoothQuant's language-model
  layers by ``layers.{i}.<path>`` — each the int8 codes ``[K, N]``, per-output-channel weight scales and the
  per-tensor input scale (:class:`~edgelvm.models.checkpoint.codes.Int8Linear`);
- ``config.edgelvm_quantization`` (:data:`RECORD`): what was done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import ConfigError, UnsupportedModelError
from edgelvm.models.checkpoint.codes import Int4Weight, Int8Linear

RECORD = "edgelvm_quantization"
#: Names in ``int4.safetensors`` besides the decoder layers' ``layers.{i}.<path>``: the quantized LM head and the
#: token embedding table's codes (for a tied head, the head's own codes).
HEAD_CODES = "lm_head"
TABLE_CODES = "embed_tokens"
SIDECAR = "int4.safetensors"
VISION_SIDECAR = "int8.safetensors"
LLM_INT8_SIDECAR = "int8_llm.safetensors"


def text_linears(adapter: Any) -> dict[str, Any]:
    """``layers.{i}.<path>`` -> Linear, for every linear layer inside the language model's decoder layers (the
    names the language-model sidecars use)."""
    import torch

    out = {}
    for i, layer in enumerate(adapter.layer_stacks()["text"]):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"layers.{i}.{name}"] = module
    return out


def int4_tensors(weights: dict[str, Int4Weight]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name, q in weights.items():
        tensors[f"{name}.packed"] = q.packed
        tensors[f"{name}.scales"] = q.scales
        if q.zero_points is not None:
            tensors[f"{name}.zero_points"] = q.zero_points
        tensors[f"{name}.shape"] = np.array([q.k, q.n, q.block_size, q.bits], dtype=np.int64)
    return tensors


def int8_tensors(layers: dict[str, Int8Linear]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name, layer in layers.items():
        tensors[f"{name}.codes"] = np.ascontiguousarray(layer.codes)
        tensors[f"{name}.weight_scales"] = np.ascontiguousarray(layer.weight_scales)
        tensors[f"{name}.input_scale"] = np.array([layer.input_scale], np.float32)
    return tensors


def load_int4(
    source: str | Path, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()
) -> dict[str, Int4Weight]:
    """The INT4 (and block-wise INT8) weights of a quantized checkpoint, by ``layers.{i}.<path>`` name (and
    :data:`HEAD_CODES`, :data:`TABLE_CODES`); ``only``: just these names, ``skip``: all but these (the rest is
    not read: the table's codes are a vocabulary's worth of bytes the decoder writers never use)."""
    from safetensors import safe_open

    def wanted(key: str) -> bool:
        name = key.rsplit(".", 1)[0]
        return (only is None or name in only) and name not in skip

    with safe_open(str(Path(source) / SIDECAR), framework="numpy") as file:
        keys = [k for k in file.keys() if wanted(k)]  # noqa: SIM118 (no __iter__)
        tensors = {k: file.get_tensor(k) for k in keys}
    out = {}
    for key in tensors:
        if key.endswith(".shape"):
            name = key[: -len(".shape")]
            k, n, block, *bits = (int(x) for x in tensors[key])  # checkpoints before the LM head option: 4 bits
            zp = tensors.get(f"{name}.zero_points")
            out[name] = Int4Weight(tensors[f"{name}.packed"], tensors[f"{name}.scales"], zp, k, n, block, *bits)
    return out


def load_int8(source: str | Path, file: str = VISION_SIDECAR) -> dict[str, Int8Linear]:
    """The INT8 layers of a quantized checkpoint: the vision encoder's by their path in the export-facing vision
    module (``int8.safetensors``), or SmoothQuant's language-model layers by ``layers.{i}.<path>``."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(source) / file))
    names = [key[: -len(".codes")] for key in tensors if key.endswith(".codes")]
    return {
        n: Int8Linear(tensors[f"{n}.codes"], tensors[f"{n}.weight_scales"], float(tensors[f"{n}.input_scale"][0]))
        for n in names
    }


def fused_decoder_int4(config: Any, source: str | Path | None) -> dict[str, Int4Weight] | None:
    """The INT4 weights the fused decoder writes as MatMulNBits (None for a float language model); a W8A8 language
    model has no fused form (UnsupportedModelError: export then writes only the portable, QDQ decoder)."""
    llm = (getattr(config, RECORD, None) or {}).get("llm")
    if not llm:
        return None
    if llm.get("bits") != 4:
        raise UnsupportedModelError(
            f"a W{llm.get('bits')}A{llm.get('bits')} ({llm.get('method')}) language model: the fused decoder has "
            "INT4 weight-only and float forms only",
            fix="it runs as QDQ in the portable decoder, which export writes",
        )
    if not source:
        raise ConfigError("an INT4 checkpoint loaded without its directory", where="model",
                          fix="export the directory `edgelvm quantize` wrote")  # fmt: skip
    return load_int4(source, skip=(TABLE_CODES,))

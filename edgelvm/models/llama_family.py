"""The Llama-family decoder (Llama, Qwen2, Mistral) described as plain weights, for graph builders.

Why: the fused ONNX Runtime decoder (``export/gqa_decoder.py``) is written op by op from the weights, not traced,
so it needs to know where each weight lives and which hyper-parameters matter. That structural knowledge belongs
with the models, here; the builder stays generic over anything that can produce a :class:`DecoderWeights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelvm.errors import UnsupportedModelError
from edgelvm.models.checkpoint.codes import concat_columns
from edgelvm.models.checkpoint.quantized import HEAD_CODES

#: Rope variants whose cos/sin depend only on the position (so they can be tabulated once).
_STATIC_ROPE = {"default", "linear", "llama3", "yarn", "longrope"}


@dataclass
class LayerWeights:
    """One layer's float weights as ``[in, out]`` *views* of the model's tensors (no copy is made here: at real
    sizes the graph writer streams them to disk one at a time), in the layout the traced portable decoder stores
    them in — so the two decoder graphs can share one copy on disk."""

    input_norm: np.ndarray  # [hidden]
    q: np.ndarray  # [hidden, q_heads * head_dim]
    k: np.ndarray  # [hidden, kv_heads * head_dim]
    v: np.ndarray  # [hidden, kv_heads * head_dim]
    qkv_bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    o_proj: np.ndarray  # [q_heads * head_dim, hidden]
    post_norm: np.ndarray  # [hidden]
    gate: np.ndarray  # [hidden, intermediate]
    up: np.ndarray  # [hidden, intermediate]
    down: np.ndarray  # [intermediate, hidden]
    #: INT4 versions of "qkv", "o_proj", "gate_up", "down" (edgelvm.models.checkpoint.codes.Int4Weight), when quantized;
    #: q/k/v and gate/up are side by side there (one MatMulNBits each: small INT4 matmuls are overhead-bound)
    int4: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecoderWeights:
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: np.ndarray  # [vocab, hidden] (the module's own layout: a tied head is the embedding table)
    cos: np.ndarray  # [max_length, head_dim // 2], attention scaling of the rope variant folded in
    sin: np.ndarray
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    scale: float
    lm_head_codes: Any = None  # the head's block-wise INT4/INT8 codes (an Int4Weight), when it is quantized


def _np(tensor: Any) -> np.ndarray:
    return tensor.detach().float().numpy()


def _layer_int4(int4: dict[str, Any], i: int) -> dict[str, Any]:
    parts = {
        "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "o_proj": ["self_attn.o_proj"],
        "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
        "down": ["mlp.down_proj"],
    }
    out = {}
    for fused, names in parts.items():
        found = [int4.get(f"layers.{i}.{n}") for n in names]
        if all(w is not None for w in found):
            out[fused] = concat_columns(found) if len(found) > 1 else found[0]
    return out


def describe_llama_decoder(
    language_model: Any, lm_head: Any, config: Any, max_length: int, int4: dict[str, Any] | None = None
) -> DecoderWeights:
    """Read a Llama-type decoder's weights (views, transposed to ``[in, out]``) and its rope tables up to
    ``max_length``.

    ``int4`` maps ``layers.{i}.self_attn.q_proj``-style names to INT4 weights; fused matrices (qkv, gate_up) are
    quantized when all their parts are; a quantized head is ``lm_head`` there."""
    import torch

    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"hidden_act {config.hidden_act!r} (the fused decoder implements SiLU MLPs)",
            fix="export with --decoder portable",
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_length:
        raise UnsupportedModelError(
            f"sliding-window attention ({window} < max_length {max_length})",
            fix="export with --decoder portable, or --max-length ≤ the window",
        )
    rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} depends on the sequence length", fix="export with --decoder portable"
        )
    layers = []
    for layer in language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if any(m.bias is not None for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise UnsupportedModelError(
                "biases on o_proj or the MLP (the fused decoder has none there)", fix="export with --decoder portable"
            )
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        layers.append(
            LayerWeights(
                input_norm=_np(layer.input_layernorm.weight),
                q=_np(attn.q_proj.weight).T,
                k=_np(attn.k_proj.weight).T,
                v=_np(attn.v_proj.weight).T,
                qkv_bias=tuple(_np(b) for b in biases) if all(b is not None for b in biases) else None,
                o_proj=_np(attn.o_proj.weight).T,
                post_norm=_np(layer.post_attention_layernorm.weight),
                gate=_np(mlp.gate_proj.weight).T,
                up=_np(mlp.up_proj.weight).T,
                down=_np(mlp.down_proj.weight).T,
                int4=_layer_int4(int4 or {}, len(layers)),
            )
        )
    first = language_model.layers[0].self_attn
    head_dim = int(first.head_dim)
    if head_dim % 16:
        raise UnsupportedModelError(
            f"head_dim {head_dim} (ONNX Runtime's GroupQueryAttention needs a multiple of 16)",
            fix="export with --decoder portable",
        )
    positions = torch.arange(max_length)[None]
    probe = torch.zeros(1, max_length, head_dim)
    with torch.no_grad():
        cos, sin = language_model.rotary_emb(probe, positions)
    return DecoderWeights(
        layers=layers,
        final_norm=_np(language_model.norm.weight),
        lm_head=_np(lm_head.weight),
        cos=_np(cos[0, :, : head_dim // 2]),
        sin=_np(sin[0, :, : head_dim // 2]),
        num_heads=int(config.num_attention_heads),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        head_dim=head_dim,
        rms_eps=float(config.rms_norm_eps),
        scale=float(first.scaling),
        lm_head_codes=(int4 or {}).get(HEAD_CODES),
    )


def llama_scale_groups(language_model: Any) -> list[Any]:
    """Per decoder layer: input norm → q/k/v, v → o (only without GQA: with it, v's rows feed several heads'
    columns of o), post-attention norm → gate/up, up → down (the SiLU gate multiplies up's output elementwise)."""
    from edgelvm.models.base import ScaleGroup

    groups = []
    for i, layer in enumerate(language_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        p = f"layers.{i}."
        qkv = {p + f"self_attn.{n}": getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")}
        groups.append(ScaleGroup(layer.input_layernorm, "norm", qkv))
        if attn.v_proj.out_features == attn.o_proj.in_features:
            groups.append(ScaleGroup(attn.v_proj, "linear", {p + "self_attn.o_proj": attn.o_proj}))
        groups.append(ScaleGroup(layer.post_attention_layernorm, "norm", {
            p + "mlp.gate_proj": mlp.gate_proj, p + "mlp.up_proj": mlp.up_proj,
        }))  # fmt: skip
        groups.append(ScaleGroup(mlp.up_proj, "linear", {p + "mlp.down_proj": mlp.down_proj}))
    return groups

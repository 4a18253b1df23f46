"""Parameter counts from a transformers config alone: no weights read, no torch module built.

Building blocks for the adapters' :meth:`~edgelvm.models.base.VLMAdapter.config_parameter_counts` (``edgelvm plan``
and the fit check ``edgelvm export --target`` runs before loading weights). Each function mirrors the module tree
transformers builds for that config — every ``nn.Linear`` / ``nn.Conv`` / norm / embedding parameter — so the
counts equal ``sum(p.numel() for p in module.parameters())`` of the loaded model exactly
(``tests/test_plan.py`` checks every family against a model built on the ``meta`` device).

Plain arithmetic over config attributes: importing this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgelvm.errors import UnsupportedModelError


@dataclass(frozen=True)
class ParameterCounts:
    """What the fit check needs, in parameters (bytes = parameters × bits per parameter of the format).

    ``vision``: the exported vision graph's module (tower + projector / connector). ``decoder``: the language model
    and LM head as the decoder graph holds them — the embedding table excluded (the runtime memory-maps it), unless
    it *is* the LM head's weight (tied), which then counts once.
    """

    vision: int
    decoder: int


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(width: int, kind: str) -> int:
    return 2 * width if kind == "layer_norm" else width  # LayerNorm: weight + bias; RMSNorm: weight


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


#: text model_type → (q/k/v bias, o bias, norms per layer). Llama and Gemma read ``attention_bias`` (o included).
_TEXT_RULES: dict[str, tuple[str | bool, str | bool, int]] = {
    "llama": ("attention_bias", "attention_bias", 2),
    "mistral": (False, False, 2),
    "qwen2": (True, False, 2),
    "qwen2_vl_text": (True, False, 2),
    "qwen2_5_vl_text": (True, False, 2),
    "qwen3_vl_text": ("attention_bias", "attention_bias", 2),
    "gemma": ("attention_bias", "attention_bias", 2),
    "gemma2": ("attention_bias", "attention_bias", 4),
    "gemma3_text": ("attention_bias", "attention_bias", 4),
}


#: Text model_types with RMSNorms over each head's queries and keys (``q_norm`` / ``k_norm``: ``head_dim`` each).
_QK_NORM_TEXT = {"qwen3_vl_text", "gemma3_text"}


def decoder_params(tc: Any, *, where: Any = None) -> int:
    """A Llama-style decoder's layers + final norm + LM head (``vocab × hidden``, tied or not — a tied head is the
    embedding table, counted once either way); the input embedding itself excluded."""
    rule = _TEXT_RULES.get(tc.model_type)
    if rule is None:
        raise UnsupportedModelError(
            f"no config-only parameter count for a {tc.model_type!r} language model",
            where=where,
            fix="`edgelvm export --target` counts the loaded model instead",
        )
    qkv_bias, o_bias, norms = (getattr(tc, b, False) if isinstance(b, str) else b for b in rule)
    h, heads, head_dim = tc.hidden_size, tc.num_attention_heads, _head_dim(tc)
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    mlp_bias = bool(getattr(tc, "mlp_bias", False))
    attention = (
        linear(h, heads * head_dim, bool(qkv_bias))
        + 2 * linear(h, kv_heads * head_dim, bool(qkv_bias))
        + linear(heads * head_dim, h, bool(o_bias))
    )
    mlp = 2 * linear(h, tc.intermediate_size, mlp_bias) + linear(tc.intermediate_size, h, mlp_bias)
    layer = attention + mlp + norms * h  # RMSNorm weights
    if tc.model_type in _QK_NORM_TEXT:
        layer += 2 * head_dim
    return tc.num_hidden_layers * layer + h + tc.vocab_size * h


def _vit_layers(width: int, intermediate: int, layers: int) -> int:
    """CLIP / SigLIP / Idefics3 encoder layers: q/k/v/out with bias, LayerNorm ×2, fc1 → fc2 with bias."""
    return layers * (4 * linear(width, width) + 2 * _norm(width, "layer_norm") + linear(width, intermediate)
                     + linear(intermediate, width))  # fmt: skip


def clip_like_vision_params(vc: Any, *, where: Any = None) -> int:
    """``CLIPVisionModel`` / ``SiglipVisionModel`` as ``AutoModel.from_config(vision_config)`` builds it (the whole
    tower, every layer and the post-LayerNorm included, whatever layer the features are read from)."""
    e, channels = vc.hidden_size, getattr(vc, "num_channels", 3)
    patches = (_side(vc.image_size) // _side(vc.patch_size)) ** 2
    patch = channels * _side(vc.patch_size) ** 2 * e
    body = _vit_layers(e, vc.intermediate_size, vc.num_hidden_layers) + _norm(e, "layer_norm")  # + post-LN
    if vc.model_type.startswith("clip"):  # CLS embedding, bias-free patch conv, positions incl. CLS, pre-LN
        return e + patch + (patches + 1) * e + _norm(e, "layer_norm") + body
    if vc.model_type.startswith("siglip"):
        total = patch + e + patches * e + body
        if getattr(vc, "vision_use_head", True):  # attention-pooling head: probe, MultiheadAttention, LN, MLP
            total += e + linear(e, 3 * e) + linear(e, e) + _norm(e, "layer_norm")
            total += linear(e, vc.intermediate_size) + linear(vc.intermediate_size, e)
        return total
    raise UnsupportedModelError(
        f"no config-only parameter count for a {vc.model_type!r} vision tower",
        where=where,
        fix="`edgelvm export --target` counts the loaded model instead",
    )


def idefics3_vision_params(vc: Any) -> int:
    """``Idefics3VisionTransformer``: SigLIP-style embeddings (biased patch conv, positions), layers, post-LN."""
    e, channels = vc.hidden_size, getattr(vc, "num_channels", 3)
    patches = (_side(vc.image_size) // _side(vc.patch_size)) ** 2
    patch = channels * _side(vc.patch_size) ** 2 * e + e
    return patch + patches * e + _vit_layers(e, vc.intermediate_size, vc.num_hidden_layers) + _norm(e, "layer_norm")


def internvl_vision_params(vc: Any) -> int:
    """``InternVLVisionModel``: CLS (+ mask) token, biased patch conv, absolute positions, layers with layer scale
    (λ₁, λ₂) and optional q/k RMSNorm, a final LayerNorm unless mean pooling."""
    e, channels = vc.hidden_size, getattr(vc, "num_channels", 3)
    h_patches = _side(vc.image_size) // _side(vc.patch_size)
    w_size = vc.image_size[1] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    w_patch = vc.patch_size[1] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    patches = h_patches * (int(w_size) // int(w_patch))
    total = e + (e if getattr(vc, "use_mask_token", False) else 0)
    total += channels * _side(vc.patch_size) * int(w_patch) * e + e
    if getattr(vc, "use_absolute_position_embeddings", True):
        total += (patches + 1) * e
    heads_width = vc.num_attention_heads * (e // vc.num_attention_heads)
    bias = bool(getattr(vc, "attention_bias", False))
    layer = 3 * linear(e, heads_width, bias) + linear(e, e)
    if getattr(vc, "use_qk_norm", False):
        layer += 2 * e
    layer += 2 * _norm(e, vc.norm_type) + 2 * e + linear(e, vc.intermediate_size) + linear(vc.intermediate_size, e)
    total += vc.num_hidden_layers * layer
    return total + (0 if getattr(vc, "use_mean_pooling", True) else _norm(e, "layer_norm"))


def qwen2_vl_vision_params(vc: Any) -> int:
    """``Qwen2VisionTransformerPretrainedModel``: bias-free 3-D patch conv, LayerNorm blocks with fused qkv and
    an fc1 → fc2 MLP (``embed_dim × mlp_ratio``), the 2×2 patch merger (LayerNorm, two linears)."""
    e, merge = vc.embed_dim, vc.spatial_merge_size
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * e
    mlp = int(e * vc.mlp_ratio)
    block = 2 * _norm(e, "layer_norm") + linear(e, 3 * e) + linear(e, e) + linear(e, mlp) + linear(mlp, e)
    merged = e * merge**2
    merger = _norm(e, "layer_norm") + linear(merged, merged) + linear(merged, vc.hidden_size)
    return patch + vc.depth * block + merger


def qwen2_5_vl_vision_params(vc: Any) -> int:
    """Qwen2.5-VL's tower: as Qwen2-VL's with RMSNorm and a biased gate/up → down MLP; the merger maps to
    ``out_hidden_size``."""
    e, merge, inner = vc.hidden_size, vc.spatial_merge_size, vc.intermediate_size
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * e
    block = 2 * _norm(e, "rms") + linear(e, 3 * e) + linear(e, e) + 2 * linear(e, inner) + linear(inner, e)
    merged = e * merge**2
    merger = _norm(e, "rms") + linear(merged, merged) + linear(merged, vc.out_hidden_size)
    return patch + vc.depth * block + merger


def qwen3_vl_vision_params(vc: Any) -> int:
    """``Qwen3VLVisionModel``: biased 3-D patch conv, the learned position table, LayerNorm blocks with fused qkv
    and a biased fc1 → fc2 MLP, the patch merger (LayerNorm before the 2×2 merge) and one DeepStack merger per
    ``deepstack_visual_indexes`` entry (LayerNorm after the merge); every merger maps to ``out_hidden_size``."""
    e, merge, inner = vc.hidden_size, vc.spatial_merge_size, vc.intermediate_size
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * e + e
    block = 2 * _norm(e, "layer_norm") + linear(e, 3 * e) + linear(e, e) + linear(e, inner) + linear(inner, e)
    merged = e * merge**2
    mergers = linear(merged, merged) + linear(merged, vc.out_hidden_size)
    indexes = getattr(vc, "deepstack_visual_indexes", None)
    deepstack = len(indexes) if isinstance(indexes, (list, tuple)) else 0
    return (patch + vc.num_position_embeddings * e + vc.depth * block + _norm(e, "layer_norm") + mergers
            + deepstack * (_norm(merged, "layer_norm") + mergers))  # fmt: skip

"""The decoder modules of hybrid language models, for export: Qwen3.5's Gated DeltaNet (linear attention with a short
causal convolution) layers between gated full-attention layers, and LFM2's short-convolution layers between attention
layers (:class:`Lfm2DecoderForExport`).

Why a module of its own instead of transformers' forward: transformers keeps the linear layers' state in its cache
object (with prefill and decode taking different code paths: a chunked algorithm, a per-token loop, and optional
fused kernels), which cannot cross a graph boundary. Here every state is an explicit tensor:

- **convolution state** ``[batch, conv_dim, kernel - 1]``: the last ``kernel - 1`` inputs of the depthwise causal
  convolution (transformers keeps ``kernel`` of them; the oldest never reaches an output). A step convolves
  ``[state | new inputs]`` without padding, so prefill and decode are one code path.
- **recurrent state** ``[batch, value_heads, key_dim, value_dim]`` (fp32, as transformers keeps it): the gated delta
  rule ``S ← S·exp(g);  S ← S + k ⊗ β(v − Sᵀk);  o = Sᵀq`` run by ``torch``'s ``scan``, which the ONNX exporter
  writes as one ``Scan`` node with a dynamic trip count — so one graph serves a 1-token decode step and a prefill
  of any length. transformers' prefill uses the chunked (WY) form of the same recurrence; the two agree to float
  rounding (the export parity check and the runtime's greedy tokens against ``generate`` measure it).

Padding: a padded position's input is zeroed (transformers' ``apply_mask_to_padding_states``), so left padding in
front of a sequence leaves zero states at zero; padding *inside* a sequence would pass through the states, which is
why the runtime never puts any there for these caches (``KVCache.recurrent``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from edgelvm.models.export_wrappers import last_logits, split_logits_keep


class _PairCache:
    """The one-layer stand-in for a transformers cache that attention modules call ``update`` on."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.keys = torch.cat([self.keys, keys], dim=2)
        self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values


def _delta_step(state: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule; ``xs``: q, k ``[B, H, dk]``, v ``[B, H, dv]``, g, beta ``[B, H]``."""
    q, k, v, g, beta = xs
    state = state * g.exp()[..., None, None]
    memory = (state * k[..., None]).sum(-2)
    state = state + k[..., None] * ((v - memory) * beta[..., None])[..., None, :]
    return state.clone(), (state * q[..., None]).sum(-2)


def gated_delta_rule(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(outputs [B, S, Hv, dv], final state)`` from ``[B, S, H, d]`` inputs and the state ``[B, Hv, dk, dv]``;
    queries and keys are L2-normalised and queries scaled by ``dk ** -0.5`` (transformers' kernel options)."""
    from torch._higher_order_ops.scan import scan

    dtype = query.dtype
    repeat = value.shape[2] // key.shape[2]
    if repeat > 1:  # each key head serves `repeat` consecutive value heads
        query, key = query.repeat_interleave(repeat, dim=2), key.repeat_interleave(repeat, dim=2)
    query, key, value, g, beta = (x.float() for x in (query, key, value, g, beta))
    query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6) / query.shape[-1] ** 0.5
    key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
    steps = tuple(x.movedim(1, 0) for x in (query, key, value, g, beta))  # the sequence axis first
    final, outputs = scan(_delta_step, state.float(), steps, dim=0)
    return outputs.movedim(0, 1).to(dtype), final


def gated_deltanet_forward(
    module: Any, hidden: torch.Tensor, step_mask: torch.Tensor, conv_state: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A transformers ``GatedDeltaNet`` module's forward over explicit states: ``(output, conv_state, state)``."""
    hidden = hidden * step_mask[:, :, None].to(hidden.dtype)
    batch, seq, _ = hidden.shape
    mixed = module.in_proj_qkv(hidden).transpose(1, 2)
    z = module.in_proj_z(hidden).reshape(batch, seq, -1, module.head_v_dim)
    b, a = module.in_proj_b(hidden), module.in_proj_a(hidden)
    window = torch.cat([conv_state.to(mixed.dtype), mixed], dim=-1)
    kernel = module.conv1d.weight.shape[-1]
    new_conv = window[:, :, window.shape[-1] - (kernel - 1) :]
    mixed = F.conv1d(window, module.conv1d.weight, module.conv1d.bias, groups=window.shape[1])
    mixed = _activation(module.activation)(mixed).transpose(1, 2)
    query, key, value = torch.split(mixed, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(batch, seq, -1, module.head_k_dim)
    key = key.reshape(batch, seq, -1, module.head_k_dim)
    value = value.reshape(batch, seq, -1, module.head_v_dim)
    beta = b.sigmoid()
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    out, new_state = gated_delta_rule(query, key, value, g, beta, state)
    out = module.norm(out.reshape(-1, module.head_v_dim), z.reshape(-1, module.head_v_dim))
    return module.out_proj(out.reshape(batch, seq, -1)), new_conv, new_state


def _activation(name: str) -> Any:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class HybridDecoderForExport(torch.nn.Module):
    """``(inputs_embeds, attention_mask [B, past + seq], position_ids, *past, [logits_keep]) -> (logits, *present)``
    for a Qwen3.5-style text model; ``past`` is each attention layer's key and value ``[B, kv_heads, past,
    head_dim]``, then each linear layer's convolution and recurrent state (``KVCacheSpec.states`` order). Logits as
    :class:`~edgelvm.models.export_wrappers.DecoderForExport`'s (the last position's, or the last K's)."""

    #: traced by ``torch.export`` before the ONNX exporter (its own trace of ``scan`` fails: export/onnx_graphs)
    export_program_first = True

    def __init__(self, language_model: Any, lm_head: Any, text_config: Any) -> None:
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        types = list(text_config.layer_types)
        self.attention_layers = [i for i, t in enumerate(types) if t == "full_attention"]
        self.linear_layers = [i for i, t in enumerate(types) if t == "linear_attention"]

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        past, keep = split_logits_keep(rest)
        kv_count = 2 * len(self.attention_layers)
        kv, states = past[:kv_count], past[kv_count:]
        mask, step_mask = _causal_mask(inputs_embeds, attention_mask)
        model = self.language_model
        rotary = model.rotary_emb(inputs_embeds, position_ids)
        hidden, present_kv, present_states = inputs_embeds, [], []
        for index, layer in enumerate(model.layers):
            residual, x = hidden, layer.input_layernorm(hidden)
            if index in self.linear_layers:
                j = 2 * self.linear_layers.index(index)
                x, conv, state = gated_deltanet_forward(layer.linear_attn, x, step_mask, states[j], states[j + 1])
                present_states += [conv, state]
            else:
                j = 2 * self.attention_layers.index(index)
                cache = _PairCache(kv[j], kv[j + 1])
                x, _ = layer.self_attn(hidden_states=x, position_embeddings=rotary, attention_mask=mask, cache=cache)
                present_kv += [cache.keys, cache.values]
            hidden = residual + x
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = last_logits(self.lm_head, model.norm(hidden), keep)
        return (logits, *present_kv, *present_states)


def _causal_mask(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention layers' additive mask ``[B, 1, seq, past + seq]`` (causal and not padding) and the step's own
    ``[B, seq]`` mask (which positions the state layers zero)."""
    seq, total = inputs_embeds.shape[1], attention_mask.shape[1]
    queries = torch.arange(seq, device=inputs_embeds.device) + (total - seq)
    keys = torch.arange(total, device=inputs_embeds.device)
    allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
    return torch.where(allowed, zero, torch.finfo(inputs_embeds.dtype).min), attention_mask[:, total - seq :]


def hybrid_state_shapes(text_config: Any) -> list[tuple[int, str, list[int]]]:
    """``(layer, kind, shape after batch)`` of every linear layer's states, in the graph's order."""
    c = text_config
    conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    shapes: list[tuple[int, str, list[int]]] = []
    for layer, kind in enumerate(c.layer_types):
        if kind == "linear_attention":
            shapes.append((layer, "conv", [conv_dim, int(c.linear_conv_kernel_dim) - 1]))
            shapes.append((layer, "recurrent", [c.linear_num_value_heads, c.linear_key_head_dim,
                                                c.linear_value_head_dim]))  # fmt: skip
    return shapes


# ---------------------------------------------------------------------------------------------- LFM2 (LFM2-VL)


def short_conv_forward(
    module: Any, hidden: torch.Tensor, step_mask: torch.Tensor, conv_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers ``Lfm2ShortConv``'s forward over an explicit state ``[B, hidden, L - 1]`` (the last gated
    inputs ``B * x``): ``(output, new state)``. transformers pads a fresh sequence with zeros and keeps its state in
    the cache; a zero state is that padding, so prefill and decode are one code path here too."""
    hidden = hidden * step_mask[:, :, None].to(hidden.dtype)
    b, c, x = module.in_proj(hidden).transpose(-1, -2).chunk(3, dim=-2)
    window = torch.cat([conv_state.to(x.dtype), b * x], dim=-1)
    kernel = module.conv.weight.shape[-1]
    new_state = window[:, :, window.shape[-1] - (kernel - 1) :]
    out = F.conv1d(window, module.conv.weight, module.conv.bias, groups=window.shape[1])
    return module.out_proj((c * out).transpose(-1, -2)), new_state


class Lfm2DecoderForExport(torch.nn.Module):
    """``(inputs_embeds, attention_mask [B, past + seq], position_ids [B, seq], *past, [logits_keep]) -> (logits,
    *present)`` for an LFM2 text model: ``past`` is each attention layer's key and value ``[B, kv_heads, past,
    head_dim]``, then each convolution layer's ``conv`` state (``KVCacheSpec.states`` order)."""

    def __init__(self, language_model: Any, lm_head: Any, text_config: Any) -> None:
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        types = list(text_config.layer_types)
        self.attention_layers = [i for i, t in enumerate(types) if t == "full_attention"]
        self.conv_layers = [i for i, t in enumerate(types) if t == "conv"]

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        past, keep = split_logits_keep(rest)
        kv_count = 2 * len(self.attention_layers)
        kv, states = past[:kv_count], past[kv_count:]
        mask, step_mask = _causal_mask(inputs_embeds, attention_mask)
        model = self.language_model
        rotary = model.rotary_emb(inputs_embeds, position_ids)
        hidden, present_kv, present_states = inputs_embeds, [], []
        for index, layer in enumerate(model.layers):
            x = layer.operator_norm(hidden)
            if index in self.conv_layers:
                x, conv = short_conv_forward(layer.conv, x, step_mask, states[self.conv_layers.index(index)])
                present_states.append(conv)
            else:
                j = 2 * self.attention_layers.index(index)
                cache = _PairCache(kv[j], kv[j + 1])
                x, _ = layer.self_attn(hidden_states=x, position_embeddings=rotary, attention_mask=mask, cache=cache)
                present_kv += [cache.keys, cache.values]
            hidden = hidden + x
            hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
        logits = last_logits(self.lm_head, model.embedding_norm(hidden), keep)
        return (logits, *present_kv, *present_states)


def lfm2_state_shapes(text_config: Any) -> list[tuple[int, str, list[int]]]:
    """``(layer, "conv", [hidden, L - 1])`` for every convolution layer of an LFM2 text model, in the graph's order."""
    c = text_config
    return [(layer, "conv", [int(c.hidden_size), int(c.conv_L_cache) - 1])
            for layer, kind in enumerate(c.layer_types) if kind == "conv"]  # fmt: skip

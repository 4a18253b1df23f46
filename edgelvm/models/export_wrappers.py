"""Export-facing wrappers (what an adapter hands to export to trace): only tensors cross the graph boundary.

The decoder wrapper rebuilds the transformers cache object from flat per-layer tensors inside ``forward``
(the cache API changes between transformers releases; the bundle's tensor interface must not).
"""

from __future__ import annotations

from typing import Any

import torch


def split_logits_keep(args: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """``(variadic inputs, logits_keep or None)``: the decoder modules take :data:`~edgelvm.manifest.LOGITS_KEEP`
    after their past tensors, told apart by being the only 1-D one (keys, values and states have 3-4 dims, window
    positions 2), so a caller that passes none keeps the old interface and its ``[batch, vocab]`` logits."""
    if args and args[-1].dim() == 1:
        return args[:-1], args[-1]
    return args, None


def last_logits(lm_head: Any, hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The LM head over each row's last position (``keep`` None: ``[batch, vocab]``) or its last ``K =
    len(keep)`` positions, flat ``[batch * K, vocab]`` (row-major: row 0's K positions first).

    Only ``keep``'s length counts, so the slice is shape-driven: a gather of ``arange(K) + seq - K`` exports with no
    guard relating K to ``seq`` (the runtime asks for at most the tokens a step feeds; with left padding those are
    real tokens). Flat, so that K = 1 is the old ``[batch, vocab]`` output, and the head stays one 2-D ``Gemm`` (a
    tied head then still shares the embedding table's bytes)."""
    if keep is None:
        return lm_head(hidden[:, -1, :])
    count, seq = keep.shape[0], hidden.shape[1]
    rows = hidden.index_select(1, torch.arange(count, device=hidden.device) + (seq - count))
    return lm_head(rows.reshape(-1, hidden.shape[-1]))


class DecoderForExport(torch.nn.Module):
    """``(inputs_embeds, attention_mask, position_ids, *past, [logits_keep]) -> (logits, *present)``.

    ``past`` is ``[key_0, value_0, key_1, value_1, ...]``, each ``[batch, kv_heads, past_len, head_dim]``;
    ``present`` has the same layout with ``past_len + seq`` positions. Logits are those of each row's last position
    ``[batch, vocab]``, or with ``logits_keep [K]`` (values ignored) of its last K positions ``[batch * K, vocab]``
    (:func:`last_logits`): generation needs the last one, speculative decoding verifies K drafted tokens in one
    step, and full-sequence logits would cost ``seq x vocab`` floats at prefill. With left padding the last
    positions of a step are real tokens in every row.
    """

    def __init__(self, language_model: Any, lm_head: Any, text_config: Any) -> None:
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.text_config = text_config
        self.num_layers = int(text_config.num_hidden_layers)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past, keep = split_logits_keep(rest)
        cache = self.cache_from(past)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        return self.outputs(self.last_logits(out.last_hidden_state, keep), cache)

    # ---- for subclasses (adapters' own decoder modules: other masks, extra inputs) ---------------------------------
    def last_logits(self, hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """:func:`last_logits` with this module's LM head."""
        return last_logits(self.lm_head, hidden, keep)

    def cache_from(self, past: tuple[torch.Tensor, ...]) -> Any:
        """The transformers cache holding the flat ``[key_0, value_0, ...]`` tensors."""
        from transformers.cache_utils import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        return DynamicCache(ddp_cache_data=pairs, config=self.text_config)

    @staticmethod
    def outputs(logits: torch.Tensor, cache: Any) -> tuple[torch.Tensor, ...]:
        """``(logits, *present)`` with the cache flattened back to ``[key_0, value_0, ...]``."""
        present: list[torch.Tensor] = []
        for layer in cache.layers:
            present.extend((layer.keys, layer.values))
        return (logits, *present)

"""Export-facing wrappers (what an adapter hands to export to trace): only tensors cross the graph boundary.

The decoder wrapper rebuilds the transformers cache object from flat per-layer tensors inside ``forward``
(the cache API changes between transformers releases; the bundle's tensor interface must not).
"""

from __future__ import annotations

from typing import Any

import torch


class DecoderForExport(torch.nn.Module):
    """``(inputs_embeds, attention_mask, position_ids, *past) -> (logits_of_last_position, *present)``.

    ``past`` is ``[key_0, value_0, key_1, value_1, ...]``, each ``[batch, kv_heads, past_len, head_dim]``;
    ``present`` has the same layout with ``past_len + seq`` positions. Only the last position's logits are
    returned: generation needs nothing else, and full-sequence logits would cost ``seq x vocab`` floats at prefill.
    With left padding the last position is a real token in every row.
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
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = self.cache_from(past)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        return self.outputs(self.lm_head(out.last_hidden_state[:, -1, :]), cache)

    # ---- for subclasses (adapters' own decoder modules: other masks, extra inputs) ---------------------------------
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

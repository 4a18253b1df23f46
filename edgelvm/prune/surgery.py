"""Removing heads, neurons and whole blocks from the modules according to a :class:`~edgelvm.prune.plan.PrunePlan`.

The linear layers are cut with Torch-Pruning's functional pruners (its dependency graph is not used: it hangs on
GQA attention, Torch-Pruning issue #527 — the adapter names the coupled layers instead). Attention modules keep
their ``head_dim``; their head-count attributes are patched. How one block is cut, and how the new shapes are
recorded so that :func:`edgelvm.models.load_model` rebuilds them, is the checkpoint format's
(:mod:`edgelvm.models.checkpoint.pruned`); this module decides only where to apply it.
"""

from __future__ import annotations

from typing import Any

from edgelvm.models.checkpoint.pruned import cut_heads, cut_neurons, write_record
from edgelvm.models.checkpoint.save import save_model_files
from edgelvm.prune.importance import key
from edgelvm.prune.plan import PrunePlan


def apply_plan(adapter: Any, plan: PrunePlan) -> None:
    """Cut the model in place according to ``plan``, patch module attributes, config fields and the record."""
    for b in adapter.attention_blocks():
        lp = plan.layers.get(key(b.side, b.layer))
        if lp is not None and lp.keep_heads is not None:
            cut_heads(b, lp.keep_heads, lp.keep_kv_heads)
    for m in adapter.mlp_blocks():
        lp = plan.layers.get(key(m.side, m.layer))
        if lp is not None and lp.keep_neurons is not None:
            cut_neurons(m, lp.keep_neurons)
    write_record(adapter)


def drop_blocks(adapter: Any, side: str, drop: list[int]) -> None:
    """Remove whole blocks ``drop`` (indices) from a tower; renumber what the survivors index by (the KV cache's
    ``layer_idx``), and shorten ``num_hidden_layers`` and per-layer config lists."""
    import torch

    if not drop:
        return
    stack = adapter.layer_stacks()[side]
    names = {id(m): n for n, m in adapter.model.named_modules()}
    parent_name, _, attr = names[id(stack)].rpartition(".")
    parent = adapter.model.get_submodule(parent_name)
    keep = [i for i in range(len(stack)) if i not in set(drop)]
    setattr(parent, attr, torch.nn.ModuleList([stack[i] for i in keep]))
    for new_index, block in enumerate(getattr(parent, attr)):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    sub = adapter.text_config if side == "text" else adapter.sub_configs()[side]
    per_layer = getattr(sub, "layer_types", None)
    if isinstance(per_layer, list) and len(per_layer) == len(stack):
        sub.layer_types = [per_layer[i] for i in keep]
    sub.num_hidden_layers = len(keep)


def save_pruned(adapter: Any, out: Any) -> None:
    """The pruned model as a checkpoint directory in edgelvm's format (its shapes need edgelvm's loader)."""
    save_model_files(adapter.model, adapter.processor, out, getattr(adapter, "source", None))

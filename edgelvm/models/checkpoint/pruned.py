"""Pruned shapes in a checkpoint: the record of per-layer shapes, cutting modules to given heads / neurons, and
loading a pruned checkpoint.

Every pruned model records its per-layer shapes in ``config.edgelvm_pruning`` (:data:`RECORD`), and its weights are
written with the model's own parameter names. Llama / Qwen2 / Mistral language models with uniform per-layer
shapes also get the matching config fields (``num_attention_heads``, ``num_key_value_heads``, explicit ``head_dim``,
``intermediate_size``), so plain ``from_pretrained`` reloads them. CLIP / SigLIP towers derive ``head_dim`` from
hidden / heads and build square q/k/v projections, so no config describes a head-pruned tower; nor does any config
describe per-layer neuron counts. :func:`load_pruned` (used by :func:`edgelvm.models.load_model`) rebuilds the
skeleton from the config, cuts it to the recorded shapes (:func:`shrink_to_record`), then loads the weights.

The linear layers are cut with Torch-Pruning's functional pruners; which heads and neurons to keep is the prune
stage's decision (:mod:`edgelvm.prune`), how to cut a block to them is here, shared by the stage and the loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORD = "edgelvm_pruning"


def is_pruned(source: str | Path) -> bool:
    """Whether the checkpoint directory ``source`` records pruned shapes (and so needs :func:`load_pruned`)."""
    config = Path(source) / "config.json"
    return config.is_file() and RECORD in json.loads(config.read_text())


def _drop(n: int, keep: list[int], width: int = 1) -> list[int]:
    kept = {k * width + j for k in keep for j in range(width)}
    return [i for i in range(n * width) if i not in kept]


def cut_heads(block: Any, keep_heads: list[int], keep_kv_heads: list[int] | None) -> None:
    """Keep query heads ``keep_heads`` and KV heads ``keep_kv_heads`` of an attention block (an
    :class:`~edgelvm.models.base.AttentionBlock`); a KV list with repeats or out of order copies KV heads per query
    head ("expand"). Patches the attention module's head-count attributes."""
    import torch_pruning as tp

    b = block
    tp.prune_linear_out_channels(b.q, _drop(b.heads, keep_heads, b.head_dim))
    tp.prune_linear_in_channels(b.o, _drop(b.heads, keep_heads, b.head_dim))
    kv = keep_kv_heads
    if kv is not None and (len(set(kv)) < len(kv) or kv != sorted(kv)):  # "expand": KV heads copied per query
        _gather_rows(b.k, kv, b.head_dim)
        _gather_rows(b.v, kv, b.head_dim)
    elif kv is not None and len(kv) < b.kv_heads:
        tp.prune_linear_out_channels(b.k, _drop(b.kv_heads, kv, b.head_dim))
        tp.prune_linear_out_channels(b.v, _drop(b.kv_heads, kv, b.head_dim))
    _patch_attention(b.module, len(keep_heads), b.k.out_features // b.head_dim)


def cut_neurons(block: Any, keep_neurons: list[int]) -> None:
    """Keep intermediate neurons ``keep_neurons`` of an MLP block (an :class:`~edgelvm.models.base.MLPBlock`)."""
    import torch_pruning as tp

    drop = _drop(block.down.in_features, keep_neurons)
    for up in block.up:
        tp.prune_linear_out_channels(up, drop)
    tp.prune_linear_in_channels(block.down, drop)


def _gather_rows(linear: Any, heads: list[int], width: int) -> None:
    """Replace ``linear``'s output rows with the rows of ``heads`` (repeats allowed), ``width`` rows per head."""
    import torch

    rows = torch.tensor([h * width + j for h in heads for j in range(width)])
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight[rows].clone())
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias[rows].clone())
    linear.out_features = len(rows)


def _patch_attention(module: Any, heads: int, kv_heads: int) -> None:
    if hasattr(module, "num_heads"):
        module.num_heads = heads
    if hasattr(module, "num_key_value_heads"):
        module.num_key_value_heads = kv_heads
    if hasattr(module, "num_key_value_groups"):
        module.num_key_value_groups = heads // kv_heads


def shapes(adapter: Any) -> dict[str, list[dict[str, int]]]:
    """Per tower, per layer: query heads, KV heads and MLP neurons as the modules are now."""
    out: dict[str, list[dict[str, int]]] = {}
    for b in adapter.attention_blocks():
        out.setdefault(b.side, []).append({"heads": b.heads, "kv_heads": b.kv_heads, "head_dim": b.head_dim})
    for m in adapter.mlp_blocks():
        layers = out.setdefault(m.side, [])  # a tower whose attention is not described has MLP rows only
        layers.extend({} for _ in range(m.layer + 1 - len(layers)))
        layers[m.layer]["intermediate"] = m.down.in_features
    return out


def write_record(adapter: Any) -> None:
    """Store the per-layer shapes in the config; where uniform, also set the text model's own config fields."""
    record = shapes(adapter)
    setattr(adapter.config, RECORD, record)
    text = adapter.text_config
    layers = record["text"]
    if len({(x["heads"], x["kv_heads"]) for x in layers}) == 1:
        text.num_attention_heads = layers[0]["heads"]
        text.num_key_value_heads = layers[0]["kv_heads"]
        text.head_dim = layers[0]["head_dim"]
    if len({x["intermediate"] for x in layers}) == 1:
        text.intermediate_size = layers[0]["intermediate"]


def shrink_to_record(adapter: Any, record: dict[str, list[dict[str, int]]]) -> None:
    """Cut a freshly built (unpruned-shape) skeleton down to ``record`` (weights are loaded afterwards)."""
    for b in adapter.attention_blocks():
        want = record[b.side][b.layer]
        if (want["heads"], want["kv_heads"]) != (b.heads, b.kv_heads):
            cut_heads(b, list(range(want["heads"])), list(range(want["kv_heads"])))
    for m in adapter.mlp_blocks():
        neurons = record[m.side][m.layer]["intermediate"]
        if neurons != m.down.in_features:
            cut_neurons(m, list(range(neurons)))
    write_record(adapter)


def write_loadable_text_fields(config_file: Path) -> None:
    """transformers refuses a text config whose hidden size is not a multiple of its head count (e.g. 3 heads of
    64 in a 256-wide model, which ``--gqa expand`` produces). Such a model is stored with the head counts of a
    skeleton it can be cut down from (hidden / head_dim query heads, as many KV heads); the record holds the truth
    and :func:`load_pruned` restores it."""
    config = json.loads(config_file.read_text())
    text = config.get("text_config", {})
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    if heads and hidden and hidden % heads:
        head_dim = text.get("head_dim") or hidden // heads
        text["num_attention_heads"] = text["num_key_value_heads"] = hidden // head_dim
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_pruned(adapter_cls: Any, source: str, dtype: Any) -> Any:
    """Build the skeleton from ``config.json``, shrink it to the recorded shapes, load the weights (strict) and the
    saved generation config (stop ids, pad id)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source)
    record = getattr(config, RECORD)
    model = AutoModelForImageTextToText.from_config(config)  # random init, then overwritten by the weights
    processor = adapter_cls.load_processor(source)
    adapter = adapter_cls(model, processor, source=source)
    shrink_to_record(adapter, record)
    load_model(model, f"{source}/model.safetensors", strict=True)
    if (Path(source) / "generation_config.json").is_file():  # from_config derives one from config.json instead
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source)
    model.to(dtype).eval()
    return adapter

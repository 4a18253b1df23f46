"""Removing heads and neurons from the modules, and keeping config + checkpoint consistent with the new shapes.

The linear layers are cut with Torch-Pruning's functional pruners (its dependency graph is not used: it hangs on
GQA attention, Torch-Pruning issue #527 — the adapter names the coupled layers instead). Attention modules keep
their ``head_dim``; their head-count attributes are patched.

Checkpoints: every pruned model records its per-layer shapes in ``config.edgelvm_pruning``, and its weights are
written with the model's own parameter names. Llama / Qwen2 / Mistral language models with uniform per-layer
shapes also get the matching config fields (``num_attention_heads``, ``num_key_value_heads``, explicit ``head_dim``,
``intermediate_size``), so plain ``from_pretrained`` reloads them. CLIP / SigLIP towers derive ``head_dim`` from
hidden / heads and build square q/k/v projections, so no config describes a head-pruned tower; nor does any config
describe per-layer neuron counts. :func:`load_pruned` (used by :func:`edgelvm.models.load_model`) rebuilds the
skeleton from the config, shrinks it to the recorded shapes, then loads the weights.
"""

from __future__ import annotations

from typing import Any

from edgelvm.prune.importance import key
from edgelvm.prune.plan import PrunePlan

RECORD = "edgelvm_pruning"


def _drop(n: int, keep: list[int], width: int = 1) -> list[int]:
    kept = {k * width + j for k in keep for j in range(width)}
    return [i for i in range(n * width) if i not in kept]


def apply_plan(adapter: Any, plan: PrunePlan) -> None:
    """Cut the model in place according to ``plan``, patch module attributes, config fields and the record."""
    import torch_pruning as tp

    for b in adapter.attention_blocks():
        lp = plan.layers.get(key(b.side, b.layer))
        if lp is None or lp.keep_heads is None:
            continue
        tp.prune_linear_out_channels(b.q, _drop(b.heads, lp.keep_heads, b.head_dim))
        tp.prune_linear_in_channels(b.o, _drop(b.heads, lp.keep_heads, b.head_dim))
        kv = lp.keep_kv_heads
        if kv is not None and (len(set(kv)) < len(kv) or kv != sorted(kv)):  # "expand": KV heads copied per query
            _gather_rows(b.k, kv, b.head_dim)
            _gather_rows(b.v, kv, b.head_dim)
        elif kv is not None and len(kv) < b.kv_heads:
            tp.prune_linear_out_channels(b.k, _drop(b.kv_heads, kv, b.head_dim))
            tp.prune_linear_out_channels(b.v, _drop(b.kv_heads, kv, b.head_dim))
        _patch_attention(b.module, len(lp.keep_heads), b.k.out_features // b.head_dim)
    for m in adapter.mlp_blocks():
        lp = plan.layers.get(key(m.side, m.layer))
        if lp is None or lp.keep_neurons is None:
            continue
        n = m.down.in_features
        drop = _drop(n, lp.keep_neurons)
        for up in m.up:
            tp.prune_linear_out_channels(up, drop)
        tp.prune_linear_in_channels(m.down, drop)
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
    plan = PrunePlan()
    for b in adapter.attention_blocks():
        want = record[b.side][b.layer]
        if want["heads"] != b.heads or want["kv_heads"] != b.kv_heads:
            lp = plan.layer(key(b.side, b.layer))
            lp.keep_heads = list(range(want["heads"]))
            lp.keep_kv_heads = list(range(want["kv_heads"]))
    for m in adapter.mlp_blocks():
        want = record[m.side][m.layer]["intermediate"]
        if want != m.down.in_features:
            plan.layer(key(m.side, m.layer)).keep_neurons = list(range(want))
    apply_plan(adapter, plan)


def save_pruned(adapter: Any, out: Any) -> None:
    save_model_files(adapter.model, adapter.processor, out, getattr(adapter, "source", None))


def save_checkpoint_files(model: Any, processor: Any, out: Any, source: Any = None) -> None:
    """A model + processor as a checkpoint directory: ``save_pretrained``, or edgelvm's own format for pruned shapes
    that only edgelvm's loader rebuilds. ``source``: the checkpoint the processor came from (see
    :func:`save_processor_files`)."""
    if hasattr(model.config, RECORD):
        save_model_files(model, processor, out, source)
    else:
        model.save_pretrained(out, safe_serialization=True)
        save_processor_files(processor, out, source)


def save_model_files(model: Any, processor: Any, out: Any, source: Any = None) -> None:
    """config + generation config + processor via ``save_pretrained``; weights with the model's own parameter names
    (``safetensors.torch.save_model`` also de-duplicates tied tensors)."""
    from pathlib import Path

    from safetensors.torch import save_model

    out = Path(out)
    model.config.save_pretrained(out)
    _write_loadable_text_fields(out / "config.json")
    model.generation_config.save_pretrained(out)
    save_processor_files(processor, out, source)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})


#: Files a processor's ``save_pretrained`` may write that hold its chat template.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")


def save_processor_files(processor: Any, out: Any, source: Any = None) -> None:
    """The processor's files in ``out`` as the ``source`` checkpoint has them: a stage must not change the processor
    it was given. Each file ``processor.save_pretrained`` writes is the source's copy where the source (a local
    directory) has that file; a chat template file the source does not have is left out; any other file is the one
    written (e.g. ``tokenizer.json`` for a source that has only ``tokenizer.model``). Without a local source: what
    ``save_pretrained`` writes."""
    import shutil
    import tempfile
    from pathlib import Path

    out = Path(out)
    src = Path(source) if source else None
    if src is None or not src.is_dir():
        processor.save_pretrained(out)
        return
    with tempfile.TemporaryDirectory(prefix="edgelvm-processor-") as tmp:
        processor.save_pretrained(tmp)
        for written in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            rel = written.relative_to(tmp)
            original = src / rel
            if not original.is_file() and rel.parts[0] in _TEMPLATE_FILES:
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original if original.is_file() else written, out / rel)


def _write_loadable_text_fields(config_file: Any) -> None:
    """transformers refuses a text config whose hidden size is not a multiple of its head count (e.g. 3 heads of
    64 in a 256-wide model, which ``--gqa expand`` produces). Such a model is stored with the head counts of a
    skeleton it can be cut down from (hidden / head_dim query heads, as many KV heads); the record holds the truth
    and :func:`load_pruned` restores it."""
    import json

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
    from pathlib import Path

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

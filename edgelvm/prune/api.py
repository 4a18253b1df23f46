"""``prune(model, calib_data, PruneConfig) -> PruneReport``: score, plan, cut, (recover), save.

Scoring calls ``config.importance(adapter, batches)`` — an injected callable (:mod:`edgelvm.prune.importance`) —
with the calibration batches this module iterates (or None for a data-free importance)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from edgelvm.errors import ConfigError
from edgelvm.fsutil import prepare_output, write_dir_atomically
from edgelvm.prune.config import PruneConfig, PruneReport

log = logging.getLogger(__name__)
REPORT = "prune_report.json"
SCORES = "prune_scores.json"


def model_stats(adapter: Any) -> dict[str, Any]:
    """Parameters per part, and matmul FLOPs (2 x multiply-adds of the linear layers, attention scores excluded)
    per image (vision tower + projector over its patches) and per generated token (language model + LM head)."""
    inner = adapter.model.model
    names = ("vision_tower", "vision_model", "visual")  # the names transformers gives the tower
    tower = getattr(inner, next(n for n in names if hasattr(inner, n)))
    vision = sum(p.numel() for p in tower.parameters())
    projector = sum(p.numel() for p in adapter.image_feature_module().parameters())
    text_layers = sum(p.numel() for p in adapter.layer_stacks()["text"].parameters())
    head = adapter.lm_head().weight.numel()
    patches = adapter.patches_per_image()
    vision_layers = sum(p.numel() for p in adapter.layer_stacks()["vision"].parameters())
    return {
        "parameters": sum(p.numel() for p in adapter.model.parameters()),
        "vision_parameters": vision,
        "text_layer_parameters": text_layers,
        "flops_per_image": 2 * (vision_layers * patches + projector * adapter.tokens_per_image()),
        "flops_per_token": 2 * (text_layers + head),
    }


def prune(model: str | Path | Any, calib_data: str | Path | list | None, config: PruneConfig | None = None):
    """Prune heads and MLP neurons of ``model`` (checkpoint path or adapter); writes a checkpoint to ``config.out``
    that :func:`edgelvm.models.load_model` (and ``edgelvm export``) reload. Returns the report."""
    from edgelvm.calibration.dataset import iter_labeled_batches, load_calibration_set
    from edgelvm.models import load_model
    from edgelvm.models.checkpoint.pruned import shapes
    from edgelvm.prune import importance as imp
    from edgelvm.prune.plan import PrunePlan, plan_heads, plan_neurons
    from edgelvm.prune.surgery import apply_plan, save_pruned

    cfg = config or PruneConfig()
    cfg.validate()
    out = Path(cfg.out)
    sources = [model if isinstance(model, (str, Path)) else None, getattr(model, "source", None)]
    if isinstance(calib_data, (str, Path)):
        sources.append(calib_data)
    out = prepare_output(out, force=cfg.force, inputs=sources)
    adapter = model if hasattr(model, "processor") else load_model(str(model))
    adapter.check_stage("prune", cfg, calib_data)  # what this family cannot prune, said before any work
    source = str(getattr(adapter, "source", "") or model)
    importance_name = imp.importance_name(cfg.importance)
    scores_need_data = getattr(cfg.importance, "needs_data", True)
    records: list = []
    calib = None
    if scores_need_data or cfg.recover_steps > 0:
        if calib_data is None:
            raise ConfigError(
                f"importance {importance_name!r} / recovery needs calibration data",
                where="--calib",
                fix="pass a jsonl dataset (or 'shapes'), or use --importance magnitude",
            )
        # the quantize stage's resolver: a jsonl dataset, a list of records, or "shapes"; calib_limit of them
        calib = load_calibration_set(calib_data, cfg.calib_limit, cfg.seed)
        records = calib.records

    # plan first (cheap): an impossible ratio fails before any calibration work
    blocks = adapter.attention_blocks()
    ratios = {"vision": cfg.vision_heads, "text": cfg.text_heads}
    for b in blocks:
        plan_heads(_dummy(b.heads), b.heads, b.kv_heads, ratios[b.side], cfg.gqa, f"{b.side} layer {b.layer}")

    before = model_stats(adapter)
    if scores_need_data:  # the data loop is ours; the importance only sees the batches
        scores = _with_progress(cfg, len(records), lambda tick: cfg.importance(
            adapter, _ticking(iter_labeled_batches(adapter, calib, cfg.batch_size), tick)))  # fmt: skip
        scores.calibration = {"records": len(records), "sha256": calib.sha256}
    else:
        scores = cfg.importance(adapter, None)

    plan = PrunePlan()
    for b in blocks:
        k = imp.key(b.side, b.layer)
        lp = plan_heads(scores.heads[k], b.heads, b.kv_heads, ratios[b.side], cfg.gqa, f"{b.side} layer {b.layer}")
        if lp.keep_heads is not None:
            plan.layers[k] = lp
    _uniform_expansion(plan, blocks)
    for side, ratio in (("vision", cfg.vision_mlp), ("text", cfg.text_mlp)):
        side_scores = {k: v for k, v in scores.neurons.items() if k.startswith(side + ".")}
        for k, keep in plan_neurons(side_scores, ratio, cfg.mlp_ranking).items():
            plan.layer(k).keep_neurons = keep
    apply_plan(adapter, plan)
    dropped = _drop_blocks(adapter, scores, {"vision": cfg.vision_drop_layers, "text": cfg.text_drop_layers})
    after = model_stats(adapter)

    result: dict[str, PruneReport] = {}

    def write(stage: Path) -> None:
        recovery = _recover(adapter, source, cfg, records, stage) if cfg.recover_steps > 0 else None
        save_pruned(adapter, stage)
        (stage / SCORES).write_text(json.dumps(scores.to_dict()))
        result["report"] = PruneReport(
            out=str(out),
            source=source,
            importance=importance_name,
            calibration=scores.calibration,
            before=before,
            after=after,
            kept={**shapes(adapter), "dropped_blocks": dropped},
            recovery=recovery,
            scores_file=SCORES,
            config={
                **{k: v for k, v in vars(cfg).items() if k not in ("out", "progress", "force")},
                "importance": importance_name,
            },
        )
        result["report"].write(stage / REPORT)

    write_dir_atomically(out, write, stage="prune")
    report = result["report"]
    return report


def _drop_blocks(adapter: Any, scores: Any, counts: dict[str, int]) -> dict[str, list[int]]:
    """Drop each tower's ``counts[side]`` least influential blocks (lowest mean 1 - cos(input, output))."""
    from edgelvm.models.checkpoint.pruned import write_record
    from edgelvm.prune.surgery import drop_blocks

    dropped: dict[str, list[int]] = {}
    for side, n in counts.items():
        if not n:
            continue
        total = len(adapter.layer_stacks()[side])
        if n >= total:
            raise ConfigError(
                f"cannot drop {n} of the {side} tower's {total} blocks",
                where=f"--{side}-drop-layers",
                fix=f"drop at most {total - 1}",
            )
        influence = {int(k.split(".")[1]): v for k, v in scores.blocks.items() if k.startswith(side + ".")}
        dropped[side] = sorted(sorted(influence, key=lambda i: influence[i])[:n])
        drop_blocks(adapter, side, dropped[side])
    if dropped:
        write_record(adapter)
    return dropped


def _uniform_expansion(plan: Any, blocks: list) -> None:
    """If the layers of a tower ended with different KV head counts (``--gqa expand`` copies KV heads only where
    the kept query heads form unequal groups), copy them in all of its layers: the KV cache keeps one geometry
    per model, which the runtime and TensorRT profiles assume."""
    from edgelvm.prune.importance import key

    for side in ("vision", "text"):
        side_blocks = [b for b in blocks if b.side == side and key(b.side, b.layer) in plan.layers]
        kv_counts = {len(plan.layers[key(b.side, b.layer)].keep_kv_heads or [None] * b.kv_heads) for b in side_blocks}
        if len(kv_counts) <= 1:
            continue
        for b in side_blocks:
            lp = plan.layers[key(b.side, b.layer)]
            group = b.heads // b.kv_heads
            lp.keep_kv_heads = [h // group for h in lp.keep_heads]


def _dummy(n: int) -> Any:
    import numpy as np

    return np.zeros(n)


def _ticking(batches: Any, tick: Any) -> Any:
    """``batches`` unchanged, advancing the progress bar by each batch's rows after it was used."""
    for batch in batches:
        yield batch
        if tick:
            tick(batch[2])


def _with_progress(cfg: PruneConfig, total: int, work: Any) -> Any:
    if not cfg.progress:
        return work(None)
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("calibration", total=total)
        return work(lambda n: progress.advance(task, n))


def _recover(adapter: Any, source: str, cfg: PruneConfig, records: list, stage: Path) -> dict[str, Any]:
    """Distil the pruned model from the unpruned one (the distill stage's trainer), in place."""
    from edgelvm.distill import DistillConfig, distill
    from edgelvm.models import load_model

    teacher = load_model(source)
    data = cfg.recover_data if cfg.recover_data is not None else records
    work = stage / "recovery"
    report = distill(
        teacher,
        adapter,
        data,
        DistillConfig(out=work, steps=cfg.recover_steps, lr=cfg.recover_lr, batch_size=cfg.batch_size,
                      warmup=max(1, cfg.recover_steps // 20), feature_weight=1.0, progress=cfg.progress,
                      save_every=max(1, cfg.recover_steps)),
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    adapter.model.eval()
    return {"steps": report.steps, "samples": report.samples, "seconds": report.wall_seconds,
            "final": report.history[-1] if report.history else None}  # fmt: skip

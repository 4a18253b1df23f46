"""``edgelvm prune``: the CLI shell over :func:`edgelvm.prune.prune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def prune_command(
    model: Annotated[str, typer.Argument(help="Checkpoint directory (or hub id when online).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the pruned checkpoint and report.")],
    calib: Annotated[
        str | None, typer.Option(help="Calibration data: jsonl (LLaVA conversation format), or 'shapes'.")
    ] = None,
    vision_heads: Annotated[float, typer.Option(help="Fraction of vision attention heads to remove.")] = 0.0,
    text_heads: Annotated[float, typer.Option(help="Fraction of language-model query heads to remove.")] = 0.0,
    vision_mlp: Annotated[float, typer.Option(help="Fraction of vision MLP neurons to remove.")] = 0.0,
    text_mlp: Annotated[float, typer.Option(help="Fraction of language-model MLP neurons to remove.")] = 0.0,
    vision_drop_layers: Annotated[int, typer.Option(help="Whole vision blocks to remove (least influential).")] = 0,
    text_drop_layers: Annotated[int, typer.Option(help="Whole language-model blocks to remove.")] = 0,
    importance: Annotated[str, typer.Option(help="activation | gradient | magnitude | random")] = "activation",
    gqa: Annotated[
        str,
        typer.Option(
            help="per_group (same query heads from each KV group) | kv_groups (whole groups) | expand (any query "
            "heads; KV heads copied where groups become unequal)"
        ),
    ] = "per_group",
    mlp_ranking: Annotated[str, typer.Option(help="uniform (per layer) | global (per tower)")] = "uniform",
    calib_limit: Annotated[int, typer.Option(help="Calibration records used.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Calibration / recovery batch size.")] = 16,
    recover_steps: Annotated[int, typer.Option(help="Distil the pruned model from the original for N steps.")] = 0,
    recover_data: Annotated[Path | None, typer.Option(help="Recovery data (default: the calibration data).")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Remove whole attention heads (vision and language, GQA-aware) and MLP neurons, scored on calibration data.

    Example:  edgelvm prune models/shapes-teacher --calib data/shapes/val -o runs/pruned \\
                  --vision-heads 0.5 --text-heads 0.25 --text-mlp 0.3 --recover-steps 300
    """
    from rich.console import Console

    from edgelvm.prune import PruneConfig, prune
    from edgelvm.prune.importance import importance_by_name

    report = prune(
        model,
        calib,
        PruneConfig(
            out=out,
            vision_heads=vision_heads,
            text_heads=text_heads,
            vision_mlp=vision_mlp,
            text_mlp=text_mlp,
            vision_drop_layers=vision_drop_layers,
            text_drop_layers=text_drop_layers,
            importance=importance_by_name(importance),
            gqa=gqa,
            mlp_ranking=mlp_ranking,
            calib_limit=calib_limit,
            batch_size=batch_size,
            recover_steps=recover_steps,
            recover_data=recover_data,
            force=force,
        ),
    )
    b, a = report.before, report.after
    Console(stderr=True).print(
        f"parameters {b['parameters'] / 1e6:.2f}M -> {a['parameters'] / 1e6:.2f}M, "
        f"FLOPs/image {b['flops_per_image'] / 1e6:.1f}M -> {a['flops_per_image'] / 1e6:.1f}M, "
        f"FLOPs/token {b['flops_per_token'] / 1e6:.2f}M -> {a['flops_per_token'] / 1e6:.2f}M\n"
        f"pruned checkpoint: {out} (reload with edgelvm.models.load_model; report: {out / 'prune_report.json'})"
    )

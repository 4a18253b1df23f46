"""``edgelvm distill``: the CLI shell over :func:`edgelvm.distill.distill`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def distill_command(
    teacher: Annotated[str, typer.Argument(help="Teacher checkpoint directory (or hub id when online).")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Training data: jsonl (LLaVA conversation format).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the student checkpoint and report.")],
    student: Annotated[
        str | None, typer.Option(help="Student checkpoint directory or config.json (default: derive one).")
    ] = None,
    derive: Annotated[
        str,
        typer.Option(help="Derive the student from the teacher, e.g. 'text_layers=2,text_hidden=128,vision_layers=2'."),
    ] = "text_layers=2",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Samples per micro-batch and process.")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule with warmup).")] = 5e-4,
    warmup: Annotated[int, typer.Option(help="Warmup steps.")] = 50,
    divergence: Annotated[str, typer.Option(help="forward_kl | reverse_kl | js")] = "forward_kl",
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the divergence.")] = 1.0,
    kd_weight: Annotated[float, typer.Option(help="Weight of the divergence on response tokens.")] = 1.0,
    ce_weight: Annotated[float, typer.Option(help="Weight of cross-entropy on the ground truth.")] = 0.0,
    visual_kd_weight: Annotated[float, typer.Option(help="Weight of the divergence at image-token positions.")] = 0.0,
    feature_weight: Annotated[float, typer.Option(help="Weight of the image-feature MSE (learned projection).")] = 0.0,
    hidden_weight: Annotated[float, typer.Option(help="Weight of the last-hidden-state MSE.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Online KD on the teacher's top-k tokens only.")] = None,
    cache_teacher: Annotated[
        Path | None, typer.Option(help="Run the teacher once, store its top-k logits here, train from them.")
    ] = None,
    cache_top_k: Annotated[int, typer.Option(help="Logits kept per token in the cache.")] = 64,
    teacher_generate: Annotated[
        bool, typer.Option(help="Train on the teacher's own greedy answers (sequence-level KD).")
    ] = False,
    val_data: Annotated[Path | None, typer.Option(help="Validation jsonl: teacher-forced exact match.")] = None,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (0: at the end only).")] = 0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 200,
    seed: Annotated[int, typer.Option(help="Data order and initialisation seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the unfinished run in --out.")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Stop after N steps with a resumable checkpoint.")] = None,
    mixed_precision: Annotated[str, typer.Option(help="no | bf16 | fp16")] = "no",
) -> None:
    """Distil a teacher VLM into a smaller student (logit KD, optional feature losses, offline teacher cache).

    Example:  edgelvm distill models/shapes-teacher -d data/shapes/train -o runs/student \\
                  --derive text_layers=2,text_hidden=128,vision_layers=2,vision_hidden=96 --steps 600

    Several processes:  accelerate launch --multi_gpu --num_processes 2 -m edgelvm.cli distill ...
    (GPUs, or CPU processes on a machine without one; accelerate's --cpu launches several only under MPI)
    """
    from rich.console import Console

    from edgelvm.distill import DistillConfig, StudentSpec, distill

    config = DistillConfig(
        out=out,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        divergence=divergence,
        temperature=temperature,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        visual_kd_weight=visual_kd_weight,
        feature_weight=feature_weight,
        hidden_weight=hidden_weight,
        top_k=top_k,
        cache_teacher=cache_teacher,
        cache_top_k=cache_top_k,
        teacher_generate=teacher_generate,
        val_data=val_data,
        eval_every=eval_every,
        save_every=save_every,
        seed=seed,
        resume=resume,
        stop_after=stop_after,
        mixed_precision=mixed_precision,
    )
    report = distill(teacher, student if student is not None else StudentSpec.parse(derive), data, config)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun every process returns the report
        return
    console = Console(stderr=True)
    ratio = report.student_params / max(report.teacher_params, 1)
    state = "done" if report.finished else f"stopped at step {report.steps} (continue with --resume)"
    console.print(
        f"{state}: student {report.student_params / 1e6:.2f}M parameters ({ratio:.0%} of the teacher), "
        f"{report.samples} samples in {report.wall_seconds:.0f} s"
    )
    if report.evals:
        console.print(f"val exact match: {report.evals[-1]['val_exact_match']}")
    if report.finished:
        console.print(f"student: {out}   report: {out / 'distill_report.json'}")

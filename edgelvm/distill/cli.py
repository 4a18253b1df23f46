"""``edgelvm distill``: the CLI shell over :func:`edgelvm.distill.distill`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def distill_command(
    data: Annotated[Path, typer.Option("--data", "-d", help="Training data: jsonl (LLaVA conversation format).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the student checkpoint and report.")],
    teacher: Annotated[
        str | None,
        typer.Argument(
            help="Teacher checkpoint directory (or hub id when online). With --teacher-api: only the checkpoint a "
            "derived student is derived from (optional with --student)."
        ),
    ] = None,
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
    kd_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight of the divergence on response tokens [default: 1; with --teacher-api: 1 when "
            "--teacher-top-logprobs is set, else 0]."
        ),
    ] = None,
    ce_weight: Annotated[
        float | None,
        typer.Option(help="Weight of cross-entropy on the ground truth (the API teacher's text) [default: 0; 1]."),
    ] = None,
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
    teacher_api: Annotated[
        str | None,
        typer.Option(
            help="The teacher is this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1); its API key is "
            "read from $EDGELVM_TEACHER_API_KEY.",
            rich_help_panel="API teacher",
        ),
    ] = None,
    teacher_model: Annotated[
        str | None, typer.Option(help="The served model id.", rich_help_panel="API teacher")
    ] = None,
    teacher_top_logprobs: Annotated[
        int,
        typer.Option(
            help="Ask for top-k log-probabilities (token-level KD; 0: text only).", rich_help_panel="API teacher"
        ),
    ] = 0,
    teacher_tokenizer: Annotated[
        str | None,
        typer.Option(
            help="The API teacher's tokenizer (dir or hub id), needed for token-level KD.",
            rich_help_panel="API teacher",
        ),
    ] = None,
    teacher_temperature: Annotated[float, typer.Option(rich_help_panel="API teacher")] = 0.0,
    teacher_max_tokens: Annotated[int, typer.Option(rich_help_panel="API teacher")] = 128,
    teacher_cache: Annotated[
        Path | None,
        typer.Option(
            help="Where answers are cached [default: OUT/.distill/teacher_api].", rich_help_panel="API teacher"
        ),
    ] = None,
    teacher_concurrency: Annotated[int, typer.Option(help="Requests in flight.", rich_help_panel="API teacher")] = 4,
    teacher_rate: Annotated[
        float, typer.Option(help="Requests per second at most (0: no limit).", rich_help_panel="API teacher")
    ] = 10.0,
    teacher_retries: Annotated[
        int, typer.Option(help="Retries with backoff (429, 5xx, timeouts).", rich_help_panel="API teacher")
    ] = 6,
    teacher_timeout: Annotated[float, typer.Option(help="Seconds per request.", rich_help_panel="API teacher")] = 120.0,
) -> None:
    """Distil a teacher VLM into a smaller student (logit KD, optional feature losses, offline teacher cache).

    Example:  edgelvm distill models/shapes-teacher -d data/shapes/train -o runs/student \\
                  --derive text_layers=2,text_hidden=128,vision_layers=2,vision_hidden=96 --steps 600

    Several processes:  accelerate launch --multi_gpu --num_processes 2 -m edgelvm.cli distill ...
    (GPUs, or CPU processes on a machine without one; accelerate's --cpu launches several only under MPI)

    A teacher behind an API:  edgelvm distill models/base -d data/train -o runs/student \
                  --teacher-api http://127.0.0.1:8000/v1 --teacher-model llava --steps 600
    """
    from rich.console import Console

    from edgelvm.distill import DistillConfig, StudentSpec, TeacherAPIConfig, distill
    from edgelvm.errors import ConfigError

    api = None
    if teacher_api is not None:
        if not teacher_model:
            raise ConfigError(
                "--teacher-api needs --teacher-model", where="--teacher-model", fix="name the served model"
            )
        api = TeacherAPIConfig(
            url=teacher_api,
            model=teacher_model,
            temperature=teacher_temperature,
            max_tokens=teacher_max_tokens,
            top_logprobs=teacher_top_logprobs,
            tokenizer=teacher_tokenizer,
            cache=teacher_cache,
            concurrency=teacher_concurrency,
            requests_per_second=teacher_rate or None,
            max_retries=teacher_retries,
            timeout=teacher_timeout,
        )
        kd_weight = kd_weight if kd_weight is not None else (1.0 if teacher_top_logprobs else 0.0)
        ce_weight = ce_weight if ce_weight is not None else 1.0
    elif teacher is None:
        raise ConfigError("no teacher", where="TEACHER", fix="give a teacher checkpoint, or --teacher-api URL")

    config = DistillConfig(
        out=out,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        divergence=divergence,
        temperature=temperature,
        kd_weight=kd_weight if kd_weight is not None else 1.0,
        ce_weight=ce_weight if ce_weight is not None else 0.0,
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
        teacher_api=api,
    )
    report = distill(teacher, student if student is not None else StudentSpec.parse(derive), data, config)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun every process returns the report
        return
    console = Console(stderr=True)
    ratio = report.student_params / max(report.teacher_params, 1)
    state = "done" if report.finished else f"stopped at step {report.steps} (continue with --resume)"
    size = f"({ratio:.0%} of the teacher)" if report.teacher_params else "(API teacher)"
    console.print(
        f"{state}: student {report.student_params / 1e6:.2f}M parameters {size}, "
        f"{report.samples} samples in {report.wall_seconds:.0f} s"
    )
    if report.teacher_api:
        t = report.teacher_api
        console.print(
            f"teacher answers: {t['answered']} used, {t['malformed']} malformed (skipped), {t['asked']} asked now, "
            f"{t['from_cache']} from the cache"
        )
    if report.evals:
        console.print(f"val exact match: {report.evals[-1]['val_exact_match']}")
    if report.finished:
        console.print(f"student: {out}   report: {out / 'distill_report.json'}")

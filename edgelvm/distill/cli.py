"""``edgelvm distill``: the CLI shell over :func:`edgelvm.distill.distill`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from edgelvm.cli_options import config_options
from edgelvm.distill.config import DistillConfig, TeacherAPIConfig


@config_options(TeacherAPIConfig, "api_options", prefix="teacher_", panel="API teacher")
@config_options(DistillConfig, "options")
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
    options: dict[str, Any] | None = None,
    api_options: dict[str, Any] | None = None,
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

    from edgelvm.distill import StudentSpec, distill
    from edgelvm.errors import ConfigError

    options, api_options = dict(options or {}), dict(api_options or {})
    api = None
    if api_options.get("url") is not None:
        if not api_options.get("model"):
            raise ConfigError(
                "--teacher-api needs --teacher-model", where="--teacher-model", fix="name the served model"
            )
        api = TeacherAPIConfig(**{**api_options, "requests_per_second": api_options["requests_per_second"] or None})
        if options["kd_weight"] is None:
            options["kd_weight"] = 1.0 if api.top_logprobs else 0.0
        if options["ce_weight"] is None:
            options["ce_weight"] = 1.0
    elif teacher is None:
        raise ConfigError("no teacher", where="TEACHER", fix="give a teacher checkpoint, or --teacher-api URL")
    defaults = DistillConfig()
    for name in ("kd_weight", "ce_weight"):  # the CLI's None: the library's default without an API teacher
        if options[name] is None:
            options[name] = getattr(defaults, name)
    config = DistillConfig(**options, out=out, teacher_api=api)
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

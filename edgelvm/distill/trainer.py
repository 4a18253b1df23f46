"""``distill(teacher, student, train_data, DistillConfig) -> DistillReport``: the distillation trainer.

Design:
- One process or many (``accelerate launch``): each rank takes its own slice of every global batch, chosen by a
  pure function of (seed, sample number), and DDP averages gradients. Nothing depends on a DataLoader's state, so
  ``--resume`` continues *exactly*: same data, same learning rate, same optimizer moments.
- Checkpoints go to ``OUT/.distill/checkpoint`` (student, projections, optimizer, state) through a temporary
  sibling and a rename; the finished student is written into ``OUT`` (a normal Hugging Face checkpoint) and
  ``OUT/distill_report.json`` last, so a directory with a report is complete.
- With ``cache_teacher`` the teacher runs once over the data (top-k logits and image features into safetensors
  shards) and is then released: the student trains without the teacher in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelvm.data.batches import ConversationEncoder, batch_indices, collate, dataset_fingerprint
from edgelvm.data.jsonl import VQARecord, load_jsonl_dataset
from edgelvm.distill.config import TEACHER_DTYPES, DistillConfig, DistillReport
from edgelvm.errors import ConfigError
from edgelvm.fsutil import write_dir_atomically
from edgelvm.models.checkpoint.save import save_checkpoint_files

log = logging.getLogger(__name__)

STATE_DIR = ".distill"
REPORT = "distill_report.json"


# ------------------------------------------------------------------------------------------------ output directory


def _prepare_out(cfg: DistillConfig, run_id: dict[str, Any], is_main: bool) -> tuple[Path, dict[str, Any] | None]:
    """Refuse a directory holding anything but this run; return (state dir, saved state to resume or None).

    ``OUT/.distill/run.json`` marks a run in progress (written before any work, so teacher responses and caches
    produced before the first checkpoint are reused by ``--resume`` too)."""
    out = Path(cfg.out)
    state_dir = out / STATE_DIR
    run_file = state_dir / "run.json"
    if out.exists() and not out.is_dir():
        raise ConfigError("the output path is a file", where=out, fix="choose a directory for the student")
    if (out / REPORT).is_file():
        raise ConfigError(
            "the output directory already holds a finished distillation", where=out, fix="choose a new --out directory"
        )
    if out.exists() and any(out.iterdir()):
        if not run_file.is_file():
            raise ConfigError(
                "the output directory is not empty and holds no distillation run",
                where=out,
                fix="choose a new --out directory",
            )
        saved_run = json.loads(run_file.read_text())
        if saved_run != run_id:
            diff = sorted(k for k in set(saved_run) | set(run_id) if saved_run.get(k) != run_id.get(k))
            raise ConfigError(
                f"the output directory holds another run (differs in: {', '.join(diff)})",
                where=out,
                fix="resume it with the same teacher, student, data and options, or choose a new --out directory",
            )
        state_file = state_dir / "checkpoint" / "state.json"
        saved = json.loads(state_file.read_text()) if state_file.is_file() else None
        if not cfg.resume:
            at = f"step {saved['step']}" if saved else "before its first checkpoint"
            raise ConfigError(
                f"the output directory holds an unfinished run ({at})",
                where=out,
                fix="pass --resume to continue it, or choose a new --out directory",
            )
        return state_dir, saved
    if is_main:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_file.with_name("run.json.tmp")
        tmp.write_text(json.dumps(run_id, indent=1))
        tmp.replace(run_file)
    return state_dir, None


# ------------------------------------------------------------------------------------------------ the wrapped student


def _student_module(student_model: Any, projections: dict[str, Any]) -> Any:
    """Student + learned feature projections in one module, so DDP and the optimizer see all trained weights."""
    import torch

    class StudentWithProjections(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student_model
            self.projections = torch.nn.ModuleDict(projections)

        def forward(self, **inputs: Any) -> Any:
            return self.student(**inputs)

    return StudentWithProjections()


def _lr_at(cfg: DistillConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ------------------------------------------------------------------------------------------------ main entry point


def distill(
    teacher: str | Path | Any | None,
    student: str | Path | Any,
    train_data: str | Path | list[VQARecord],
    config: DistillConfig | None = None,
) -> DistillReport:
    """Distil ``teacher`` (checkpoint path or adapter) into ``student``.

    ``student`` is a :class:`~edgelvm.distill.student.StudentSpec` (derived from the teacher and initialised from its
    weights), a checkpoint directory or ``config.json`` path, or an adapter. Returns the report, also written to
    ``OUT/distill_report.json``; the student is saved to ``OUT`` as a normal Hugging Face checkpoint.

    With ``config.teacher_api`` the teacher is that endpoint; ``teacher`` is then only the checkpoint a derived
    student is derived from (its weights never teach), or None with a student checkpoint.

    Steps: load the models, claim the output (or find the run to resume), turn the teacher into targets where it
    runs ahead of training (API answers, generated answers, the top-k cache), build the trained module and its
    optimizer, run the loop (:func:`_train_loop`), report and save.
    """
    cfg = config or DistillConfig()
    cfg.validate()
    t_start = time.time()
    accelerator = _accelerator(cfg)
    records = train_data if isinstance(train_data, list) else load_jsonl_dataset(train_data)
    api = cfg.teacher_api
    models = _load_models(teacher, student, cfg)
    teacher_adapter, student_adapter = models.teacher, models.student

    encoder = ConversationEncoder.for_adapter(teacher_adapter if api is None else student_adapter)
    if api is not None and cfg.kd_weight > 0:  # before asking anything: KD on its tokens needs the same tokenizer
        from transformers import AutoTokenizer

        from edgelvm.distill.student import check_same_tokenizer

        api_tokenizer = AutoTokenizer.from_pretrained(api.tokenizer)
        check_same_tokenizer(api_tokenizer, encoder.tokenizer, f"teacher_api.tokenizer {api.tokenizer}")
    data_id = dataset_fingerprint(records)
    run_id = {"teacher": models.teacher_name, "student": models.student_desc, "data": data_id, "n": len(records),
              **cfg.fingerprint()}  # fmt: skip
    state_dir, saved = _claim_out(cfg, run_id, accelerator)
    teacher_params = sum(p.numel() for p in teacher_adapter.model.parameters()) if api is None else 0

    # the teacher's work that runs ahead of training
    api_targets, api_stats = None, None
    if api is not None:
        records, api_targets, api_stats = _api_teacher(records, cfg, encoder, state_dir, accelerator)
        data_id = dataset_fingerprint(records)
    if cfg.teacher_generate:
        records = _teacher_responses(teacher_adapter, records, cfg, accelerator)
        data_id = dataset_fingerprint(records)
    cache = None
    if cfg.cache_teacher is not None:
        cache = _teacher_cache(teacher_adapter, records, encoder, cfg, models.teacher_name, data_id, accelerator)

    module, optimizer = _trained_module(models, cfg)
    state: dict[str, Any] = {"run": run_id, "step": 0, "history": [], "evals": []}
    resumed_from = None
    if saved is not None:
        state = _load_checkpoint(state_dir / "checkpoint", module, optimizer, saved)
        resumed_from = state["step"]
        log.info("resuming %s at step %d", cfg.out, state["step"])
    module, optimizer = accelerator.prepare(module, optimizer)
    device = accelerator.device
    teacher_model = teacher_adapter.model if cache is None and api is None else None
    if teacher_model is not None:
        teacher_model.to(device).eval()
    elif teacher_adapter is not None and not hasattr(teacher, "processor"):
        teacher_adapter.model = None  # we loaded it: drop it, the student trains without it in memory
    inner = accelerator.unwrap_model(module)

    from edgelvm.distill.teacher import FeatureTap

    s_tap = FeatureTap(student_adapter.image_feature_module()) if cfg.feature_weight > 0 else None
    t_tap = FeatureTap(teacher_adapter.image_feature_module()) if (cfg.feature_weight > 0 and cache is None) else None
    image_token_id = teacher_adapter.image_token()[1] if cfg.visual_kd_weight > 0 else None
    pad_id = encoder.tokenizer.pad_token_id
    loop = _Loop(
        cfg=cfg, accelerator=accelerator, module=module, optimizer=optimizer, encoder=encoder, records=records,
        step_fn=_StepLoss(cfg, inner, teacher_model, cache, s_tap, t_tap, image_token_id, api_targets),
        state=state, state_dir=state_dir, resumed_from=resumed_from, pad_id=pad_id if pad_id is not None else 0,
        val=load_jsonl_dataset(cfg.val_data)[: cfg.eval_limit] if cfg.val_data else None, inner=inner,
    )  # fmt: skip
    step_first = state["step"]
    loop_seconds = _train_loop(loop)
    finished = state["step"] >= cfg.steps
    if loop.val is not None and finished:
        scores = _evaluate(inner.student, encoder, loop.val, device, loop.pad_id)
        state["evals"].append({"step": state["step"], **scores})

    report = DistillReport(
        out=str(cfg.out),
        teacher=models.teacher_name,
        student_params=sum(p.numel() for p in inner.student.parameters()),
        teacher_params=teacher_params,
        steps=state["step"],
        samples=state["step"] * loop.per_step,
        wall_seconds=round(time.time() - t_start, 2),
        samples_per_second=round((state["step"] - step_first) * loop.per_step / max(loop_seconds, 1e-9), 2),
        data={"records": len(records), "fingerprint": data_id, "teacher_generate": cfg.teacher_generate},
        config={"student": models.student_desc, **cfg.fingerprint()},
        history=state["history"],
        evals=state["evals"],
        resumed_from=resumed_from,
        finished=finished,
        teacher_api=None if api_stats is None else {**api_stats, **(api_targets.stats if api_targets else {})},
    )
    if accelerator.is_main_process and finished:
        _save_final(Path(cfg.out), inner.student, encoder.processor, report, state_dir)
    accelerator.wait_for_everyone()
    for tap in (s_tap, t_tap):
        if tap is not None:
            tap.close()
    return report


# ------------------------------------------------------------------------------------------------ setup steps


def _accelerator(cfg: DistillConfig) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    # towers carry weights their LLaVA use never touches (CLIP's post_layernorm, SigLIP's head): DDP must not wait
    # for their gradients
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp]
    )
    set_seed(cfg.seed)
    return accelerator


@dataclass
class _Models:
    teacher: Any  # adapter; None for an API teacher without a local checkpoint
    teacher_name: str
    student: Any  # adapter
    student_desc: str


def _load_models(teacher: Any, student: Any, cfg: DistillConfig) -> _Models:
    """The teacher and student adapters, checked against each other (family, tokenizer, image layout)."""
    from edgelvm.distill.student import StudentSpec, check_same_tokenizer, derive_student, load_student
    from edgelvm.models import load_model

    api = cfg.teacher_api
    if teacher is None and api is None:
        raise ConfigError("no teacher", where="distill()", fix="give a checkpoint, or DistillConfig.teacher_api")
    teacher_adapter = None
    if teacher is not None:
        teacher_adapter = teacher if hasattr(teacher, "processor") else load_model(
            str(teacher), dtype=TEACHER_DTYPES[cfg.teacher_dtype]
        )
        teacher_adapter.check_stage("distill", cfg)  # a family that cannot be distilled says so before any work
    teacher_name = str(getattr(teacher_adapter, "source", "") or teacher)
    if api is not None:
        teacher_name = f"api:{api.model}"
        if isinstance(student, StudentSpec) and teacher_adapter is None:
            raise ConfigError(
                "a derived student needs a local checkpoint to derive from, and the teacher is an API",
                where="distill(teacher=None, student=StudentSpec)",
                fix="pass a local checkpoint as TEACHER (only the student is derived from it), or --student DIR",
            )

    if isinstance(student, StudentSpec):
        student_model, _ = derive_student(teacher_adapter, student)
        from edgelvm.models.registry import adapter_for_model_type

        student_adapter = adapter_for_model_type(student_model.config.model_type)(
            student_model, teacher_adapter.processor
        )
        student_desc = f"derived {student.to_dict()}" + (f" from {teacher}" if api is not None else "")
    elif hasattr(student, "processor"):
        student_adapter = student
        if teacher_adapter is not None and api is None:
            check_same_tokenizer(teacher_adapter.processor.tokenizer, student.processor.tokenizer, "student")
        student_desc = str(getattr(student, "source", "adapter"))
    else:
        student_adapter = load_student(student, teacher_adapter)
        student_desc = str(student)
    student_adapter.model.train()
    if teacher_adapter is None:
        student_adapter.check_stage("distill", cfg)

    image_losses = cfg.visual_kd_weight > 0 or cfg.feature_weight > 0
    if image_losses and student_adapter.tokens_per_image() != teacher_adapter.tokens_per_image():
        raise ConfigError(
            f"the student has {student_adapter.tokens_per_image()} tokens per image, the teacher "
            f"{teacher_adapter.tokens_per_image()}: image-position losses need the same layout",
            where="DistillConfig.visual_kd_weight / feature_weight",
            fix="set those weights to 0, or give the student the teacher's patch grid",
        )
    return _Models(teacher_adapter, teacher_name, student_adapter, student_desc)


def _claim_out(cfg: DistillConfig, run_id: dict[str, Any], accelerator: Any) -> tuple[Path, dict[str, Any] | None]:
    """The state directory and the checkpoint state to resume from (None: a fresh run). The main process checks
    and claims the directory; the others wait (checking too would race with the claim)."""
    if accelerator.is_main_process:
        state_dir, saved = _prepare_out(cfg, run_id, True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        state_dir = Path(cfg.out) / STATE_DIR
        state_file = state_dir / "checkpoint" / "state.json"
        saved = json.loads(state_file.read_text()) if cfg.resume and state_file.is_file() else None
    return state_dir, saved


def _trained_module(models: _Models, cfg: DistillConfig) -> tuple[Any, Any]:
    """The student with the feature losses' learned projections, and its AdamW (no decay on norms, biases and
    embeddings)."""
    import torch

    from edgelvm.distill.losses import feature_projection

    projections: dict[str, Any] = {}
    for name, weight in (("features", cfg.feature_weight), ("hidden", cfg.hidden_weight)):
        if weight > 0:
            projections[name] = feature_projection(
                models.student.text_config.hidden_size, models.teacher.text_config.hidden_size
            )
    module = _student_module(models.student.model, projections)
    decay = [p for n, p in module.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in module.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    return module, optimizer


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class _Loop:
    cfg: DistillConfig
    accelerator: Any
    module: Any
    optimizer: Any
    encoder: ConversationEncoder
    records: list[VQARecord]
    step_fn: Any
    state: dict[str, Any]  # step, history, evals: what a checkpoint saves
    state_dir: Path
    resumed_from: int | None
    pad_id: int
    val: list[VQARecord] | None
    inner: Any  # the unwrapped module (student + projections)

    @property
    def per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes


def _train_loop(loop: _Loop) -> float:
    """Optimizer steps until ``cfg.steps`` (or ``stop_after``), logging, evaluating and checkpointing on the way;
    returns the loop's seconds."""
    cfg, state = loop.cfg, loop.state
    progress = _progress(cfg, loop.accelerator)
    task = progress.add_task("distill", total=cfg.steps, completed=state["step"], info="") if progress else None
    t0 = t_loop = time.time()
    t_first = state["step"]
    running: dict[str, float] = {}
    with progress or contextlib.nullcontext():
        while state["step"] < cfg.steps:
            parts = _optimizer_step(loop, state["step"])
            state["step"] = step = state["step"] + 1
            for k, v in parts.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            if step % cfg.log_every == 0 or step == cfg.steps:
                rate = (step - t_first) * loop.per_step / max(time.time() - t0, 1e-9)
                state["history"].append({"step": step, **{k: round(v, 5) for k, v in running.items()}})
                if progress:
                    info = " ".join(f"{k} {v:.4f}" for k, v in running.items()) + f" | {rate:.1f} samples/s"
                    progress.update(task, completed=step, info=info)
            if loop.val is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                scores = _evaluate(loop.inner.student, loop.encoder, loop.val, loop.accelerator.device, loop.pad_id)
                state["evals"].append({"step": step, **scores})
            stopping = cfg.stop_after is not None and step - (loop.resumed_from or 0) >= cfg.stop_after
            if (step % cfg.save_every == 0 or stopping) and step < cfg.steps:
                t0, t_first = time.time(), step  # the rate shown excludes checkpoint writes
                _save_checkpoint(loop.state_dir / "checkpoint", loop.accelerator, loop.module, loop.optimizer, state)
            elif progress:
                progress.update(task, completed=step)
            if stopping and step < cfg.steps:
                break
    return time.time() - t_loop


def _optimizer_step(loop: _Loop, step: int) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches (this rank's slice of each global batch); the loss
    terms averaged over them."""
    cfg, accelerator, module = loop.cfg, loop.accelerator, loop.module
    world, rank = accelerator.num_processes, accelerator.process_index
    for g in loop.optimizer.param_groups:
        g["lr"] = _lr_at(cfg, step)
    parts: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        first = (step * cfg.grad_accum + micro) * cfg.batch_size * world + rank * cfg.batch_size
        idx = batch_indices(len(loop.records), cfg.seed, first, cfg.batch_size)
        batch = collate([loop.encoder.encode(loop.records[i]) for i in idx], idx, loop.pad_id)
        sync = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(module), accelerator.autocast():
            loss, terms = loop.step_fn(module, batch, accelerator.device)
            accelerator.backward(loss / cfg.grad_accum)
        for k, v in terms.items():
            parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
    if cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return parts


# ------------------------------------------------------------------------------------------------ one step's loss


class _StepLoss:
    """All loss terms of one micro-batch; returns (total, {term: value})."""

    def __init__(self, cfg, module, teacher_model, cache, s_tap, t_tap, image_token_id, api_targets=None) -> None:
        self.cfg, self.module, self.teacher, self.cache = cfg, module, teacher_model, cache
        self.s_tap, self.t_tap, self.image_token_id = s_tap, t_tap, image_token_id
        self.api_targets = api_targets

    def __call__(self, module: Any, batch: Any, device: Any) -> tuple[Any, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        from edgelvm.distill.losses import TeacherTargets, divergence, feature_mse
        from edgelvm.distill.teacher import run_model, target_positions

        cfg = self.cfg
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        labels = batch.labels.to(device)
        want_hidden = cfg.hidden_weight > 0
        s = run_model(
            module, inputs, labels, image_token_id=self.image_token_id, tap=self.s_tap, want_hidden=want_hidden
        )
        t_feats = None
        kd_logits = s.target_logits
        if self.cfg.teacher_api is not None:
            kd_logits, targets = self._api_kd(s, labels, batch.indices, device)
        elif self.cache is None:
            with torch.no_grad():
                t = run_model(
                    self.teacher, inputs, labels, image_token_id=self.image_token_id, tap=self.t_tap,
                    want_hidden=want_hidden,
                )  # fmt: skip
            targets = TeacherTargets.from_logits(t.target_logits, cfg.top_k)
            t_feats = t.image_features
        else:
            got = [self.cache.get(i) for i in batch.indices]
            targets = TeacherTargets(
                torch.cat([g[0] for g in got]).to(device), torch.cat([g[1] for g in got]).to(device)
            )
            if cfg.feature_weight > 0:
                t_feats = torch.stack([g[2] for g in got]).to(device)
        terms: dict[str, Any] = {}
        if cfg.kd_weight > 0:
            terms["kd"] = divergence(kd_logits, targets, cfg.divergence, cfg.temperature)
        if cfg.ce_weight > 0:
            b, tt = target_positions(labels)
            terms["ce"] = F.cross_entropy(s.target_logits.float(), labels[b, tt + 1])
        if cfg.visual_kd_weight > 0:
            vis = TeacherTargets.from_logits(t.image_logits, cfg.top_k)
            terms["visual_kd"] = divergence(s.image_logits, vis, cfg.divergence, cfg.temperature)
        if cfg.feature_weight > 0:
            proj = self.module.projections["features"]
            terms["features"] = feature_mse(s.image_features.reshape((*t_feats.shape[:-1], -1)), t_feats, proj)
        if cfg.hidden_weight > 0:
            terms["hidden"] = feature_mse(s.hidden, t.hidden, self.module.projections["hidden"])
        weights = {
            "kd": cfg.kd_weight,
            "ce": cfg.ce_weight,
            "visual_kd": cfg.visual_kd_weight,
            "features": cfg.feature_weight,
            "hidden": cfg.hidden_weight,
        }
        total = sum(weights[k] * v for k, v in terms.items())
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["loss"] = float(total.detach())
        return total, values

    def _api_kd(self, s: Any, labels: Any, indices: list[int], device: Any) -> tuple[Any, Any]:
        """The student's logits at the target rows that have teacher log-probabilities, and those (top-k)."""
        import torch

        from edgelvm.distill.losses import TeacherTargets
        from edgelvm.distill.teacher import target_positions

        if self.api_targets is None:  # kd_weight 0
            return s.target_logits[:0], None
        b, t = target_positions(labels)
        target_ids = labels[b, t + 1].tolist()
        rows, values, ids, start = [], [], [], 0
        for index, n in zip(indices, s.rows_per_sample):
            got = self.api_targets.get(index, target_ids[start : start + n])
            if got is not None:
                rows.extend(range(start, start + got[0].shape[0]))
                values.append(got[0])
                ids.append(got[1])
            start += n
        if not rows:
            k = self.api_targets.k
            return s.target_logits[:0], TeacherTargets(torch.zeros(0, k, device=device), torch.zeros(0, k).long())
        targets = TeacherTargets(torch.cat(values).to(device), torch.cat(ids).to(device))
        return s.target_logits[torch.tensor(rows, device=device)], targets


# ------------------------------------------------------------------------------------------------ teacher helpers


def _teacher_responses(adapter: Any, records: list[VQARecord], cfg: DistillConfig, accelerator: Any) -> list[VQARecord]:
    """Replace each record's answer with the teacher's greedy answer (stored beside the run, reused on resume)."""
    import dataclasses

    from edgelvm.eval.answerers import HFAnswerer

    if any(len(r.turns) != 2 for r in records):
        raise ConfigError(
            "teacher_generate supports single-turn records (one question, one answer)",
            where="DistillConfig.teacher_generate",
            fix="split multi-turn conversations into single turns, or train on the ground truth",
        )
    path = Path(cfg.out) / STATE_DIR / "teacher_responses.json"
    answers: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    todo = [r for r in records if r.id not in answers]
    if todo:
        side = adapter.processor.tokenizer.padding_side
        answerer = HFAnswerer.from_adapter(adapter)  # generates left-padded
        try:
            for lo in range(0, len(todo), 32):
                chunk = todo[lo : lo + 32]
                for r, (text, _) in zip(chunk, answerer.answer(chunk, cfg.max_new_tokens)):
                    answers[r.id] = text
        finally:
            adapter.processor.tokenizer.padding_side = side
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(answers))
            tmp.replace(path)
    out = []
    for r in records:
        conv = list(r.conversations)
        conv[1] = {**conv[1], "value": answers[r.id]}
        out.append(dataclasses.replace(r, answer=answers[r.id], conversations=tuple(conv)))
    return out


def _api_teacher(records, cfg, encoder, state_dir, accelerator):
    """The API teacher answers every record (cached, resumable); returns (records with its answers, KD targets or
    None, answering stats)."""
    from edgelvm.distill.teacher_api import APITargets, answer_records, answered_records, progress_bar

    api = cfg.teacher_api
    root = Path(api.cache) if api.cache is not None else state_dir / "teacher_api"
    if accelerator.is_main_process:
        with progress_bar(cfg.progress) as progress:
            answers = answer_records(records, api, root, progress=progress)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        answers = answer_records(records, api, root, ask=False)
    teacher_records, tokens = answered_records(records, answers)
    if not teacher_records:
        raise ConfigError(
            f"none of the {len(records)} teacher answers is usable ({answers.stats['malformed']} malformed)",
            where=root,
            fix="look at the cached answers (status, problem, raw) and the server's log",
        )
    targets = None
    if cfg.kd_weight > 0:
        if not answers.stats["with_logprobs"]:
            raise ConfigError(
                f"the teacher API returned no logprobs for any of its {len(teacher_records)} answers, so token-level "
                "KD has nothing to learn from",
                where=api.url,
                fix="set kd_weight=0 (the student learns the teacher's text), or use a server that returns "
                "top_logprobs (vLLM, llama.cpp's server, OpenAI)",
            )
        targets = APITargets(encoder.tokenizer, tokens, api.top_logprobs + 1)
    return teacher_records, targets, answers.stats


def _teacher_cache(adapter, records, encoder, cfg, teacher_name, data_id, accelerator):
    import torch

    from edgelvm.distill.cache import CacheKey, TeacherCache, build_cache, check_or_start
    from edgelvm.distill.teacher import FeatureTap, run_model

    root = Path(cfg.cache_teacher)
    key = CacheKey(teacher_name, data_id, cfg.cache_top_k, len(records), cfg.feature_weight > 0, cfg.cache_shard_size)
    complete = check_or_start(root, key) if accelerator.is_main_process else True
    accelerator.wait_for_everyone()
    if not complete and accelerator.is_main_process:
        model = adapter.model.to(accelerator.device).eval()
        tap = FeatureTap(adapter.image_feature_module()) if key.features else None
        pad_id = encoder.tokenizer.pad_token_id or 0

        def compute(indices: list[int]) -> list[tuple]:
            out = []
            for lo in range(0, len(indices), cfg.batch_size):
                idx = indices[lo : lo + cfg.batch_size]
                batch = collate([encoder.encode(records[i]) for i in idx], idx, pad_id)
                inputs = {k: v.to(accelerator.device) for k, v in batch.inputs.items()}
                with torch.no_grad():
                    res = run_model(model, inputs, batch.labels.to(accelerator.device), tap=tap)
                values, ids = torch.topk(res.target_logits.float(), key.top_k, dim=-1)
                start = 0
                for row, n in enumerate(res.rows_per_sample):
                    feats = res.image_features[row].cpu() if key.features else None
                    out.append((values[start : start + n].cpu(), ids[start : start + n].cpu(), feats))
                    start += n
            return out

        progress = _progress(cfg, accelerator)
        if progress:
            with progress:
                task = progress.add_task("teacher cache", total=len(records), info="")
                build_cache(root, key, compute, lambda n: progress.advance(task, n))
        else:
            build_cache(root, key, compute)
        if tap is not None:
            tap.close()
    accelerator.wait_for_everyone()
    return TeacherCache(root, key)


# ------------------------------------------------------------------------------------------------ eval, save, load


def _evaluate(model: Any, encoder: ConversationEncoder, records: list[VQARecord], device: Any, pad_id: int) -> dict:
    """Teacher-forced exact match per question type: "argmax right at every response token" equals greedy
    decoding reproducing the answer exactly, at the cost of one forward pass."""
    import torch

    from edgelvm.distill.teacher import target_positions

    was_training = model.training
    model.eval()
    hits: dict[str, int] = {}
    total: dict[str, int] = {}
    with torch.no_grad():
        for lo in range(0, len(records), 32):
            chunk = records[lo : lo + 32]
            batch = collate([encoder.encode(r) for r in chunk], list(range(len(chunk))), pad_id)
            logits = model(**{k: v.to(device) for k, v in batch.inputs.items()}).logits
            labels = batch.labels.to(device)
            b, t = target_positions(labels)
            wrong = torch.zeros(len(chunk), dtype=torch.long, device=device)
            wrong.index_add_(0, b, (logits[b, t].argmax(-1) != labels[b, t + 1]).long())
            for r, w in zip(chunk, wrong.tolist()):
                q = r.qtype or "all"
                total[q] = total.get(q, 0) + 1
                hits[q] = hits.get(q, 0) + int(w == 0)
    model.train(was_training)
    acc = {q: round(hits[q] / total[q], 4) for q in sorted(total)}
    acc["all"] = round(sum(hits.values()) / max(1, sum(total.values())), 4)
    return {"val_exact_match": acc}


def _save_checkpoint(path: Path, accelerator: Any, module: Any, optimizer: Any, state: dict) -> None:
    import torch

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(module)

        def write(tmp: Path) -> None:
            # the module's own state dict (exact names, tied weights included), not save_pretrained's file layout
            torch.save(inner.state_dict(), tmp / "module.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(torch.get_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))

        write_dir_atomically(path, write)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, module: Any, optimizer: Any, saved: dict) -> dict:
    import torch

    try:
        module.load_state_dict(torch.load(path / "module.pt", weights_only=True))
    except RuntimeError as e:
        raise ConfigError(
            f"the saved checkpoint does not fit the student ({str(e).splitlines()[0]})",
            where=path,
            fix="start over in a new --out directory",
        ) from e
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return saved


def _save_final(out: Path, student: Any, processor: Any, report: DistillReport, state_dir: Path) -> None:
    """Write the student into ``out`` (each file through a temporary name), the report last, then drop the
    resumable checkpoint (optimizer state is 2x the model)."""
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        save_checkpoint_files(student, processor, stage)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report.write(out / REPORT)
    shutil.rmtree(state_dir / "checkpoint", ignore_errors=True)


def _progress(cfg: DistillConfig, accelerator: Any) -> Any:
    if not (cfg.progress and accelerator.is_main_process):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    )

"""``evaluate(model, data, EvalConfig(...)) -> EvalReport``: accuracy per question type, hallucination rate and,
against a reference (the teacher), top-1 token agreement and mean KL along the reference's own answers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelvm.data.jsonl import VQARecord, load_jsonl_dataset
from edgelvm.errors import ConfigError
from edgelvm.eval.answerers import Answerer, open_answerer
from edgelvm.eval.metrics import ScoredItem, agreement, item_dicts, normalize_answer, summarize
from edgelvm.manifest import write_text_atomic


@dataclass
class EvalConfig:
    max_new_tokens: int = 32
    batch_size: int = 16
    limit: int | None = None  # evaluate the first N records
    reference: str | Path | None = None  # teacher: bundle or checkpoint
    agreement_limit: int = 200  # records scored by teacher forcing (one sequence at a time)


@dataclass
class EvalReport:
    model: str
    data: str
    metrics: dict[str, Any]
    items: list[ScoredItem] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "seconds": self.seconds,
            "metrics": self.metrics,
            "items": item_dicts(self.items),
        }

    def markdown(self) -> str:
        m = self.metrics
        lines = [
            f"# eval: {self.model}",
            "",
            f"data: `{self.data}` — {m['n']} questions, {self.seconds:.0f} s",
            "",
            "| question type | n | exact match | 95% interval |",
            "| --- | --- | --- | --- |",
        ]
        for qtype, row in m["per_type"].items():
            lines.append(f"| {qtype} | {row['n']} | {row['exact_match']:.1%} | {_interval(row)} |")
        lines.append(f"| **all** | {m['n']} | **{m['exact_match']:.1%}** | {_interval(m)} |")
        if m.get("hallucination_rate") is not None:
            low, high = m.get("hallucination_rate_ci95") or (float("nan"), float("nan"))
            lines += [
                "",
                f'hallucination rate ("yes" to an absent object): {m["hallucination_rate"]:.1%} '
                f"[{low:.1%}, {high:.1%}] of {m['n_absent_probes']} probes",
            ]
        lines += ["", "Intervals: 95% percentile bootstrap over questions (2000 resamples)."]
        if "reference" in m:
            r = m["reference"]
            lines += [
                "",
                f"vs reference `{r['model']}` on {r['n_records']} answers ({r['n_tokens']} tokens): "
                f"top-1 agreement {r['top1_agreement']:.1%}, mean KL {r['mean_kl']:.4f} nats/token",
            ]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "eval.json", json.dumps(self.to_dict(), indent=2) + "\n")
        write_text_atomic(out / "eval.md", self.markdown())


def _interval(row: dict[str, Any]) -> str:
    low, high = row.get("exact_match_ci95") or (float("nan"), float("nan"))
    return f"{low:.1%} – {high:.1%}"


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    )


def evaluate(model: str | Path, data: str | Path, config: EvalConfig | None = None) -> EvalReport:
    config = config or EvalConfig()
    if config.batch_size < 1 or config.max_new_tokens < 1:
        raise ConfigError("batch_size and max_new_tokens must be ≥ 1", where="eval", fix="pass positive values")
    records = load_jsonl_dataset(data)[: config.limit]
    started = time.perf_counter()
    answerer = open_answerer(model)
    items = _answer_all(answerer, records, config)
    metrics = summarize(items)
    if config.reference is not None:
        metrics["reference"] = _reference_agreement(answerer, open_answerer(config.reference), records, config)
    return EvalReport(
        model=str(model), data=str(data), metrics=metrics, items=items, seconds=time.perf_counter() - started
    )


def _answer_all(answerer: Answerer, records: list[VQARecord], config: EvalConfig) -> list[ScoredItem]:
    items: list[ScoredItem] = []
    with _progress() as progress:
        task = progress.add_task("answering", total=len(records))
        for start in range(0, len(records), config.batch_size):
            chunk = records[start : start + config.batch_size]
            for record, (text, _) in zip(chunk, answerer.answer(chunk, config.max_new_tokens)):
                absent = record.metadata.get("absent")
                items.append(
                    ScoredItem(
                        id=record.id,
                        qtype=record.qtype or "unknown",
                        question=record.question,
                        answer=record.answer,
                        prediction=text,
                        correct=normalize_answer(text) == normalize_answer(record.answer),
                        absent=bool(absent) if absent is not None else None,
                    )
                )
            progress.advance(task, len(chunk))
    return items


def _reference_agreement(
    student: Answerer, reference: Answerer, records: list[VQARecord], config: EvalConfig
) -> dict[str, Any]:
    if student.vocab() != reference.vocab():
        raise ConfigError(
            "the model and the reference use different tokenizers, so token agreement is undefined",
            where="--reference",
            fix="compare against a teacher that shares the student's tokenizer",
        )
    subset = records[: config.agreement_limit]
    matches = tokens = 0
    kl_sum = 0.0
    with _progress() as progress:
        task = progress.add_task("scoring vs reference", total=len(subset))
        for start in range(0, len(subset), config.batch_size):
            chunk = subset[start : start + config.batch_size]
            for record, (_, ids) in zip(chunk, reference.answer(chunk, config.max_new_tokens)):
                if not ids:
                    continue
                m, kl = agreement(reference.forced_logits(record, ids), student.forced_logits(record, ids))
                matches, tokens, kl_sum = matches + m, tokens + len(ids), kl_sum + kl
            progress.advance(task, len(chunk))
    return {
        "model": reference.name,
        "n_records": len(subset),
        "n_tokens": tokens,
        "top1_agreement": matches / tokens if tokens else None,
        "mean_kl": kl_sum / tokens if tokens else None,
    }

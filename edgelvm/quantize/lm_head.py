"""The LM head and the token embedding table of an INT4 language model: block-wise INT8/INT4 head, INT8 table.

Why: once the decoder layers are INT4, the float head is most of what a decode step reads (113 of 175 MB on a
SmolLM2-135M shape) and the table most of the bundle. Both are quantized round-to-nearest (the head's input is the
final norm's output, where AWQ's scales would have to fold into a norm the tied table shares), after the layers, and
measured where it matters: the head by **top-1 agreement** with the float head on the hidden states of the
calibration answers (teacher-forced, the quantized layers in place), plus each head's answer-token accuracy.

A tied head *is* the table: quantizing one changes the other, so the checkpoint keeps them tied and the bundle's table
is the head's own codes (``embed_tokens`` in the sidecar, the same :class:`Int4Weight`); INT8 rows for the table of a
model whose quantized head is tied would be a second, different rounding of the same tensor and are refused.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgelvm.errors import ConfigError
from edgelvm.models.checkpoint.codes import Int4Weight
from edgelvm.models.checkpoint.quantized import HEAD_CODES as HEAD
from edgelvm.models.checkpoint.quantized import TABLE_CODES as TABLE
from edgelvm.quantize.int4 import per_channel_block, quantize_rtn
from edgelvm.quantize.methods import LM_HEAD_MIN_AGREEMENT

log = logging.getLogger(__name__)

#: Answer positions whose hidden states score the head (enough for a 0.1-point agreement estimate).
MAX_SCORED_POSITIONS = 8192


def quantize_head_and_table(adapter: Any, cfg: Any, calib: Any, batch_size: int, report: Any) -> dict[str, Int4Weight]:
    """Apply ``cfg.lm_head`` / ``cfg.embeddings`` (an :class:`~edgelvm.quantize.methods.Int4Config`, already
    checked by :func:`check_head_options`) in place; the codes by sidecar name. ``report.lm_head`` gets the head's
    agreement and accuracy (None without data)."""
    if cfg.lm_head == "float" and cfg.embeddings == "float":
        return {}
    head, table = adapter.lm_head(), adapter.input_embeddings()
    tied = head.weight is table.weight
    head_changes = cfg.lm_head != "float" or tied  # an untied float head next to an INT8 table is not scored
    scored = _answer_hidden_states(adapter, calib, batch_size) if calib is not None and head_changes else None
    if calib is None and head_changes:
        log.warning("the quantized LM head's agreement with the float head is not measured: pass --calib")
    out: dict[str, Int4Weight] = {}
    if cfg.lm_head != "float":
        q = quantize_rtn(_weight_kn(head), cfg.group_size, cfg.symmetric, bits=cfg.lm_head_bits)
        report.lm_head = _replace_and_score(HEAD, head, q, scored, report, f"{cfg.lm_head} g{cfg.group_size}")
        out[HEAD] = q
        if tied:
            out[TABLE] = q
    if cfg.embeddings != "float":  # INT8, one scale per row (the runtime gathers rows: no MatMulNBits block rule)
        q = quantize_rtn(_weight_kn(table), per_channel_block(table.weight.shape[1]), True, bits=8)
        scored_head = scored if tied else None  # a tied float head now computes with the INT8 rows
        summary = _replace_and_score(TABLE, table, q, scored_head, report, "int8 per row")
        if tied:
            report.lm_head = summary
        out[TABLE] = q
    report.kept_float = [k for k in report.kept_float if not k.startswith(("lm_head", "token embedding"))]
    if HEAD not in out:
        report.kept_float.append("lm_head (--lm-head float)" + (", computing with the INT8 table" if tied else ""))
    if TABLE not in out:
        report.kept_float.append("token embedding (--embeddings float)")
    return out


def check_head_options(adapter: Any, cfg: Any) -> None:
    """Refuse an INT8 table for a tied quantized head before any work (see the module's docstring)."""
    tied = adapter.lm_head().weight is adapter.input_embeddings().weight
    if tied and cfg.lm_head != "float" and cfg.embeddings != "float":
        raise ConfigError(
            f"--embeddings {cfg.embeddings} with --lm-head {cfg.lm_head} on a tied model: the table *is* the head, "
            "so the bundle stores it as the head's codes already",
            where="--embeddings",
            fix="drop --embeddings (the table then is the quantized head's codes)",
        )


def _weight_kn(module: Any) -> np.ndarray:
    """A ``[vocab, hidden]`` weight as the ``[K, N]`` = ``[hidden, vocab]`` matrix quantized along ``K``."""
    return module.weight.detach().float().numpy().T


def _replace_and_score(name: str, module: Any, q: Int4Weight, scored: Any, report: Any, label: str) -> dict[str, Any]:
    """The module's weight becomes ``q``'s values; the report gets its error row and bytes; with ``scored``
    (hidden states, answer tokens) the head's agreement and accuracies are measured before and after."""
    import torch

    original = module.weight.detach().float().clone()
    deq = torch.from_numpy(q.dequantize_rows(slice(None)).copy())
    with torch.no_grad():
        module.weight.copy_(deq.to(module.weight.dtype))
    weight_error = float((deq - original).norm() / (original.norm() + 1e-12))
    report.layers.append({"name": name, "side": "text", "bits": q.bits, "K": q.k, "N": q.n,
                          "weight_error": round(weight_error, 6), "output_error": None})  # fmt: skip
    report.weight_bytes_before += original.numel() * 4
    report.weight_bytes_after += q.nbytes
    summary: dict[str, Any] = {"format": label, "bits": q.bits, "weight_error": round(weight_error, 6),
                               "top1_agreement": None, "scored_positions": 0}  # fmt: skip
    if scored is None:
        return summary
    hidden, answers = scored
    summary.update(head_agreement(hidden, answers, original, deq))
    report.layers[-1]["output_error"] = summary["output_error"]
    if summary["top1_agreement"] < LM_HEAD_MIN_AGREEMENT:
        log.warning("LM head %s: top-1 agreement with the float head %.2f%% < %.0f%% on %d answer positions — "
                    "it changes answers; keep --lm-head float or try int8", label, 100 * summary["top1_agreement"],
                    100 * LM_HEAD_MIN_AGREEMENT, summary["scored_positions"])  # fmt: skip
    return summary


def head_agreement(hidden: Any, answers: Any, original: Any, quantized: Any, chunk: int = 256) -> dict[str, Any]:
    """Top-1 agreement of the head ``quantized`` with ``original`` (both ``[vocab, hidden]``) on ``hidden``
    (``[P, hidden]``), the relative output error ``‖H ΔWᵀ‖ / ‖H Wᵀ‖``, and each head's accuracy on ``answers``."""
    import torch

    same = right_float = right_quant = 0
    err = ref = 0.0
    with torch.no_grad():
        for lo in range(0, hidden.shape[0], chunk):
            h = hidden[lo : lo + chunk]
            a, b = h @ original.T, h @ quantized.T
            top_a, top_b = a.argmax(-1), b.argmax(-1)
            same += int((top_a == top_b).sum())
            right_float += int((top_a == answers[lo : lo + chunk]).sum())
            right_quant += int((top_b == answers[lo : lo + chunk]).sum())
            err += float(((b - a) ** 2).sum())
            ref += float((a**2).sum())
    n = max(int(hidden.shape[0]), 1)
    return {
        "top1_agreement": round(same / n, 5),
        "output_error": round(float(np.sqrt(err / max(ref, 1e-30))), 6),
        "answer_accuracy_float": round(right_float / n, 5),
        "answer_accuracy_quantized": round(right_quant / n, 5),
        "scored_positions": int(hidden.shape[0]),
    }


def _answer_hidden_states(adapter: Any, calib: Any, batch_size: int) -> tuple[Any, Any] | None:
    """The head's inputs at the positions that predict an answer token (teacher-forced), and those tokens: one
    more forward pass over (at most :data:`MAX_SCORED_POSITIONS` answer tokens of) the calibration set."""
    import torch

    from edgelvm.calibration.dataset import iter_labeled_batches

    head = adapter.lm_head()
    captured: list[Any] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float()))
    rows, tokens = [], []
    try:
        with torch.no_grad():
            for inputs, labels, _n in iter_labeled_batches(adapter, calib, batch_size):
                captured.clear()
                adapter.model(**inputs)
                hidden = captured[-1][:, :-1]  # position t predicts label t + 1
                target = labels[:, 1:].to(hidden.device)
                valid = target != -100
                rows.append(hidden[valid])
                tokens.append(target[valid])
                if sum(len(r) for r in rows) >= MAX_SCORED_POSITIONS:
                    break
    finally:
        handle.remove()
    if not rows or not sum(len(r) for r in rows):
        log.warning("the calibration records have no answer tokens: the LM head's agreement is not measured")
        return None
    return torch.cat(rows)[:MAX_SCORED_POSITIONS], torch.cat(tokens)[:MAX_SCORED_POSITIONS]

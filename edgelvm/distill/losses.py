"""Distillation losses on logits (forward KL, reverse KL, Jensen-Shannon; full vocabulary or teacher top-k) and
feature matching through a learned projection.

Top-k: the teacher's distribution is renormalised over its k most likely tokens and the divergence is taken on that
support, with the student's log-probabilities over the *full* vocabulary gathered at those k ids (so mass the
student puts elsewhere is still penalised by forward KL). Online KD with ``top_k=k`` and training from a top-k
cache call the same function on the same numbers, which is why they match (tests/test_distill.py).

All divergences are scaled by T^2 (Hinton et al.), so the gradient size does not change with the temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DIVERGENCES = ("forward_kl", "reverse_kl", "js")


@dataclass
class TeacherTargets:
    """Teacher logits at the scored positions: full ``[N, V]`` (``indices`` None) or top-k ``values``/``indices``."""

    values: Any
    indices: Any | None = None

    @classmethod
    def from_logits(cls, logits: Any, top_k: int | None) -> TeacherTargets:
        import torch

        logits = logits.float()
        if top_k is None or top_k >= logits.shape[-1]:
            return cls(logits)
        values, indices = torch.topk(logits, top_k, dim=-1)
        return cls(values, indices)


def divergence(student_logits: Any, teacher: TeacherTargets, kind: str = "forward_kl", temperature: float = 1.0) -> Any:
    """Mean over rows of D(teacher || student) (or the chosen divergence) at temperature ``temperature``."""
    import torch
    import torch.nn.functional as F

    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher.indices is not None:
        log_q = log_q.gather(-1, teacher.indices.long())
    log_p = F.log_softmax(teacher.values.float() / t, dim=-1)
    p = log_p.exp()
    if kind == "forward_kl":
        per_row = (p * (log_p - log_q)).sum(-1)
    else:
        # on a top-k support the student's gathered probabilities are renormalised so both sides are distributions
        log_q_n = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True) if teacher.indices is not None else log_q
        q = log_q_n.exp()
        if kind == "reverse_kl":
            per_row = (q * (log_q_n - log_p)).sum(-1)
        else:
            log_m = torch.log(0.5 * (p + q) + 1e-12)
            per_row = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q_n - log_m)).sum(-1)
    return per_row.mean() * t * t


def feature_projection(student_dim: int, teacher_dim: int) -> Any:
    """A learned linear map student -> teacher width (identity-initialised when the widths are equal)."""
    import torch

    proj = torch.nn.Linear(student_dim, teacher_dim, bias=False)
    if student_dim == teacher_dim:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(teacher_dim))
    return proj


def feature_mse(student_features: Any, teacher_features: Any, projection: Any) -> Any:
    """MSE between projected student features and teacher features, normalised by the teacher's mean square so the
    weight means the same thing for any model width and activation scale."""
    target = teacher_features.float()
    pred = projection(student_features.float())
    return ((pred - target) ** 2).mean() / (target.pow(2).mean() + 1e-6)

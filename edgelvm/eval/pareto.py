"""The Pareto view of compression variants: accuracy (with its 95% interval) against bundle size and decode speed.

A user picking a compression wants the variants no other variant beats on both axes at once — smaller *and* at
least as accurate, or faster *and* at least as accurate. :func:`pareto_front` names them; :func:`pareto_plot`
draws both views side by side (matplotlib, imported only here: ``pip install matplotlib``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    """One compression variant as the benchmarks measured it."""

    name: str
    accuracy: float
    ci95: tuple[float, float]
    bundle_bytes: int
    decode_tok_s: float | None = None


def pareto_front(variants: Sequence[Variant], *, cost: str = "bundle_bytes") -> list[str]:
    """Names of the variants that no other variant dominates: lower (``bundle_bytes``) or higher
    (``decode_tok_s``) on ``cost`` and at least as accurate, strictly better on one. Sorted along the cost axis."""
    lower_is_better = cost == "bundle_bytes"

    def better_cost(a: Variant, b: Variant) -> int:
        x, y = getattr(a, cost), getattr(b, cost)
        return (x < y) - (x > y) if lower_is_better else (x > y) - (x < y)

    rated = [v for v in variants if getattr(v, cost) is not None]
    front = [
        v
        for v in rated
        if not any(
            better_cost(o, v) >= 0 and o.accuracy >= v.accuracy and (better_cost(o, v) > 0 or o.accuracy > v.accuracy)
            for o in rated
            if o is not v
        )
    ]
    return [v.name for v in sorted(front, key=lambda v: getattr(v, cost), reverse=not lower_is_better)]


def pareto_plot(variants: Sequence[Variant], out_png: str | Path, *, title: str) -> Path:
    """Accuracy ± 95% interval against bundle MB (left) and decode tok/s (right); the front is joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("bundle_bytes", "bundle size (MB)", 1e-6)]
    if any(v.decode_tok_s is not None for v in variants):
        panels.append(("decode_tok_s", "decode speed (tokens/s)", 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (cost, label, scale) in zip(axes[0], panels, strict=True):
        front = set(pareto_front(variants, cost=cost))
        for v in variants:
            x = getattr(v, cost)
            if x is None:
                continue
            err = [[100 * (v.accuracy - v.ci95[0])], [100 * (v.ci95[1] - v.accuracy)]]
            ax.errorbar(x * scale, 100 * v.accuracy, yerr=err, fmt="o" if v.name in front else "s", capsize=3,
                        color="tab:blue" if v.name in front else "tab:gray")  # fmt: skip
            ax.annotate(v.name, (x * scale, 100 * v.accuracy), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ordered = [v for v in variants if v.name in front]
        ordered.sort(key=lambda v: getattr(v, cost))
        ax.plot([getattr(v, cost) * scale for v in ordered], [100 * v.accuracy for v in ordered], color="tab:blue",
                alpha=0.5, label="Pareto front")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("exact match (%), 95% interval")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out

"""The latency-breakdown bar chart, drawn with Pillow (no matplotlib dependency).

One horizontal bar per (bundle, backend, decoder): vision encode | prefill | decode of the remaining tokens (median
per-token time × (gen_len − 1)), so the reader sees at a glance which phase dominates a request. Bars share one
millisecond scale when the requests are of comparable length; when the longest is over ``SHARED_SCALE_MAX_RATIO``
times the shortest (a tiny model next to a realistic one), each bar is drawn as shares of its own request instead,
so that no bar shrinks to a sliver. The title says which, and every bar ends with its total in ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLORS = {"vision": (76, 114, 176), "prefill": (221, 132, 82), "decode": (85, 168, 104)}
SHARED_SCALE_MAX_RATIO = 10.0
LABEL_WIDTH = 300


def bundle_label(bundle: str | Path) -> str:
    """The bundle's directory name, or ``parent/bundle`` for directories just named ``bundle``."""
    path = Path(bundle)
    return f"{path.parent.name}/{path.name}" if path.name == "bundle" and path.parent.name else path.name


def phases(result: Any) -> dict[str, float]:
    return {
        "vision": result.vision_ms,
        "prefill": result.prefill_ms,
        "decode": result.decode_ms_per_token_median * (result.gen_len - 1),
    }


def latency_chart(results: Sequence[Any], width: int = 900) -> Image.Image:
    label_w, bar_h, gap, top = LABEL_WIDTH, 26, 14, 50
    height = top + len(results) * (bar_h + gap) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    totals = [sum(phases(r).values()) for r in results]
    positive = [t for t in totals if t > 0]
    shared = not positive or max(positive) <= SHARED_SCALE_MAX_RATIO * min(positive)
    title = "latency breakdown per request (ms)" if shared else "latency breakdown per request (share of each; ms)"
    draw.text((10, 10), title, fill="black")
    x = label_w
    for name, color in COLORS.items():  # legend
        draw.rectangle((x, 12, x + 12, 24), fill=color)
        draw.text((x + 16, 12), name, fill="black")
        x += 90
    span = width - label_w - 80
    longest = max(positive, default=1.0)
    for row, (result, total) in enumerate(zip(results, totals)):
        y = top + row * (bar_h + gap)
        label = f"{bundle_label(result.bundle)} / {result.backend} / {getattr(result, 'decoder', '')}".rstrip(" /")
        draw.text((10, y + 7), label[:52], fill="black")
        scale = span / (longest if shared else (total or 1.0))
        x0 = float(label_w)
        for name, ms in phases(result).items():
            x1 = x0 + ms * scale
            if x1 > x0:
                draw.rectangle((x0, y, x1, y + bar_h), fill=COLORS[name])
            x0 = x1
        draw.text((x0 + 6, y + 7), f"{total:.0f}", fill="black")
    return image

"""The latency-breakdown bar chart, drawn with Pillow (no matplotlib dependency).

One horizontal bar per (bundle, backend): vision encode | prefill | decode of the remaining tokens (median
per-token time × (gen_len − 1)), so the reader sees at a glance which phase dominates a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLORS = {"vision": (76, 114, 176), "prefill": (221, 132, 82), "decode": (85, 168, 104)}


def phases(result: Any) -> dict[str, float]:
    return {
        "vision": result.vision_ms,
        "prefill": result.prefill_ms,
        "decode": result.decode_ms_per_token_median * (result.gen_len - 1),
    }


def latency_chart(results: Sequence[Any], width: int = 900) -> Image.Image:
    label_w, bar_h, gap, top = 260, 26, 14, 50
    height = top + len(results) * (bar_h + gap) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "latency breakdown per request (ms)", fill="black")
    x = label_w
    for name, color in COLORS.items():  # legend
        draw.rectangle((x, 12, x + 12, 24), fill=color)
        draw.text((x + 16, 12), name, fill="black")
        x += 90
    longest = max((sum(phases(r).values()) for r in results), default=1.0) or 1.0
    scale = (width - label_w - 80) / longest
    for row, result in enumerate(results):
        y = top + row * (bar_h + gap)
        draw.text((10, y + 7), f"{Path(result.bundle).name} / {result.backend}"[:40], fill="black")
        x0 = float(label_w)
        for name, ms in phases(result).items():
            x1 = x0 + ms * scale
            if x1 > x0:
                draw.rectangle((x0, y, x1, y + bar_h), fill=COLORS[name])
            x0 = x1
        draw.text((x0 + 6, y + 7), f"{sum(phases(result).values()):.0f}", fill="black")
    return image

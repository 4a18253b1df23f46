"""Image-token counts as the processor's own output shows them (public behaviour), for the tiling tests.

transformers' private ``_get_num_multimodal_tokens`` changed what it counts in 5.25 (InternVL stopped counting the
``<img>``/``</img>`` markers) while the prompts the processors build did not change; tests therefore read the
``input_ids`` a processor call returns for a blank image of each size."""

from __future__ import annotations

import numpy as np


def processor_prompt_ids(processor, sizes: list[tuple[int, int]], placeholder: str) -> list[list[int]]:
    """The ``input_ids`` the processor returns for ``placeholder`` and one blank image of each ``(height, width)``."""
    from PIL import Image

    out = []
    for h, w in sizes:
        encoded = processor(text=[placeholder], images=[Image.new("RGB", (w, h))], return_tensors="np")
        out.append([int(i) for i in np.asarray(encoded["input_ids"])[0]])
    return out


def processor_image_token_counts(processor, sizes: list[tuple[int, int]], placeholder: str, token_id: int) -> list[int]:
    """How many ``token_id`` the processor's prompt holds for one image of each size."""
    return [ids.count(token_id) for ids in processor_prompt_ids(processor, sizes, placeholder)]


def spread_sample(sizes: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """``count`` sizes spread over the list, its last eight (the hand-picked edge cases) always included."""
    head, tail = sizes[:-8], sizes[-8:]
    step = max(1, len(head) // max(1, count - len(tail)))
    return head[::step][: count - len(tail)] + tail

"""The prompt as a second input of the vision graph (``preprocess.vision_text``), for text-conditioned encoders.

InstructBLIP's Q-Former reads the question next to its learned queries, so the image features depend on the prompt.
The bundle ships the Q-Former's own tokenizer; each image is encoded with the rendered prompt of its request,
tokenized as ``InstructBlipProcessor(text=prompt)`` tokenizes it for the Q-Former (special tokens added, no
padding). Several images are encoded in one call with their texts right-padded and masked: the Q-Former's absolute
positions count from the first token, so right padding leaves every row as it is alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BundleError, PromptTooLongError


class VisionTextTokenizer:
    """Tokenizes prompts for the vision graph's text inputs (names and limit from ``preprocess.vision_text``)."""

    def __init__(self, spec: dict[str, Any], bundle_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        try:
            file, self.max_length = spec["tokenizer"], int(spec["max_length"])
            self.ids_name, self.mask_name = spec["inputs"]
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"preprocess.vision_text is incomplete ({err!r})", where="edgelvm.json", fix="re-export the bundle"
            ) from None
        path = Path(bundle_dir) / file
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(f"vision-text tokenizer cannot be read ({err})", where=path, fix="re-export") from None
        self._tok.no_padding()
        self._tok.no_truncation()

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text).ids
        if len(ids) > self.max_length:
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens for the vision encoder's text input, which takes at most "
                f"{self.max_length}",
                where="prompt",
                fix="shorten the prompt",
            )
        return ids

    def batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """Right-padded ``{ids_name: [N, L], mask_name: [N, L]}`` for the vision graph."""
        length = max(len(r) for r in rows)
        ids = np.zeros((len(rows), length), dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = row
            mask[index, : len(row)] = 1
        return {self.ids_name: ids, self.mask_name: mask}

"""Calibration sets: which records, in what order, and the model inputs they become.

Images go through the checkpoint's own processor and prompts through its chat template (the data layer's
:class:`~edgelvm.data.batches.ConversationEncoder`), answers included: the decoder is calibrated on the
activations it sees while generating, not on text alone.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.data.batches import ConversationEncoder, collate
from edgelvm.data.jsonl import load_jsonl_dataset
from edgelvm.data.shapes import SPLIT_SEEDS, write_split
from edgelvm.errors import DatasetError

log = logging.getLogger(__name__)

#: Below this many records the ranges are noisy; it is a warning, not an error (small models calibrate fine).
MIN_RECOMMENDED = 32
#: ``calib_data="shapes"``: records drawn from the shipped task's validation seed (never its test seed).
SHAPES = "shapes"


@dataclass
class CalibrationSet:
    records: list[Any]  # edgelvm.data.jsonl.VQARecord
    sha256: str
    source: str

    def __len__(self) -> int:
        return len(self.records)

    def describe(self) -> dict[str, Any]:
        return {"records": len(self.records), "sha256": self.sha256, "source": self.source}


def load_calibration_set(data: str | Path | list, limit: int = 256, seed: int = 0) -> CalibrationSet:
    """``data``: a jsonl dataset (directory or file), a list of records, or ``"shapes"`` (the shipped task).

    ``limit`` records are kept, drawn by a seeded permutation so that a sorted dataset still yields a mix."""
    if limit < 1:
        raise DatasetError(
            f"calibration limit {limit} < 1", where="--calib-limit", fix="use at least 1 (256 is typical)"
        )
    if isinstance(data, list):
        records, source = data, "records"
    elif str(data) == SHAPES:
        records, source = _shapes_records(limit), "shapes task (validation seed)"
    else:
        records, source = load_jsonl_dataset(data), str(data)
    if not records:
        raise DatasetError("the calibration set is empty", where=source, fix="pass a dataset with at least one record")
    order = np.random.default_rng(seed).permutation(len(records))[:limit]
    chosen = [records[i] for i in sorted(order)]
    if len(chosen) < MIN_RECOMMENDED:
        log.warning(
            "only %d calibration records (from %s): activation ranges will be noisy; %d or more are recommended",
            len(chosen), source, MIN_RECOMMENDED,
        )  # fmt: skip
    return CalibrationSet(chosen, records_digest(chosen), source)


def _shapes_records(n: int) -> list[Any]:
    # The records reference image files, and the encoder reads them as it goes: keep the directory for the process.
    root = Path(tempfile.mkdtemp(prefix="edgelvm-calib-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    write_split(root / "val", SPLIT_SEEDS["val"], n, force=True)
    return load_jsonl_dataset(root / "val")


def records_digest(records: list[Any]) -> str:
    """sha256 of the records' ids, conversations and image bytes: what a calibration was computed from."""
    h = hashlib.sha256()
    for r in records:
        h.update(repr((r.id, r.conversations)).encode())
        if r.image_path is not None:
            h.update(Path(r.image_path).read_bytes())
    return h.hexdigest()


def iter_batches(adapter: Any, calib: CalibrationSet, batch_size: int) -> Iterator[tuple[dict[str, Any], int]]:
    """``(model inputs, rows)`` per batch: input_ids, attention_mask, pixel_values (right-padded)."""
    for inputs, _labels, rows in iter_labeled_batches(adapter, calib, batch_size):
        yield inputs, rows


def iter_labeled_batches(adapter: Any, calib: CalibrationSet, batch_size: int) -> Iterator[tuple[dict, Any, int]]:
    """``(model inputs, labels, rows)``: labels are the answer tokens (-100 elsewhere), unshifted."""
    encoder = ConversationEncoder.for_adapter(adapter)
    pad = encoder.tokenizer.pad_token_id or 0
    for lo in range(0, len(calib.records), batch_size):
        chunk = calib.records[lo : lo + batch_size]
        batch = collate([encoder.encode(r) for r in chunk], list(range(len(chunk))), pad)
        yield batch.inputs, batch.labels, len(chunk)


def run_forward(
    adapter: Any,
    calib: CalibrationSet,
    batch_size: int = 16,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    **forward_kwargs: Any,
) -> None:
    """Run every calibration batch through the whole VLM (vision tower, projector, language model), no gradients.

    ``on_batch`` sees each batch's inputs before its forward (the statistics use its attention mask). Only the last
    position's logits are computed where the model allows it: the statistics live in the layers, and a batch's full
    logits are ``batch × tokens × vocab`` floats — 5.8 GB for 16 records of ~600 tokens at a 152k vocabulary,
    measured as most of a 0.8B model's quantize peak. ``forward_kwargs`` go to every forward (e.g.
    ``use_cache=False``)."""
    import inspect

    import torch

    model = adapter.model
    model.eval()
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        for inputs, rows in iter_batches(adapter, calib, batch_size):
            if on_batch is not None:
                on_batch(inputs)
            # no labels (PaliGemma's processor returns them): their loss would need every position's logits
            model(**{k: v for k, v in inputs.items() if k != "labels"}, **keep, **forward_kwargs)
            if progress is not None:
                progress(rows)

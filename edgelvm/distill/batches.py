"""Conversation records -> model inputs with response-token targets, and the deterministic sample order.

Why the incremental chat template: a model is trained on exactly the text its chat template renders at inference
time. Each assistant turn's target tokens are found by rendering the conversation up to that turn with the
generation prompt, then including the turn: the difference is the turn (its end-of-turn / eos token included).
This is family-generic (the processor expands the image placeholder) and is checked, not assumed: a template
whose rendering of a prefix is not a prefix of the whole raises an error instead of training on shifted labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelvm.data.jsonl import VQARecord
from edgelvm.errors import DatasetError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE except at assistant tokens (same positions as input_ids; HF-style, unshifted)
    pixel_values: Any | None  # [n_images, 3, H, W] or None


def _messages(record: VQARecord) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    for i, (role, text) in enumerate(record.turns):
        if i == 0 and role == "user" and record.image_path is not None:
            content: Any = [{"type": "image"}, {"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": text}]
        msgs.append({"role": role, "content": content})
    return msgs


class ConversationEncoder:
    """Encodes records with one model's processor (teacher and student share it: tokenizers must match)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def _ids(self, text: str, images: list[Any] | None) -> tuple[list[int], Any]:
        out = self.processor(images=images, text=[text], return_tensors="pt")
        return out["input_ids"][0].tolist(), out.get("pixel_values")

    def encode(self, record: VQARecord) -> Encoded:
        from edgelvm.runtime.images import load_image

        images = [load_image(record.image_path)] if record.image_path is not None else None
        msgs = _messages(record)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DatasetError(
                "the record has no assistant turn to learn from", where=record.source, fix="add a gpt/assistant turn"
            )
        template = self.processor.apply_chat_template
        full_ids, pixels = self._ids(template(msgs, tokenize=False), images)
        labels = [IGNORE] * len(full_ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, _ = self._ids(template(msgs[:i], add_generation_prompt=True, tokenize=False), images)
            after, _ = self._ids(template(msgs[: i + 1], tokenize=False), images)
            if full_ids[: len(after)] != after or after[: len(before)] != before:
                raise DatasetError(
                    "the chat template does not render a conversation's prefix as a prefix of the whole, so the "
                    "answer tokens cannot be located",
                    where=record.source,
                    fix="use a prefix-consistent chat template (most are), or one assistant turn per record",
                )
            # trailing whitespace/newlines a template adds after the turn are targets too: the model must emit them
            labels[len(before) : len(after)] = full_ids[len(before) : len(after)]
        return Encoded(full_ids, labels, pixels)


@dataclass
class Batch:
    inputs: dict[str, Any]  # input_ids, attention_mask, pixel_values (model kwargs)
    labels: Any  # [B, T] IGNORE-padded, unshifted
    indices: list[int]  # dataset indices of the rows


def collate(encoded: list[Encoded], indices: list[int], pad_id: int) -> Batch:
    """Right-padded batch (training and teacher-forced scoring need no left padding)."""
    import torch

    n = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    pixels = [e.pixel_values for e in encoded if e.pixel_values is not None]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels, dim=0)
    return Batch(inputs, labels, indices)


def sample_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch ``epoch``: a pure function of (seed, epoch), so a resumed run sees the same data."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, seed: int, first_sample: int, count: int) -> list[int]:
    """Dataset indices of global samples ``first_sample .. first_sample + count - 1`` (epochs roll over)."""
    out: list[int] = []
    cache: dict[int, np.ndarray] = {}
    for s in range(first_sample, first_sample + count):
        epoch, pos = divmod(s, n)
        if epoch not in cache:
            cache[epoch] = sample_order(n, seed, epoch)
        out.append(int(cache[epoch][pos]))
    return out


def dataset_fingerprint(records: list[VQARecord]) -> str:
    """Hash of the records' text and image paths (what a run or a teacher cache was computed from)."""
    h = hashlib.sha256()
    for r in records:
        h.update(repr((r.id, str(r.image_path), r.conversations)).encode())
    return h.hexdigest()[:16]

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


#: Processor outputs that are the text itself; everything else it returns (pixel_values, and e.g. image_sizes for
#: tiling families) is an image input the model needs next to them.
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE except at assistant tokens (same positions as input_ids; HF-style, unshifted)
    #: The processor's image inputs for this record (model kwargs, image axis first): ``pixel_values``
    #: ``[n_images, 3, H, W]`` (tiling families: ``[n_images, views, 3, H, W]`` and ``image_sizes``); empty without
    #: an image.
    image_inputs: dict[str, Any]

    @property
    def pixel_values(self) -> Any | None:
        return self.image_inputs.get("pixel_values")


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
    """Encodes records with one model's processor (teacher and student share it: tokenizers must match).

    ``chat_template``: the template the records are rendered with (the adapter's
    :meth:`~edgelvm.models.base.VLMAdapter.conversation_template`: the checkpoint's own, or, for a family whose
    checkpoints ship none, how the family is prompted); ``None``: the processor's own."""

    def __init__(self, processor: Any, chat_template: str | None = None) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chat_template = chat_template

    @classmethod
    def for_adapter(cls, adapter: Any) -> ConversationEncoder:
        return cls(adapter.processor, adapter.conversation_template())

    def _ids(self, text: str, images: list[Any] | None) -> tuple[list[int], dict[str, Any]]:
        out = self.processor(images=images, text=[text], return_tensors="pt")
        return out["input_ids"][0].tolist(), {k: v for k, v in out.items() if k not in _TEXT_KEYS}

    def encode(self, record: VQARecord) -> Encoded:
        from edgelvm.runtime.images import load_image

        images = [load_image(record.image_path)] if record.image_path is not None else None
        msgs = _messages(record)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DatasetError(
                "the record has no assistant turn to learn from", where=record.source, fix="add a gpt/assistant turn"
            )

        def template(messages: list[dict[str, Any]], **kwargs: Any) -> str:
            return self.processor.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

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
    for key in dict.fromkeys(k for e in encoded for k in e.image_inputs):
        inputs[key] = _cat_padded([e.image_inputs[key] for e in encoded if key in e.image_inputs])
    return Batch(inputs, labels, indices)


def _cat_padded(tensors: list[Any]) -> Any:
    """Concatenate along the image axis, zero-padding the other axes to the largest (a tiling processor's views
    differ in number between images; it pads them the same way for a batch of its own)."""
    import torch

    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            out = t.new_zeros((t.shape[0], *shape))
            out[tuple(slice(0, n) for n in t.shape)] = t
            t = out
        padded.append(t)
    return torch.cat(padded, dim=0)


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

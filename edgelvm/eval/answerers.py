"""What ``edgelvm eval`` evaluates: a bundle (torch-free runtime) or a Hugging Face checkpoint (torch side).

Both answer a batch of records greedily and can score a given continuation by teacher forcing, so the evaluator and
the teacher-agreement metrics never care which kind they hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgelvm.data.jsonl import VQARecord
from edgelvm.errors import EdgeLVMError
from edgelvm.manifest import MANIFEST_NAME


class Answerer(Protocol):
    name: str

    def answer(self, records: list[VQARecord], max_new_tokens: int) -> list[tuple[str, list[int]]]:
        """Greedy answers: (text, generated ids including the final EOS if one was produced) per record."""
        ...

    def forced_logits(self, record: VQARecord, continuation: list[int]) -> np.ndarray:
        """``[len(continuation), vocab]`` logits predicting each continuation token after the record's prompt."""
        ...

    def vocab(self) -> dict[str, int]: ...


def open_answerer(path: str | Path) -> Answerer:
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return BundleAnswerer(path)
    if (path / "config.json").is_file() or not path.exists():
        return HFAnswerer(str(path))
    raise EdgeLVMError(
        "neither an edgelvm bundle (edgelvm.json) nor a Hugging Face checkpoint (config.json)",
        where=path,
        fix="pass a bundle written by `edgelvm export` or a save_pretrained directory",
    )


def _images(record: VQARecord) -> list[Any]:
    return [record.image_path] if record.image_path is not None else []


class BundleAnswerer:
    def __init__(self, bundle: Path) -> None:
        from edgelvm.runtime import VLM

        self.name = f"bundle {bundle}"
        self.vlm = VLM.load(bundle)

    def answer(self, records: list[VQARecord], max_new_tokens: int) -> list[tuple[str, list[int]]]:
        texts = self.vlm.generate_batch([(_images(r), r.question) for r in records], max_new_tokens=max_new_tokens)
        return list(zip(texts, self.vlm.last_output_ids))

    def forced_logits(self, record: VQARecord, continuation: list[int]) -> np.ndarray:
        return self.vlm.forced_logits(_images(record), record.question, continuation)

    def vocab(self) -> dict[str, int]:
        return self.vlm.tokenizer.vocab()


class HFAnswerer:
    """A checkpoint run with transformers, the way its users run it (``generate``, greedy)."""

    def __init__(self, source: str, adapter: Any | None = None) -> None:
        from edgelvm.models import load_model

        self.name = f"checkpoint {source}"
        self.adapter = adapter if adapter is not None else load_model(source)
        self.processor = self.adapter.processor
        self.processor.tokenizer.padding_side = "left"
        eos = self.adapter.generation_spec()["eos_token_ids"]
        self._eos = set(eos)

    @classmethod
    def from_adapter(cls, adapter: Any) -> HFAnswerer:
        """An answerer over an already-loaded model (e.g. the teacher inside ``distill``)."""
        return cls(str(getattr(adapter, "source", "") or "model"), adapter)

    def _inputs(self, records: list[VQARecord]) -> Any:
        texts, images = [], []
        for record in records:
            content = [{"type": "image"}] * len(_images(record)) + [{"type": "text", "text": record.question}]
            messages = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(
                messages, chat_template=self.adapter.conversation_template(), add_generation_prompt=True))  # fmt: skip
            images.extend(self._load(p) for p in _images(record))
        return self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)

    @staticmethod
    def _load(path: Path) -> Any:
        from edgelvm.runtime.images import load_image

        return load_image(path)

    def answer(self, records: list[VQARecord], max_new_tokens: int) -> list[tuple[str, list[int]]]:
        import torch

        inputs = self._inputs(records)
        with torch.inference_mode():
            out = self.adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        results = []
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            ids = []
            for token in row:
                ids.append(token)
                if token in self._eos:
                    break
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            results.append((text, ids))
        return results

    def forced_logits(self, record: VQARecord, continuation: list[int]) -> np.ndarray:
        import torch

        inputs = dict(self._inputs([record]))
        prompt_len = inputs["input_ids"].shape[1]
        extra = torch.tensor([continuation], dtype=inputs["input_ids"].dtype)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
        with torch.inference_mode():
            logits = self.adapter.model(**inputs).logits[0]
        return logits[prompt_len - 1 : prompt_len - 1 + len(continuation)].float().numpy()

    def vocab(self) -> dict[str, int]:
        return self.processor.tokenizer.get_vocab()

"""Running a model on a batch and picking out what distillation compares: logits at the response targets (and at
image-token positions), and the image features the projector hands to the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgelvm.data.batches import IGNORE


@dataclass
class ModelOutputs:
    target_logits: Any  # [N_targets, V]: logits at t predicting labels[t + 1], rows in batch-major order
    rows_per_sample: list[int]  # how many target rows each batch row contributed
    image_logits: Any | None  # [N_image_positions, V] or None
    image_features: Any | None  # [n_images, tokens, D] projector output, or None
    hidden: Any | None  # last hidden state at target positions [N_targets, H], or None


def target_positions(labels: Any) -> tuple[Any, Any]:
    """(batch, time) index tensors of the positions whose *next* token is a target."""
    import torch

    nxt = labels[:, 1:] != IGNORE
    b, t = torch.nonzero(nxt, as_tuple=True)
    return b, t


class FeatureTap:
    """Keeps the last output of a module (a forward hook), e.g. the projector's image features."""

    def __init__(self, module: Any) -> None:
        self.value: Any = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        self.value = output

    def take(self) -> Any:
        value, self.value = self.value, None
        return value

    def close(self) -> None:
        self._handle.remove()


def run_model(
    model: Any,
    inputs: dict[str, Any],
    labels: Any,
    *,
    image_token_id: int | None = None,
    tap: FeatureTap | None = None,
    want_hidden: bool = False,
) -> ModelOutputs:
    dtype = next(model.parameters()).dtype  # a bf16/fp16 teacher gets its pixels in its own dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in inputs.items()}
    out = model(**inputs, output_hidden_states=want_hidden, return_dict=True)
    logits = out.logits
    b, t = target_positions(labels)
    rows = [int((b == i).sum()) for i in range(labels.shape[0])]
    image_logits = None
    if image_token_id is not None:
        mask = inputs["input_ids"] == image_token_id
        image_logits = logits[mask].float()
    hidden = out.hidden_states[-1][b, t].float() if want_hidden else None
    features = tap.take() if tap is not None else None
    features = features.float() if features is not None else None
    return ModelOutputs(logits[b, t].float(), rows, image_logits, features, hidden)  # the losses work in fp32

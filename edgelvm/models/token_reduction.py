"""Training-free image-token reduction chosen at export (``--image-tokens``): VisionZip's dominant tokens, inside
the vision graph.

Time to first token on an edge device is mostly the prefill of the image tokens (576 for LLaVA-1.5 against a few
dozen of text). VisionZip (Yang et al., 2024) keeps the tokens the vision tower itself attends to most and drops the
rest, without training. Here the selection is part of the exported vision graph, so every backend (ONNX Runtime,
TensorRT) and every runtime gets it without knowing about it: the graph returns ``[images, N, hidden]`` and the
manifest's ``preprocess.tokens_per_image`` is N, which is all the runtime reads to place image tokens.

What is kept, and why:

- **The score** is the attention the tower pays to each token in the layer whose output the features are taken
  from (VisionZip's choice): with a CLS token (CLIP), the CLS row of that layer's attention probabilities, averaged
  over heads; without one (SigLIP), the mean attention each token receives over all queries and heads. The
  probabilities are recomputed from that layer's input hidden states with its own ``layer_norm1``, ``q_proj`` and
  ``k_proj`` (transformers' SDPA attention returns no weights), so the graph is self-contained and traceable.
- **Dominant tokens only, no merged "contextual" tokens.** VisionZip also averages the dropped tokens into a few
  contextual ones; such a token has no place in the image's raster order (it averages scattered patches), while
  kept tokens stay in raster order here so that the 1-D positions of the language model keep the image's reading
  order. N dominant tokens is also one rule for every backend (top-k, sort, gather) with no data-dependent shapes.
- **N counts every token the projector sees**: a CLS token kept by the feature strategy (``full``) is always among
  them (VisionZip keeps it too).

Only families whose images are one fixed-count run of 1-D-positioned tokens can drop tokens this way; every other
family is refused at export with the reason (:data:`REFUSALS`), never silently exported in full.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from edgelvm.errors import ConfigError, UnsupportedModelError

#: The export option (CLI) and its library field (``ExportConfig.image_tokens``), for messages.
OPTION = "--image-tokens"
#: The ``method`` the manifest records.
METHOD = "visionzip_dominant"
#: Score kinds: the CLS token's attention row / the mean attention each token receives.
CLS_ATTENTION = "cls_attention"
MEAN_ATTENTION = "mean_attention_received"

_FIX_OFF = f"export without {OPTION} (reduction is available for the llava family: docs/families.md)"

#: Why a family cannot drop image tokens in its vision graph (yet), by adapter family.
REFUSALS: dict[str, str] = {
    "llava_next": "its images are tiled (anyres): the runtime stitches each view's full token grid, unpads it to the "
    "image's aspect ratio and appends a newline token after every row, which needs every view's whole grid",
    "llava_onevision": "its images are tiled (anyres_max): the runtime stitches, unpads and downscales each view's "
    "full token grid, which needs every view's whole grid",
    "internvl": "its images are dynamic tiles whose tokens are pixel-shuffled (2x2 neighbours merged) before the "
    "projector: a token's neighbours must all be there",
    "idefics3": "its images are split into tiles with per-tile marker tokens and a pixel-shuffle connector: each "
    "tile's token count is fixed by the markers' layout",
    "qwen2_vl": "its M-RoPE positions come from each token's place in the image's grid (runtime/images/positions.py):"
    " dropping tokens would need their grid coordinates kept too",
    "qwen2_5_vl": "its M-RoPE positions come from each token's place in the image's grid: dropping tokens would "
    "need their grid coordinates kept too",
    "qwen3_vl": "its M-RoPE positions come from each token's place in the image's grid, and its DeepStack features "
    "enter the decoder at those positions",
    "qwen3_5": "its M-RoPE positions come from each token's place in the image's grid",
    "lfm2_vl": "its views are patched at their own grids and pixel-unshuffled before the projector",
    "gemma3": "its tower's tokens are average-pooled to a fixed grid of soft tokens inside the projector, which "
    "needs the whole grid (selection after pooling is not implemented)",
    "paligemma": "not implemented for its prefix-LM layout yet (the image and prompt form one bidirectional block)",
    "blip-2": "its image tokens are the Q-Former's learned queries, not patches: there is no patch token to drop",
    "instructblip": "its image tokens are the Q-Former's learned queries, not patches: there is no patch token to drop",
    "idefics": "it is a cross-attention model: image features are not prompt tokens, so they cost no prefill",
}


@dataclass(frozen=True)
class TokenReduction:
    """What was applied, as the manifest's ``image_token_reduction`` records it."""

    tokens_per_image: int  # kept per vision-graph input (the manifest's preprocess.tokens_per_image)
    full_tokens_per_image: int  # what the tower yields without reduction
    score: str  # CLS_ATTENTION | MEAN_ATTENTION
    vision_layer: int  # the encoder layer (0-based) whose attention ranks the tokens
    method: str = METHOD
    order: str = "raster"  # kept tokens stay in the image's raster order

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)


def parse_image_tokens(text: str | None) -> int | float | None:
    """The CLI's syntax: an integer is a token count per image (``144``); a number with a decimal point (or an
    exponent) is the fraction of the tower's tokens to keep (``0.25``). Checked against the model later
    (:func:`resolve_image_tokens`)."""
    if text is None:
        return None
    value = text.strip()
    try:
        return int(value)
    except ValueError:
        pass
    try:
        ratio = float(value)
    except ValueError:
        raise ConfigError(
            f"{OPTION} {text!r} is neither a token count nor a fraction",
            where=OPTION,
            fix=f"pass a count per image ({OPTION} 144) or a fraction of the image's tokens ({OPTION} 0.25)",
        ) from None
    return ratio


def resolve_image_tokens(value: int | float, full: int) -> int:
    """Tokens to keep per image for ``value`` (a count, or a fraction of ``full`` rounded half up, at least 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{OPTION} must be a number, got {value!r}", where=OPTION,
                          fix=f"pass a count ({OPTION} 144) or a fraction ({OPTION} 0.25)")  # fmt: skip
    if isinstance(value, int):
        if not 1 <= value <= full:
            raise ConfigError(
                f"{OPTION} {value} is outside 1..{full} (this model's tokens per image)",
                where=OPTION,
                fix=f"pass a count from 1 to {full}, or a fraction in (0, 1] such as 0.25",
            )
        return value
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ConfigError(
            f"{OPTION} fraction {value} is outside (0, 1]",
            where=OPTION,
            fix=f"pass a fraction such as 0.25 (a quarter of the {full} tokens per image), or an integer count",
        )
    return max(1, math.floor(value * full + 0.5))


def check_family(family: str) -> None:
    """Refuse a family whose images cannot drop tokens, before its weights are loaded (``edgelvm export`` reads
    the family from config.json)."""
    reason = REFUSALS.get(family)
    if reason is not None:
        raise UnsupportedModelError(f"{OPTION} is not supported for {family}: {reason}", where=OPTION, fix=_FIX_OFF)


def refuse(family: str, reason: str) -> UnsupportedModelError:
    """The error an adapter raises when its loaded model cannot drop tokens (e.g. a feature layer with no
    attention before it)."""
    return UnsupportedModelError(f"{OPTION} is not supported for this {family} model: {reason}", where=OPTION,
                                 fix=_FIX_OFF)  # fmt: skip


def reduce_image_tokens(adapter: Any, value: int | float | None) -> tuple[Any, TokenReduction | None]:
    """``(adapter, None)`` when ``value`` is None (off: today's graph and tokens) or keeps every token; else the
    adapter's reducing copy (``adapter.with_image_tokens(n)``: the family decides how its tower selects) and what
    it applies. An adapter without that method is refused with its family's reason."""
    if value is None:
        return adapter, None
    check_family(adapter.family)
    reducer = getattr(adapter, "with_image_tokens", None)
    if reducer is None:
        raise UnsupportedModelError(
            f"{OPTION} is not supported for {adapter.family}: its adapter does not say how its vision tower could "
            "select tokens",
            where=OPTION,
            fix=_FIX_OFF,
        )
    return reducer(value)


# ---- the graph's part (torch; imported lazily by the adapters' wrappers) ---------------------------------------------
def attention_scores(layer: Any, hidden: Any, kind: str) -> Any:
    """``[images, tokens]``: how much attention each token gets in encoder ``layer`` (a CLIP / SigLIP layer:
    ``layer_norm1`` then ``self_attn`` with q/k projections), recomputed from the layer's input ``hidden``
    ``[images, tokens, width]``. ``kind``: :data:`CLS_ATTENTION` (row 0's probabilities) or :data:`MEAN_ATTENTION`
    (each column's mean over the queries); both averaged over heads, in fp32 (the ranking decides which tokens
    survive, so it is computed at the best precision the graph has)."""
    import torch
    from torch.nn.functional import linear

    attention = layer.self_attn
    x = layer.layer_norm1(hidden)
    images, tokens, _ = x.shape
    head_dim = int(attention.head_dim)
    # The projections' weights, not the modules: a second call of q_proj / k_proj would be a second site of those
    # layers for the INT8 vision rewrite (and its activation quantizers), which quantizes the tower's own calls.
    k_proj, q_proj = attention.k_proj, attention.q_proj
    keys = linear(x, k_proj.weight, k_proj.bias).view(images, tokens, -1, head_dim).transpose(1, 2).float()
    queries_from = x[:, :1] if kind == CLS_ATTENTION else x
    queries = linear(queries_from, q_proj.weight, q_proj.bias)
    queries = queries.view(images, queries_from.shape[1], -1, head_dim).transpose(1, 2).float()
    probs = torch.softmax(torch.matmul(queries, keys.transpose(-1, -2)) * float(attention.scale), dim=-1)
    return probs.mean(dim=(1, 2))  # [images, tokens]: over heads, and over queries (one for the CLS row)


def keep_top_tokens(features: Any, scores: Any, keep: int) -> Any:
    """The ``keep`` highest-scoring rows of ``features [images, tokens, width]`` per image, in their original
    order: ``topk`` then a sort of the indices (two TopK nodes and a GatherElements in ONNX)."""
    index = scores.topk(keep, dim=1).indices.sort(dim=1).values
    return features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


#: Score differences the parity check ignores when the graph and PyTorch rank two tokens differently (relative to
#: the largest score): float rounding at a near tie, not a wrong selection.
_SCORE_SLACK = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}


def reference_at_graph_tokens(full: Any, scores: Any, got: Any, keep: int) -> Any:
    """The reference a reducing vision graph is checked against: per image, PyTorch's features (``full [images,
    tokens, width]``) at the tokens the graph kept — when those are a valid choice, i.e. in raster order and a top
    ``keep`` of PyTorch's ``scores`` up to :data:`_SCORE_SLACK` (the graph's float rounding may order a near tie the
    other way) — else PyTorch's own selection, which then fails the check.

    The graph's tokens are found as the nearest rows of ``full`` to its output ``got`` (numpy): a graph whose
    features are wrong is as far from them as from PyTorch's selection."""
    import torch

    own = keep_top_tokens(full, scores, keep)
    rows = []
    for image in range(full.shape[0]):
        candidates, score = full[image].float(), scores[image].float()
        graph = torch.as_tensor(got[image]).float()
        index = torch.cdist(graph, candidates).argmin(dim=1)
        finite = score[torch.isfinite(score)]  # a kept CLS scores +inf
        largest = float(finite.abs().max()) if finite.numel() else 0.0
        slack = _SCORE_SLACK[str(full.dtype).removeprefix("torch.")] * largest
        cut = score.sort(descending=True).values[keep - 1]
        chosen = torch.zeros_like(score, dtype=torch.bool)
        chosen[index] = True
        valid = (
            bool((index[1:] > index[:-1]).all())
            and bool((score[chosen] >= cut - slack).all())
            and bool((score[~chosen] <= cut + slack).all())
        )
        rows.append(full[image, index] if valid else own[image])
    return torch.stack(rows)

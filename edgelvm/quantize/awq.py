"""AWQ (Lin et al., 2024): activation-aware scaling and clipping before round-to-nearest INT4.

Channels that carry large activations matter most; scaling their weight columns up by ``s`` (and the producing
op's output down by ``s``, exactly, where it can absorb it: an RMSNorm/LayerNorm weight or a preceding linear's
rows) makes their rounding error relatively smaller. ``s = mean|x| ** α`` with α searched on a grid.

Both searches are evaluated exactly on the calibration tokens through the Gram matrix ``H = Σ xᵀx`` (see
:mod:`edgelvm.calibration.stats`): a weight change ``ΔW`` changes the outputs by ``tr(ΔW H ΔWᵀ)`` in squared norm.
That is the loss AutoAWQ computes by re-running the layer, without keeping activations around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GRID = 20
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


def fake_int4(w: Any, block: int, symmetric: bool, clip: Any = None) -> Any:
    """Block-wise INT4 round trip of ``w`` (torch ``[N, K]``, blocks along K; the same arithmetic as
    :func:`edgelvm.quantize.int4.quantize_rtn`). ``clip``: ``[N, k_blocks]`` range ratios."""
    import torch

    n, k = w.shape
    kb = -(-k // block)
    padded = torch.zeros(n, kb * block, dtype=torch.float32)
    padded[:, :k] = w.float()
    b = padded.reshape(n, kb, block)
    ratio = 1.0 if clip is None else clip
    if symmetric:
        absmax = b.abs().amax(-1) * ratio
        scale = torch.where(absmax > 0, absmax / 7.0, torch.ones_like(absmax))
        q = torch.clamp(torch.round(b / scale[..., None]) + 8, 0, 15) - 8
        deq = q * scale[..., None]
    else:
        lo = torch.clamp(b.amin(-1), max=0.0) * ratio
        hi = torch.clamp(b.amax(-1), min=0.0) * ratio
        scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
        zp = torch.clamp(torch.round(-lo / scale), 0, 15)
        q = torch.clamp(torch.round(b / scale[..., None]) + zp[..., None], 0, 15)
        deq = (q - zp[..., None]) * scale[..., None]
    return deq.reshape(n, -1)[:, :k]


def output_error(delta: Any, gram: Any) -> float:
    """``tr(Δ H Δᵀ)``: the summed squared output change over the calibration tokens (estimated on the sample
    where ``gram`` is a :class:`~edgelvm.calibration.stats.TokenSample`)."""
    if hasattr(gram, "error"):
        return gram.error(delta)
    d = delta.double()
    return float(((d @ gram) * d).sum())


def scaled_input(gram: Any, s: Any) -> Any:
    """``H`` of the input ``x / s`` (AWQ's scaled space): ``H / (s sᵀ)``, or the sample divided by ``s``."""
    import torch

    return gram.divided(s) if hasattr(gram, "divided") else gram / torch.outer(s, s).double()


def _diagonal_blocks(gram: Any, k: int, block: int) -> Any:
    """``[k_blocks, block, block]``: the diagonal blocks of ``H`` (zero-padded past ``k``), float32."""
    import torch

    kb = -(-k // block)
    blocks = torch.zeros(kb, block, block)
    for i in range(kb):
        lo, hi = i * block, min((i + 1) * block, k)
        part = gram.gram_block(lo, hi) if hasattr(gram, "gram_block") else gram[lo:hi, lo:hi].float()
        blocks[i, : hi - lo, : hi - lo] = part
    return blocks


@dataclass
class ScaleSearch:
    scales: Any  # torch [K]; the group's weights are multiplied by it, the producer divided
    alpha: float
    loss: float  # output error with the chosen scales
    loss_unscaled: float  # plain RTN


def search_scales(weights: list[Any], gram: Any, abs_mean: Any, block: int, symmetric: bool) -> ScaleSearch:
    """The α in ``[0, 1)`` whose scales ``mean|x|^α`` (normalised) minimise the group's output error."""
    import torch

    x = torch.as_tensor(abs_mean, dtype=torch.float32).clamp(min=1e-4)
    best: ScaleSearch | None = None
    base = 0.0
    for step in range(GRID):
        alpha = step / GRID
        s = x.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w in weights:
            w = w.float()
            loss += output_error(fake_int4(w * s, block, symmetric) / s - w, gram)
        if step == 0:
            base = loss
        if best is None or loss < best.loss:
            best = ScaleSearch(s, alpha, loss, base)
    assert best is not None
    best.loss_unscaled = base
    return best


def search_clip(w: Any, gram: Any, block: int, symmetric: bool) -> Any:
    """Per (output row, block) range ratio minimising that block's own output error (AutoAWQ's auto-clip),
    measured with the block's diagonal part of ``H``. Returns ``[N, k_blocks]``."""
    import torch

    n, k = w.shape
    kb = -(-k // block)
    pad = kb * block - k
    h_blocks = _diagonal_blocks(gram, k, block)
    best_err = torch.full((n, kb), float("inf"))
    best_ratio = torch.ones(n, kb)
    for ratio in CLIP_RATIOS:
        clip = torch.full((n, kb), ratio)
        d = (fake_int4(w, block, symmetric, clip) - w.float())
        d = torch.nn.functional.pad(d, (0, pad)).reshape(n, kb, block)
        err = torch.einsum("nbi,bij,nbj->nb", d, h_blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, clip, best_ratio)
    return best_ratio

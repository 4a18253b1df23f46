"""GPTQ (Frantar et al., 2023): quantize a linear layer's weight column by column, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs (``H = 2 XᵀX``).

Static groups with activation order: the columns are processed in order of decreasing ``H_ii`` (the inputs that
matter most first, while the most columns remain to absorb their error), but each column keeps the scale of its
block in the original order, computed before the updates — so the result is an ordinary block-wise
:class:`~edgelvm.models.checkpoint.codes.Int4Weight` that MatMulNBits and DequantizeLinear read without a permutation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelvm.models.checkpoint.codes import Int4Weight
from edgelvm.quantize.int4 import int4_params, quantize_with_params

LAZY_BLOCK = 128  # columns updated together (the paper's lazy batch updates)


def gptq_quantize(
    w: Any, gram: Any, block: int, symmetric: bool, *, damp: float = 0.01, act_order: bool = True
) -> Int4Weight:
    """``w``: torch ``[N, K]`` (nn.Linear layout); ``gram``: ``Σ xᵀx`` ``[K, K]``. Returns the INT4 weight."""
    import torch

    W = w.detach().double().clone()
    H = gram.detach().double().clone()
    k = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scales, zero_points = int4_params(W.T.float().numpy(), block, symmetric)  # static groups, original order
    scale_t = torch.from_numpy(scales).double()  # [N, k_blocks]
    zp_t = torch.full_like(scale_t, 8.0) if zero_points is None else torch.from_numpy(zero_points).double()

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // block  # each (permuted) column's block in the original order
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    for i1 in range(0, k, LAZY_BLOCK):
        i2 = min(i1 + LAZY_BLOCK, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col, d = W1[:, j], Hinv1[j, j]
            g = group_of[i1 + j]
            s, z = scale_t[:, g], zp_t[:, g]
            q = (torch.clamp(torch.round(col / s) + z, 0, 15) - z) * s
            Q[:, i1 + j] = q
            err = (col - q) / d
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            E1[:, j] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    out = torch.zeros_like(Q)
    out[:, perm] = Q
    deq = out.float().numpy().T  # [K, N], on the grid of the static scales
    return quantize_with_params(np.ascontiguousarray(deq), scales, zero_points, block)

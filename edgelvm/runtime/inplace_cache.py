"""The KV cache of the fused ONNX Runtime decoder: one buffer per layer and key/value, written in place.

``[batch, kv_heads, capacity, head_dim]``, each row packed from position 0 with its own length (GroupQueryAttention's
right-padding convention). A step writes only the new positions, so there is no copy per token and half the memory
of the ping-pong cache that concatenating graphs need.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelvm.manifest import KVCacheSpec


class InPlaceKVCache:
    supports_reuse = True

    def __init__(self, spec: KVCacheSpec, batch: int, dtype: Any) -> None:
        self.spec, self.batch = spec, batch
        shape = (batch, spec.num_kv_heads, spec.max_length, spec.head_dim)
        self.buffers = [np.zeros(shape, dtype=dtype) for _ in range(2 * spec.num_layers)]
        self.lengths = np.zeros(batch, dtype=np.int64)

    @property
    def length(self) -> int:
        return int(self.lengths.max(initial=0))

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on (they are overwritten by the next step)."""
        np.minimum(self.lengths, length, out=self.lengths)

    def fill_from(self, prefix: InPlaceKVCache) -> None:
        """Every row starts from row 0 of a batch-1 ``prefix`` (a shared image + prompt head)."""
        n = int(prefix.lengths[0])
        for mine, theirs in zip(self.buffers, prefix.buffers):
            mine[:, :, :n] = theirs[:1, :, :n]
        self.lengths[:] = n

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

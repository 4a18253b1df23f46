"""Image-feature cache: a second question about the same frame skips the vision encoder.

Keyed by a hash of the *preprocessed* pixels (so the same frame as a path, a PIL image or a numpy array hits the
same entry, and two different frames never collide in practice), bounded in bytes with least-recently-used eviction.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def pixel_key(pixels: np.ndarray) -> str:
    """Content hash of one preprocessed image (shape and dtype included)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((pixels.shape, pixels.dtype.str)).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


class VisionCache:
    """LRU map ``pixel_key -> features [tokens, hidden]`` holding at most ``max_bytes`` of features (0 disables)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            features = self._items.get(key)
            if features is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: np.ndarray) -> None:
        if features.nbytes > self.max_bytes:
            return  # larger than the whole budget (or caching disabled): never cached
        features = features.copy()  # own the memory: callers' batch arrays must not pin a whole batch
        features.setflags(write=False)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key).nbytes
            self._items[key] = features
            self._bytes += features.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

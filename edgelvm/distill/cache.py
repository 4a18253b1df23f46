"""Offline teacher cache: the teacher runs once over the training set and its top-k logits per response token
(and, optionally, its image features) are stored in safetensors shards; the student then trains without the
teacher in memory.

Layout of ``DIR``::

    meta.json               format, teacher, data fingerprint, top_k, shard size, complete flag
    shard-00000.safetensors values [R, k] float32, indices [R, k] int32, offsets [n+1] int64,
                            features [n, tokens, D] (when cached)

Record ``i`` lives in shard ``i // shard_size``; its target rows are ``offsets[j]:offsets[j+1]`` with
``j = i % shard_size``. Shards are written to a temporary name and renamed, so an interrupted build resumes at the
first missing shard, and a cache built for other data, another teacher or another k is refused, not mixed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelvm.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class CacheKey:
    teacher: str
    data: str  # dataset fingerprint
    top_k: int
    n_records: int
    features: bool
    shard_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}


def _shard_path(root: Path, shard: int) -> Path:
    return root / f"shard-{shard:05d}.safetensors"


def check_or_start(root: Path, key: CacheKey) -> bool:
    """True when ``root`` holds a complete cache for ``key``; starts (or continues) one otherwise."""
    meta_file = root / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        complete = meta.pop("complete", False)
        if meta != key.to_dict():
            diff = {k: (meta.get(k), v) for k, v in key.to_dict().items() if meta.get(k) != v}
            raise ConfigError(
                f"this teacher cache was built for something else (cached vs now: {diff})",
                where=root,
                fix="point --cache-teacher at a new directory, or delete this one to rebuild it",
            )
        return bool(complete)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            "the directory is not empty and is not a teacher cache", where=root, fix="choose an empty directory"
        )
    root.mkdir(parents=True, exist_ok=True)
    _write_json(meta_file, {**key.to_dict(), "complete": False})
    return False


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def build_cache(root: Path, key: CacheKey, compute: Any, progress: Any = None) -> None:
    """Fill missing shards. ``compute(indices) -> list[(values [r,k], indices [r,k], features or None)]``."""
    import torch
    from safetensors.torch import save_file

    n_shards = (key.n_records + key.shard_size - 1) // key.shard_size
    for shard in range(n_shards):
        path = _shard_path(root, shard)
        lo, hi = shard * key.shard_size, min((shard + 1) * key.shard_size, key.n_records)
        if path.is_file():
            if progress:
                progress(hi - lo)
            continue
        parts = compute(list(range(lo, hi)))
        offsets = [0]
        for values, _, _ in parts:
            offsets.append(offsets[-1] + values.shape[0])
        tensors = {
            "values": torch.cat([p[0] for p in parts]).float().contiguous(),
            "indices": torch.cat([p[1] for p in parts]).to(torch.int32).contiguous(),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }
        if key.features:
            tensors["features"] = torch.stack([p[2] for p in parts]).float().contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        if progress:
            progress(hi - lo)
    _write_json(root / "meta.json", {**key.to_dict(), "complete": True})
    log.info("teacher cache complete: %s (%d shards)", root, n_shards)


class TeacherCache:
    """Read side: ``get(i)`` -> (values [r, k], indices [r, k], features or None) for record ``i``."""

    def __init__(self, root: Path, key: CacheKey) -> None:
        from safetensors import safe_open

        self.key = key
        n_shards = (key.n_records + key.shard_size - 1) // key.shard_size
        # memory-mapped: a cache larger than RAM trains fine; only offsets are read up front
        self._shards = [safe_open(str(_shard_path(root, s)), framework="pt") for s in range(n_shards)]
        self._offsets = [f.get_tensor("offsets") for f in self._shards]

    def get(self, index: int) -> tuple[Any, Any, Any | None]:
        shard, j = divmod(index, self.key.shard_size)
        f, offsets = self._shards[shard], self._offsets[shard]
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        features = f.get_slice("features")[j : j + 1][0] if self.key.features else None
        return f.get_slice("values")[lo:hi], f.get_slice("indices")[lo:hi].long(), features

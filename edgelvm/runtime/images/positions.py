"""Position ids as plain data (``manifest.positions``), computed in numpy: 1-D or M-RoPE.

``kind == "1d"`` (every family but Qwen2-VL): the backends compute ``cumsum(attention_mask) - 1`` themselves
(``runtime/kv_cache.py``); no rule object exists and nothing here runs.

``kind == "mrope"``: the rule gives the generation loop its per-step ``position_ids`` input (:class:`MRopeInputs`,
a :class:`~edgelvm.runtime.generate.StepInputs`), which replaces the backend's 1-D positions.

``kind == "mrope"`` (Qwen2-VL's multimodal rotary embedding): each token has ``rows`` (3) positions — temporal,
height, width. A port of transformers' ``Qwen2VLModel.get_rope_index`` for images and text:

- a run of text tokens counts up from the current position, equal in all three rows;
- an image of ``(t, grid_h, grid_w)`` patches, merged ``m x m`` into ``grid_h/m x grid_w/m`` tokens, gets
  ``(start + t_i, start + row, start + col)``;
- the text after an image starts at ``start + max(grid_h, grid_w) / m`` — the image's largest position + 1.

Positions are explicit per token, so left padding, a gap between a shared prefix and a row's suffix, and a chat
history reused from the KV cache need nothing special: a token's positions depend only on the tokens (and image
grids) before it. Generated tokens continue at the sequence's largest position + 1, + 2, ... — which is also what
``get_rope_index`` gives them as text when the next chat turn re-renders them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelvm.errors import BundleError, EdgeLVMError
from edgelvm.runtime.images.load import load_image
from edgelvm.runtime.kv_cache import left_pad

#: Position kinds this runtime implements (``manifest.positions.kind``).
POSITION_KINDS = ("1d", "mrope")


@dataclass(frozen=True)
class MRopePositions:
    """``positions`` for ``kind == "mrope"``."""

    image_token_id: int
    spatial_merge_size: int
    rows: int = 3
    #: ``(height, width) -> (t, grid_h, grid_w)`` of an image (the tiling rule's ``grid``), None without one
    grid: Callable[[int, int], Any] | None = field(default=None, compare=False)

    @classmethod
    def from_params(cls, params: dict[str, Any], grid: Callable[[int, int], Any] | None = None) -> MRopePositions:
        try:
            rule = cls(
                image_token_id=int(params["image_token_id"]),
                spatial_merge_size=int(params["spatial_merge_size"]),
                rows=int(params.get("rows", 3)),
                grid=grid,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"positions is incomplete for M-RoPE ({err!r})",
                where="edgelvm.json: positions",
                fix="re-export the bundle with `edgelvm export`",
            ) from None
        if rule.rows != 3:
            raise BundleError(
                f"M-RoPE with {rule.rows} position rows is not implemented (this edgelvm knows 3: t, h, w)",
                where="edgelvm.json: positions.rows",
                fix="upgrade edgelvm (`pip install -U edgelvm`)",
            )
        return rule

    def prompt(self, ids: list[int] | np.ndarray, grids: list[tuple[int, int, int]]) -> np.ndarray:
        """``[3, len(ids)]`` int64 positions of a token sequence whose image-token runs belong, in order, to images
        of these ``(t, grid_h, grid_w)`` patch grids."""
        ids = np.asarray(ids, dtype=np.int64)
        m = self.spatial_merge_size
        out = np.zeros((self.rows, len(ids)), dtype=np.int64)
        current, index, image = 0, 0, 0
        is_image = ids == self.image_token_id
        while index < len(ids):
            if not is_image[index]:
                end = index
                while end < len(ids) and not is_image[end]:
                    end += 1
                out[:, index:end] = current + np.arange(end - index)
                current += end - index
                index = end
                continue
            if image >= len(grids):
                raise EdgeLVMError(
                    f"the prompt has more image-token runs than the {len(grids)} image(s) given",
                    where="prompt",
                    fix="do not write the image token into the prompt text; pass images instead",
                )
            t, grid_h, grid_w = (int(v) for v in grids[image])
            gh, gw = grid_h // m, grid_w // m
            count = t * gh * gw
            if index + count > len(ids) or not is_image[index : index + count].all():
                raise EdgeLVMError(
                    f"image {image} needs {count} consecutive image tokens in the prompt",
                    where="prompt",
                    fix="do not write the image token into the prompt text; pass images instead",
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[0, index : index + count] = current + tt.reshape(-1)
            out[1, index : index + count] = current + hh.reshape(-1)
            out[2, index : index + count] = current + ww.reshape(-1)
            current += max(grid_h, grid_w) // m
            index += count
            image += 1
        return out

    @staticmethod
    def next_position(positions: np.ndarray) -> int:
        """Where generation continues after a sequence with these positions."""
        return int(positions.max()) + 1 if positions.size else 0

    def image_positions(self, ids: list[int], images: list[Any]) -> np.ndarray:
        """``[3, len(ids)]`` positions of a prompt whose images are ``images`` (opened, in placeholder order)."""
        if self.grid is None and images:
            raise BundleError(
                "M-RoPE positions need image grids, which this bundle's preprocess.tiling does not give",
                where="edgelvm.json",
                fix="re-export the bundle with `edgelvm export`",
            )
        grids = [self.grid(pil.height, pil.width) for pil in map(load_image, images)] if self.grid else []
        return self.prompt(ids, grids)

    def inputs(self, prompts: list[list[int]], images: list[list[Any]], features: Any, dtype: Any) -> MRopeInputs:
        """The loop's per-step inputs for a batch of prompts (``features`` and ``dtype`` are not needed)."""
        return MRopeInputs([self.image_positions(ids, pics) for ids, pics in zip(prompts, images)])


@dataclass
class MRopeInputs:
    """Explicit ``position_ids [3, B, S]`` for each step: the prompt's, then each row's largest + 1, + 2, ..."""

    positions: list[np.ndarray]  # per row [3, S_r]

    def __post_init__(self) -> None:
        self.starts = np.array([MRopePositions.next_position(p) for p in self.positions], dtype=np.int64)

    def shared_prefix(self) -> int:
        length = min(p.shape[1] for p in self.positions)
        same = np.all([(p[:, :length] == self.positions[0][:, :length]).all(axis=0) for p in self.positions], axis=0)
        return int(length if same.all() else np.argmin(same))

    def prompt(self, rows: Sequence[int], start: int, stop: int | None = None) -> dict[str, np.ndarray]:
        return {"position_ids": left_pad([self.positions[r][:, start:stop] for r in rows], axis=1)}

    def decode(self, step: int) -> dict[str, np.ndarray]:
        shape = (self.positions[0].shape[0], len(self.starts), 1)
        return {"position_ids": np.broadcast_to((self.starts + step)[None, :, None], shape).copy()}


def positions_rule(spec: dict[str, Any] | None, grid: Callable[[int, int], Any] | None = None) -> MRopePositions | None:
    """The rule for ``manifest.positions``: ``None`` for 1-D positions (the backends derive them from the mask);
    ``grid``: the tiling rule's image grid."""
    kind = (spec or {}).get("kind", "1d")
    if kind == "1d":
        return None
    if kind == "mrope":
        return MRopePositions.from_params(spec or {}, grid)
    raise BundleError(
        f"position kind {kind!r} is not implemented by this edgelvm (it knows: {', '.join(POSITION_KINDS)})",
        where="edgelvm.json: positions.kind",
        fix="upgrade edgelvm (`pip install -U edgelvm`)",
    )

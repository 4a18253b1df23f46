"""InternVL's dynamic tiling as plain data (numpy + PIL, no torch): ``tiling == "dynamic_tiles"``.

An image becomes a grid of ``tile_size`` tiles plus, when there is more than one tile, a thumbnail of the whole
image appended *last*. The grid (``columns x rows``, between ``min_tiles`` and ``max_tiles`` tiles) is the one whose
aspect ratio is closest to the image's; on a tie the later candidate (more tiles) wins while the image's area
exceeds half the candidate canvas. The image is resized (not padded) to the grid's canvas and cut row by row. Each
tile's features are the vision graph's output as they are (pixel shuffle and projector are inside the graph), so
packing is a concatenation in view order, and the prompt holds ``<img>`` + image tokens + ``</img>`` per image
(:meth:`DynamicTilesRule.segment`; the marker ids are in ``tiling_params``).

Every function mirrors transformers' ``GotOcr2ImageProcessorPil`` (``get_all_supported_aspect_ratios``,
``get_optimal_tiled_canvas``, ``crop_image_to_patches``, ``get_number_of_image_patches``) line for line, including
its float comparisons and candidate order, because a different grid changes the pixels, the token count and the
answer. Nothing from ``runtime/images/tiling.py`` fits beyond the view / pack protocol: LLaVA-NeXT's best resolution
maximises kept pixels and pads, this rule matches aspect ratios and stretches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BundleError


def supported_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Candidate ``(columns, rows)`` grids with ``min_tiles <= columns * rows <= max_tiles``, by tile count (a
    stable sort of the columns-major enumeration, as transformers orders them)."""
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def optimal_grid(height: int, width: int, tile_h: int, tile_w: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """``(columns, rows)`` of the grid whose aspect ratio is closest to the image's (``get_optimal_tiled_canvas``)."""
    aspect_ratio = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in supported_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_h * tile_w * cols * rows:
            best = (cols, rows)  # a tie: more tiles, while they cover less than twice the image's area
    return best


@dataclass(frozen=True)
class DynamicTilesRule:
    """The manifest's ``preprocess.tiling_params`` for ``tiling == "dynamic_tiles"``."""

    tile_size: tuple[int, int]  # (h, w) of one tile: the vision graph's input size
    min_tiles: int
    max_tiles: int  # 1: no tiling (the whole image resized to one tile)
    tokens_per_view: int  # image tokens one view's features fill (the prompt segment's length needs it)
    thumbnail: bool = True  # append the whole image resized to one tile after the tiles (when there are several)
    start_token_id: int | None = None  # token before an image's image tokens (InternVL's <img>)
    end_token_id: int | None = None  # token after them (</img>)

    @classmethod
    def load(cls, params: dict[str, Any], bundle_dir: str | Path | None = None) -> DynamicTilesRule:
        return cls.from_params(params)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DynamicTilesRule:
        try:
            start, end = params.get("start_token_id"), params.get("end_token_id")
            rule = cls(
                tile_size=(int(params["tile_size"][0]), int(params["tile_size"][1])),
                min_tiles=int(params["min_tiles"]),
                max_tiles=int(params["max_tiles"]),
                tokens_per_view=int(params["tokens_per_view"]),
                thumbnail=bool(params.get("thumbnail", True)),
                start_token_id=None if start is None else int(start),
                end_token_id=None if end is None else int(end),
            )
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise BundleError(
                f"preprocess.tiling_params is incomplete for dynamic_tiles tiling ({err!r})",
                where="edgelvm.json",
                fix="re-export the bundle with `edgelvm export`",
            ) from None
        if min(rule.tile_size) < 1 or rule.max_tiles < 1 or rule.tokens_per_view < 1:
            raise BundleError(
                f"dynamic_tiles needs a positive tile size, max_tiles and tokens_per_view, got {rule.tile_size} / "
                f"{rule.max_tiles} / {rule.tokens_per_view}",
                where="edgelvm.json: preprocess.tiling_params",
                fix="re-export the bundle with `edgelvm export`",
            )
        return rule

    def to_params(self) -> dict[str, Any]:
        return {
            "tile_size": list(self.tile_size),
            "min_tiles": self.min_tiles,
            "max_tiles": self.max_tiles,
            "tokens_per_view": self.tokens_per_view,
            "thumbnail": self.thumbnail,
            "start_token_id": self.start_token_id,
            "end_token_id": self.end_token_id,
            "max_views": self.max_views,  # informative (engine profiles size the vision batch by it)
        }

    @property
    def max_views(self) -> int:
        """The most vision-graph inputs one image can become: the largest grid's tiles and the thumbnail."""
        if self.max_tiles <= 1:
            return 1
        largest = max((c * r for c, r in supported_grids(self.min_tiles, self.max_tiles)), default=1)
        return largest + (1 if self.thumbnail and largest > 1 else 0)

    # ---- sizes -------------------------------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, columns)`` of tiles for an image of this size (``(1, 1)`` without tiling)."""
        if self.max_tiles <= 1:
            return 1, 1
        cols, rows = optimal_grid(height, width, *self.tile_size, self.min_tiles, self.max_tiles)
        return rows, cols

    def num_views(self, height: int, width: int) -> int:
        rows, cols = self.grid(height, width)
        tiles = rows * cols
        return tiles + (1 if self.thumbnail and tiles > 1 else 0)

    def token_count(self, height: int, width: int, tokens_per_view: int) -> int:
        """Image-feature positions of an image of this size (the markers around them not counted)."""
        return self.num_views(height, width) * tokens_per_view

    def segment(self, height: int, width: int, image_token_id: int) -> list[int]:
        """The image's prompt tokens: ``start`` + image tokens + ``end`` (markers the bundle does not name are
        left out)."""
        start = [] if self.start_token_id is None else [self.start_token_id]
        end = [] if self.end_token_id is None else [self.end_token_id]
        return [*start, *[image_token_id] * self.token_count(height, width, self.tokens_per_view), *end]

    def planned_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Every image :meth:`views` makes for an image of this size: the grid's canvas and a tile."""
        rows, cols = self.grid(height, width)
        return [(rows * self.tile_size[0], cols * self.tile_size[1]), self.tile_size]

    # ---- pixels ------------------------------------------------------------------------------------------------
    def views(self, rgb: Any, resample: int) -> list[Any]:
        """PIL RGB image -> ``[tile_0, tile_1, ..., thumbnail]`` (tiles row by row; one view without tiling), each
        already ``tile_size``, before the per-view rescale / normalize."""
        tile_h, tile_w = self.tile_size
        rows, cols = self.grid(rgb.height, rgb.width)
        canvas = rgb.resize((cols * tile_w, rows * tile_h), resample=resample)
        tiles = [
            canvas.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
            for r in range(rows)
            for c in range(cols)
        ]
        if self.thumbnail and len(tiles) > 1:
            tiles.append(rgb.resize((tile_w, tile_h), resample=resample))
        return tiles

    # ---- features ----------------------------------------------------------------------------------------------
    def pack(self, features: np.ndarray, height: int, width: int) -> np.ndarray:
        """``[n_views, T, E]`` (tiles, then the thumbnail) -> ``[n_views * T, E]``, in view order."""
        expected = self.num_views(height, width)
        if features.shape[0] != expected:
            raise BundleError(
                f"the vision graph returned {features.shape[0]} views; dynamic tiling of a {width}x{height} image "
                f"expects {expected}",
                where="preprocess.tiling_params",
                fix="re-export the bundle with `edgelvm export`",
            )
        return features.reshape(-1, features.shape[-1])

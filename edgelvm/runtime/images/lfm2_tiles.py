"""LFM2-VL's image rule as plain data (numpy + PIL, no torch): ``preprocess.tiling == "lfm2_tiles"``.

transformers' ``Lfm2VlImageProcessor`` (torchvision only) decides per image, from its size alone:

1. whether it is *too large* for one view: both edges rounded to multiples of ``patch * factor`` (at least
   ``patch``) cover more than ``max_image_tokens * (patch * factor)² * max_pixels_tolerance`` pixels;
2. its ``smart_resize`` size: edges rounded to multiples of ``patch * factor`` (at least one), scaled down (floor)
   or up (ceil) so the pixel count lies within ``[min_image_tokens, max_image_tokens] * (patch * factor)²``;
3. a too-large image (with ``do_image_splitting``; otherwise ``min_tiles = max_tiles = 1``) is resized to
   ``(tile * cols, tile * rows)`` and cut into row-major ``tile x tile`` tiles, the grid being the
   ``min_tiles <= cols * rows <= max_tiles`` one closest in aspect ratio (ties go to a later, larger grid when the
   image covers more than half of its area); with ``use_thumbnail`` the image resized to its step-2 size follows
   as the last view. Any other image is one view at its step-2 size.

Each view is rescaled / normalized by the preprocessor and cut into ``patch x patch`` patches flattened as
``(py, px, channel)`` (``convert_image_to_patches``), zero-padded to the batch's largest view; the vision graph also
takes each view's ``pixel_attention_mask``, ``spatial_shapes`` (patch rows, patch columns) and ``token_patches``
(the projector's pixel-unshuffle gather, :func:`token_patch_index`). A view of
``h x w`` patches gives ``ceil(h / factor) * ceil(w / factor)`` image tokens, and the prompt (``Lfm2VlProcessor.
_build_image_tokens``) is ``<|image_start|>`` then, per tile, ``<|img_row_r_col_c|>`` and its tokens, then
``<|img_thumbnail|>`` and the thumbnail's tokens, then ``<|image_end|>`` (one view: start, tokens, end; the markers
only with ``use_image_special_tokens``). Resizes are PIL's on uint8 pixels, where torchvision's antialiased
bilinear may differ by a grey level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BundleError

_WHERE = "edgelvm.json: preprocess.tiling_params"
_FIX = "re-export the bundle with `edgelvm export`"


def _bad(problem: str) -> BundleError:
    return BundleError(f"LFM2-VL tiling: {problem}", where=_WHERE, fix=_FIX)


def target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Candidate grids ``(cols, rows)`` by tile count, in transformers' order (the order decides ties)."""
    ratios = [
        (w, h)
        for n in range(min_tiles, max_tiles + 1)
        for w in range(1, n + 1)
        for h in range(1, n + 1)
        if min_tiles <= w * h <= max_tiles
    ]
    return sorted(set(ratios), key=lambda x: x[0] * x[1])


def closest_grid(height: int, width: int, ratios: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """``(cols, rows)`` closest to the image's aspect ratio (``find_closest_aspect_ratio``, its tie-break too)."""
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * (tile * tile * ratio[0] * ratio[1]):
            best = ratio
    return best


@dataclass(frozen=True)
class Lfm2TilesRule:
    """The manifest's ``preprocess.tiling_params`` for ``tiling == "lfm2_tiles"``."""

    encoder_patch_size: int
    downsample_factor: int
    tile_size: int
    min_image_tokens: int
    max_image_tokens: int
    min_tiles: int
    max_tiles: int
    do_image_splitting: bool
    use_thumbnail: bool
    max_pixels_tolerance: float
    image_start_ids: list[int]  # <|image_start|>
    image_end_ids: list[int]  # <|image_end|>
    thumbnail_ids: list[int]  # <|img_thumbnail|>
    row_col_token_ids: list[list[list[int]]]  # [row - 1][col - 1] -> ids of <|img_row_{row}_col_{col}|>
    use_image_special_tokens: bool = True

    @classmethod
    def load(cls, params: dict[str, Any], bundle_dir: str | Path | None = None) -> Lfm2TilesRule:
        """The ``TILING_RULES`` factory (the rule needs no bundle file)."""
        try:

            def ids(values: Any) -> list[int]:
                return [int(v) for v in values]

            rule = cls(
                **{name: int(params[name]) for name in _INT_PARAMS},
                do_image_splitting=bool(params["do_image_splitting"]),
                use_thumbnail=bool(params["use_thumbnail"]),
                max_pixels_tolerance=float(params["max_pixels_tolerance"]),
                image_start_ids=ids(params["image_start_ids"]),
                image_end_ids=ids(params["image_end_ids"]),
                thumbnail_ids=ids(params["thumbnail_ids"]),
                row_col_token_ids=[[ids(cell) for cell in row] for row in params["row_col_token_ids"]],
                use_image_special_tokens=bool(params.get("use_image_special_tokens", True)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise _bad(f"preprocess.tiling_params is incomplete ({err!r})") from None
        rule._check()
        return rule

    def _check(self) -> None:
        p, f, tile = self.encoder_patch_size, self.downsample_factor, self.tile_size
        if min(p, f, tile, self.min_image_tokens) < 1 or self.max_image_tokens < self.min_image_tokens:
            raise _bad(f"sizes must be positive with min_image_tokens <= max_image_tokens ({self.to_params()})")
        if not self.max_pixels_tolerance > 0:
            raise _bad(f"max_pixels_tolerance must be positive (got {self.max_pixels_tolerance})")
        if self.splits:
            # transformers raises on min > max; a one-tile split has a thumbnail-sized token count but a tile's
            # features, and a tile of a fractional factor x factor block count gives the model fewer features than
            # the processor's tokens: transformers itself fails on those images, so such bundles are refused
            if not 2 <= self.min_tiles <= self.max_tiles:
                raise _bad(f"needs 2 <= min_tiles <= max_tiles (got {self.min_tiles}, {self.max_tiles})")
            if tile % (p * f):
                raise _bad(f"tile_size {tile} is not a multiple of encoder_patch_size * downsample_factor {p * f}")
            if self.use_image_special_tokens:
                have = self.row_col_token_ids
                for cols, rows in self.ratios:
                    if rows > len(have) or any(cols > len(row) for row in have[:rows]):
                        raise _bad(f"row_col_token_ids lacks the <|img_row_r_col_c|> markers of a {rows}x{cols} grid")
        if self.use_image_special_tokens and not (self.image_start_ids and self.image_end_ids and self.thumbnail_ids):
            raise _bad("image_start_ids, image_end_ids and thumbnail_ids must not be empty")

    def to_params(self) -> dict[str, Any]:
        return {
            **{name: getattr(self, name) for name in _INT_PARAMS},
            "do_image_splitting": self.do_image_splitting,
            "use_thumbnail": self.use_thumbnail,
            "max_pixels_tolerance": self.max_pixels_tolerance,
            "image_start_ids": self.image_start_ids,
            "image_end_ids": self.image_end_ids,
            "thumbnail_ids": self.thumbnail_ids,
            "row_col_token_ids": self.row_col_token_ids,
            "use_image_special_tokens": self.use_image_special_tokens,
            "max_views": self.max_views,  # informative (engine profiles size the vision batch by it)
            "graph_inputs": ["pixel_values", "pixel_attention_mask", "spatial_shapes"],  # informative
        }

    # ---- layout ------------------------------------------------------------------------------------------------
    @property
    def splits(self) -> bool:
        """Whether a large image is tiled (transformers: not without ``do_image_splitting``, nor with one tile)."""
        return self.do_image_splitting and not self.min_tiles == self.max_tiles == 1

    @property
    def ratios(self) -> list[tuple[int, int]]:
        return target_ratios(self.min_tiles, self.max_tiles) if self.splits else [(1, 1)]

    @property
    def max_views(self) -> int:
        return self.max_tiles + int(self.use_thumbnail) if self.splits else 1

    def smart_resize(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the single view / thumbnail (transformers' ``smart_resize`` returns ``(w, h)``)."""
        factor = self.encoder_patch_size * self.downsample_factor
        min_pixels, max_pixels = self.min_image_tokens * factor**2, self.max_image_tokens * factor**2
        h_bar = max(factor, round(height / factor) * factor)
        w_bar = max(factor, round(width / factor) * factor)
        if h_bar * w_bar > max_pixels:
            beta = math.sqrt((height * width) / max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar

    def is_too_large(self, height: int, width: int) -> bool:
        p, factor = self.encoder_patch_size, self.encoder_patch_size * self.downsample_factor
        h_bar = max(p, round(height / factor) * factor)
        w_bar = max(p, round(width / factor) * factor)
        return h_bar * w_bar > self.max_image_tokens * factor**2 * self.max_pixels_tolerance

    def layout(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(rows, cols, h, w)``: the tile grid (``(1, 1)``: not split) and the single view's / thumbnail's size."""
        new_h, new_w = self.smart_resize(height, width)
        if self.splits and self.is_too_large(height, width):
            cols, rows = closest_grid(height, width, self.ratios, self.tile_size)
            return rows, cols, new_h, new_w
        return 1, 1, new_h, new_w

    def view_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Each view's ``(patch rows, patch columns)`` in view order (``spatial_shapes``)."""
        rows, cols, new_h, new_w = self.layout(height, width)
        p = self.encoder_patch_size
        small = [(new_h // p, new_w // p)]
        if rows * cols == 1:
            return small
        return [(self.tile_size // p, self.tile_size // p)] * (rows * cols) + (small if self.use_thumbnail else [])

    def view_tokens(self, height: int, width: int) -> list[int]:
        f = self.downsample_factor
        return [math.ceil(h / f) * math.ceil(w / f) for h, w in self.view_shapes(height, width)]

    def token_count(self, height: int, width: int, tokens_per_view: int = 0) -> int:
        return sum(self.view_tokens(height, width))

    def segment(self, height: int, width: int, image_token_id: int) -> list[int]:
        """The image's prompt ids (``_build_image_tokens``): markers and each view's image tokens, in view order."""
        rows, cols, _, _ = self.layout(height, width)
        tokens = self.view_tokens(height, width)
        special = self.use_image_special_tokens
        out = list(self.image_start_ids) if special else []
        if rows * cols > 1:
            for index in range(rows * cols):
                out += self.row_col_token_ids[index // cols][index % cols] if special else []
                out += [int(image_token_id)] * tokens[index]
            if self.use_thumbnail:
                out += (self.thumbnail_ids if special else []) + [int(image_token_id)] * tokens[-1]
        else:
            out += [int(image_token_id)] * tokens[0]
        return out + (self.image_end_ids if special else [])

    def planned_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Every image :meth:`views` makes: the tile canvas and a tile, and the single view / thumbnail."""
        rows, cols, new_h, new_w = self.layout(height, width)
        if rows * cols == 1:
            return [(new_h, new_w)]
        return [(self.tile_size * rows, self.tile_size * cols), (self.tile_size, self.tile_size), (new_h, new_w)]

    # ---- pixels ------------------------------------------------------------------------------------------------
    def views(self, rgb: Any, resample: int) -> list[Any]:
        """PIL RGB image -> ``[tile_1_1, tile_1_2, ..., thumbnail]`` or ``[image at its smart_resize size]``."""
        from PIL import Image

        rows, cols, new_h, new_w = self.layout(rgb.height, rgb.width)
        small = [_resize(rgb, new_h, new_w, resample)]
        if rows * cols == 1:
            return small
        size = self.tile_size
        pixels = np.asarray(_resize(rgb, size * rows, size * cols, resample))
        tiles = [
            Image.fromarray(np.ascontiguousarray(pixels[r * size : (r + 1) * size, c * size : (c + 1) * size]))
            for r in range(rows)
            for c in range(cols)
        ]
        return tiles + (small if self.use_thumbnail else [])

    def flatten(self, views: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Normalized ``[3, H, W]`` views -> ``pixel_values [n_views, P, p * p * 3]``: each view's patches row-major,
        a patch as ``(py, px, channel)``, zero-padded to the largest view's ``P`` patches."""
        p = self.encoder_patch_size
        patches = []
        for chw in views:
            channels, height, width = chw.shape
            grid = np.asarray(chw, dtype=np.float32).reshape(channels, height // p, p, width // p, p)
            patches.append(grid.transpose(1, 3, 2, 4, 0).reshape((height // p) * (width // p), p * p * channels))
        out = np.zeros((len(patches), max(len(x) for x in patches), patches[0].shape[1]), dtype=np.float32)
        for index, x in enumerate(patches):
            out[index, : len(x)] = x
        return out

    def graph_inputs(self, height: int, width: int) -> dict[str, np.ndarray]:
        """``pixel_attention_mask [n_views, P]`` (1: a real patch), ``spatial_shapes [n_views, 2]`` and
        ``token_patches [n_views, P / f², f²]`` (:func:`token_patch_index`), int64."""
        shapes = np.asarray(self.view_shapes(height, width), dtype=np.int64)
        counts = shapes[:, 0] * shapes[:, 1]
        mask = (np.arange(counts.max())[None, :] < counts[:, None]).astype(np.int64)
        index = token_patch_index(shapes, int(counts.max()), self.downsample_factor)
        return {"pixel_attention_mask": mask, "spatial_shapes": shapes, "token_patches": index}

    # ---- features ----------------------------------------------------------------------------------------------
    def pack(self, features: np.ndarray, height: int, width: int) -> np.ndarray:
        """``[n_views, T, E]`` (view v's tokens are its first rows) -> ``[tokens, E]``, the views in order."""
        tokens = self.view_tokens(height, width)
        if features.ndim != 3 or features.shape[0] != len(tokens) or features.shape[1] < max(tokens):
            raise BundleError(
                f"the vision graph returned features of shape {tuple(features.shape)}; LFM2-VL tiling expects "
                f"{len(tokens)} views of at least {max(tokens)} tokens (this image's views have {tokens})",
                where="preprocess.tiling_params",
                fix=_FIX,
            )
        return np.concatenate([features[v, :n] for v, n in enumerate(tokens)], axis=0)


_INT_PARAMS = (
    "encoder_patch_size",
    "downsample_factor",
    "tile_size",
    "min_image_tokens",
    "max_image_tokens",
    "min_tiles",
    "max_tiles",
)


def _resize(image: Any, height: int, width: int, resample: int) -> Any:
    return image if (image.height, image.width) == (height, width) else image.resize((width, height), resample=resample)


def token_patch_index(spatial_shapes: np.ndarray, patches: int, factor: int) -> np.ndarray:
    """``[V, patches / f², f²]`` int64: for each view's tokens (row-major over its ``(h / f) x (w / f)`` blocks), the
    flat indices (into the tower's ``[V * patches]`` outputs) of the block's patches in (row offset, column offset)
    order — what ``Lfm2VlModel.get_image_features`` gathers before the projector's pixel unshuffle, given to the
    graph as data so that it needs no arithmetic on ``spatial_shapes``' values; padding tokens point at patch 0."""
    shapes = np.asarray(spatial_shapes, dtype=np.int64).reshape(-1, 2)
    index = np.zeros((len(shapes), patches // factor**2, factor * factor), dtype=np.int64)
    offsets = np.arange(factor)
    for view, (h, w) in enumerate(shapes):
        rows = (np.arange(h // factor) * factor)[:, None, None, None] + offsets[:, None]
        cols = (np.arange(w // factor) * factor)[None, :, None, None] + offsets
        block = (view * patches + rows * w + cols).reshape(-1, factor * factor)
        index[view, : len(block)] = block
    return index

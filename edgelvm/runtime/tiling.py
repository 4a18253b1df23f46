"""High-resolution tiling as plain data: LLaVA-NeXT's "anyres" rule (numpy + PIL, no torch).

An image becomes several vision-encoder inputs: a global *base view* (the whole image resized to the tile size) and
the *tiles* of a high-resolution copy. The copy's resolution is the grid pinpoint that keeps the most of the
image's pixels (``select_best_resolution``); the image is resized into it keeping its aspect ratio, padded with
black to fill it, and cut into ``tile_size`` squares, row by row. After the vision graph has encoded every view
(``[n_views, T, E]``), :meth:`AnyresRule.pack` lays the tiles' feature maps out as one large grid, removes the rows
or columns that only saw padding (*unpadding*), appends a learned ``image_newline`` vector after every grid row,
and puts the base view's features first. The number of image tokens therefore depends on the image's size.

Every function mirrors transformers' code line for line (``select_best_resolution`` and ``get_patch_output_size``
in ``image_processing_utils``; ``LlavaNextImageProcessorPil.get_image_patches`` / ``_pad_for_patching``;
``modeling_llava_next.get_anyres_image_grid_shape`` / ``unpad_image`` / ``LlavaNextModel.pack_image_features``;
``LlavaNextProcessor._get_number_of_features``), including its float rounding, because a one-token difference in
the count or a one-row shift in the unpadding changes what the language model sees. The pieces are separate
functions so that later tiling families (LLaVA-OneVision's anyres-max, InternVL's dynamic tiles) can reuse them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BundleError


def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` that keeps the most image pixels after a fit-inside downscale, then wastes least."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(pin_h), int(pin_w)), effective, wasted
    if best is None:
        raise BundleError(
            f"no grid pinpoint fits a {width}x{height} image", where="preprocess.tiling_params", fix="re-export"
        )
    return best


def fit_inside(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size of the image resized to fit ``target`` with its aspect ratio kept (transformers' rounding: ceil)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_bounds(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)``: the part of a ``grid_h x grid_w`` feature map (of the padded high-resolution
    copy) that covers the image itself; the rest saw only padding."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


@dataclass(frozen=True)
class AnyresRule:
    """The manifest's ``preprocess.tiling_params`` for ``tiling == "anyres"``."""

    grid_pinpoints: list[list[int]]  # possible high-resolution sizes, [[h, w], ...], multiples of tile_size
    tile_size: int  # side of one tile (the vision encoder's input size)
    base_size: tuple[int, int]  # (h, w) the whole image is resized to for the base view
    feature_grid: tuple[int, int]  # (rows, cols) of feature vectors one tile yields
    newline: str | None = None  # bundle file holding the image_newline vector appended after each grid row
    #: the vector itself, once loaded from the bundle (:meth:`load`)
    newline_vector: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, params: dict[str, Any], bundle_dir: str | Path | None) -> AnyresRule:
        """The rule from the manifest's ``tiling_params``, with its newline vector read from the bundle."""
        rule = cls.from_params(params)
        return replace(rule, newline_vector=load_newline(rule, bundle_dir))

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> AnyresRule:
        try:
            return cls(
                grid_pinpoints=[[int(h), int(w)] for h, w in params["grid_pinpoints"]],
                tile_size=int(params["tile_size"]),
                base_size=(int(params["base_size"][0]), int(params["base_size"][1])),
                feature_grid=(int(params["feature_grid"][0]), int(params["feature_grid"][1])),
                newline=params.get("newline"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"preprocess.tiling_params is incomplete for anyres tiling ({err!r})",
                where="edgelvm.json",
                fix="re-export the bundle with `edgelvm export`",
            ) from None

    def to_params(self) -> dict[str, Any]:
        return {
            "grid_pinpoints": self.grid_pinpoints,
            "tile_size": self.tile_size,
            "base_size": list(self.base_size),
            "feature_grid": list(self.feature_grid),
            "newline": self.newline,
            "max_views": self.max_views,  # informative (engine profiles size the vision batch by it)
        }

    @property
    def max_views(self) -> int:
        """The most vision-graph inputs one image can become: the base view and the largest grid's tiles."""
        return 1 + max((h // self.tile_size) * (w // self.tile_size) for h, w in self.grid_pinpoints)

    # ---- sizes -------------------------------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Tiles per column and per row for an image of this size."""
        best_h, best_w = select_best_resolution(height, width, self.grid_pinpoints)
        return best_h // self.tile_size, best_w // self.tile_size

    def packed_grid(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Bounds of the unpadded feature grid (see :func:`unpad_bounds`) for an image of this size."""
        rows, cols = self.grid(height, width)
        return unpad_bounds(height, width, rows * self.feature_grid[0], cols * self.feature_grid[1])

    def token_count(self, height: int, width: int, base_tokens: int) -> int:
        """Image tokens for an image of this size: the base view's, then the unpadded grid (+ one newline a row)."""
        r0, r1, c0, c1 = self.packed_grid(height, width)
        return base_tokens + (r1 - r0) * (c1 - c0 + (1 if self.newline else 0))

    # ---- pixels ------------------------------------------------------------------------------------------------
    def views(self, rgb: Any, resample: int) -> list[Any]:
        """PIL RGB image -> ``[base view, tile_0, tile_1, ...]`` as PIL images (tiles row by row), before the
        per-view resize / crop / normalize."""
        from PIL import Image

        height, width = rgb.height, rgb.width
        best_h, best_w = select_best_resolution(height, width, self.grid_pinpoints)
        new_h, new_w = fit_inside(height, width, best_h, best_w)
        resized = np.asarray(rgb.resize((new_w, new_h), resample=resample))
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2  # the extra pixel of an odd padding goes after
        canvas = np.zeros((best_h, best_w, resized.shape[2]), dtype=resized.dtype)
        canvas[top : top + new_h, left : left + new_w] = resized
        size = self.tile_size
        tiles = [
            Image.fromarray(np.ascontiguousarray(canvas[i : i + size, j : j + size]))
            for i in range(0, best_h, size)
            for j in range(0, best_w, size)
        ]
        base = rgb.resize((self.base_size[1], self.base_size[0]), resample=resample)
        return [base, *tiles]

    # ---- features ----------------------------------------------------------------------------------------------
    def pack(self, features: np.ndarray, height: int, width: int) -> np.ndarray:
        """``[n_views, T, E]`` (base view first) -> ``[tokens, E]`` in the order the language model reads them."""
        newline = self.newline_vector
        if self.newline is not None and newline is None:
            raise BundleError(
                "the anyres rule's image_newline vector was not loaded",
                where="preprocess.tiling_params.newline",
                fix="build the rule with AnyresRule.load(params, bundle_dir)",
            )
        if len(features) == 1:  # no tiles (transformers' single-view branch)
            base = features[0]
            return base if newline is None else np.concatenate([base, newline[None].astype(base.dtype)])
        base, tiles = features[0], features[1:]
        rows, cols = self.grid(height, width)
        fh, fw = self.feature_grid
        dim = features.shape[-1]
        if tiles.shape[0] != rows * cols or tiles.shape[1] != fh * fw:
            raise BundleError(
                f"the vision graph returned {tiles.shape[0]} tiles of {tiles.shape[1]} features; anyres tiling "
                f"expects {rows * cols} of {fh * fw}",
                where="preprocess.tiling_params",
                fix="re-export the bundle with `edgelvm export`",
            )
        grid = tiles.reshape(rows, cols, fh, fw, dim).transpose(0, 2, 1, 3, 4).reshape(rows * fh, cols * fw, dim)
        r0, r1, c0, c1 = unpad_bounds(height, width, rows * fh, cols * fw)
        grid = grid[r0:r1, c0:c1]
        if newline is not None:
            column = np.broadcast_to(newline.astype(grid.dtype), (grid.shape[0], 1, dim))
            grid = np.concatenate([grid, column], axis=1)
        return np.concatenate([base, grid.reshape(-1, dim)])


def load_newline(rule: AnyresRule, bundle_dir: str | Path | None) -> np.ndarray | None:
    if rule.newline is None:
        return None
    if bundle_dir is None:
        raise BundleError(
            "anyres tiling needs the bundle directory for its image_newline vector",
            where="ImagePreprocessor",
            fix="pass bundle_dir (VLM.load does)",
        )
    path = Path(bundle_dir) / rule.newline
    if not path.is_file():
        raise BundleError(f"{rule.newline!r} is missing", where=bundle_dir, fix="copy the complete bundle again")
    return np.load(path)

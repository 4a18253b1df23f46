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

    def planned_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Every image :meth:`views` makes for an image of this size: the fitted resize, the padded canvas, the base
        view and a tile (checked against the preprocessor's pixel limit before any is made)."""
        best_h, best_w = select_best_resolution(height, width, self.grid_pinpoints)
        return [fit_inside(height, width, best_h, best_w), (best_h, best_w), self.base_size, (self.tile_size,) * 2]

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
    def resize_grid(self, grid: np.ndarray) -> np.ndarray:
        """The unpadded ``[rows, cols, E]`` feature grid as the language model reads it (here unchanged; a
        subclass may resample it, see :class:`AnyresMaxRule`)."""
        return grid

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
        grid = self.resize_grid(grid[r0:r1, c0:c1])
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


# ---- LLaVA-OneVision: anyres with a cap on the packed grid ("anyres_max_N") ----------------------------------------
def capped_grid_size(rows: int, cols: int, feature_grid: tuple[int, int], max_num_patches: int) -> tuple[int, int]:
    """The size an unpadded ``rows x cols`` feature grid is downscaled to under "anyres_max_N": unchanged unless it
    holds more than about ``N`` tiles' worth of features (ratio > 1.1), else both sides divided by the ratio and
    floored (``LlavaOnevisionModel.pack_image_features`` / ``LlavaOnevisionProcessor._get_unpadded_features``)."""
    ratio = math.sqrt(rows * cols / (max_num_patches * feature_grid[0] * feature_grid[1]))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resize with ``align_corners=False`` along one axis (float32
    arithmetic, as its CPU kernel: ``src = scale * (dst + 0.5) - 0.5`` clamped at 0, ``scale = in / out``; the
    multiply-add is rounded once, as the compiled kernel's fused multiply-add does)."""
    scale = np.float64(np.float32(size_in / size_out))
    src = np.maximum(scale * (np.arange(size_out, dtype=np.float64) + 0.5) - 0.5, 0).astype(np.float32)
    low = np.minimum(src.astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    weight = (src - low.astype(np.float32)).astype(np.float32)
    return low, high, weight


def resize_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[H, W, E] -> [height, width, E]`` like ``torch.nn.functional.interpolate(mode="bilinear")`` (align_corners
    False, no antialiasing) on the ``[1, E, H, W]`` tensor."""
    y0, y1, wy = _bilinear_taps(grid.shape[0], height)
    x0, x1, wx = _bilinear_taps(grid.shape[1], width)
    wy, wx = wy.astype(grid.dtype)[:, None, None], wx.astype(grid.dtype)[None, :, None]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x1] * wx
    bottom = grid[y1][:, x0] * (1 - wx) + grid[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(grid.dtype)


@dataclass(frozen=True)
class AnyresMaxRule(AnyresRule):
    """``tiling == "anyres_max"``: :class:`AnyresRule` (same views, best resolution, unpadding, newline rows, base
    view first) whose unpadded feature grid is bilinearly downscaled when it exceeds ``max_num_patches`` tiles'
    worth of features (LLaVA-OneVision's ``vision_aspect_ratio = "anyres_max_N"``).

    ``max_images_per_prompt``: transformers lays out a prompt of several images differently (one untiled view each),
    which this rule does not reproduce; the preprocessor refuses more images than this in one prompt."""

    max_num_patches: int = 0
    max_images_per_prompt: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> AnyresMaxRule:
        rule = super().from_params(params)
        try:
            cap = int(params["max_num_patches"])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"preprocess.tiling_params is incomplete for anyres_max tiling ({err!r})",
                where="edgelvm.json",
                fix="re-export the bundle with `edgelvm export`",
            ) from None
        if cap < 1:
            raise BundleError(
                f"max_num_patches must be >= 1, not {cap}", where="edgelvm.json", fix="re-export the bundle"
            )
        most = params.get("max_images_per_prompt")
        return replace(rule, max_num_patches=cap, max_images_per_prompt=None if most is None else int(most))

    def to_params(self) -> dict[str, Any]:
        params = {**super().to_params(), "max_num_patches": self.max_num_patches}
        if self.max_images_per_prompt is not None:
            params["max_images_per_prompt"] = self.max_images_per_prompt
        return params

    def packed_size(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of the packed feature grid (before the newline column) for an image of this size."""
        r0, r1, c0, c1 = self.packed_grid(height, width)
        return capped_grid_size(r1 - r0, c1 - c0, self.feature_grid, self.max_num_patches)

    def token_count(self, height: int, width: int, base_tokens: int) -> int:
        rows, cols = self.packed_size(height, width)
        return base_tokens + rows * (cols + (1 if self.newline else 0))

    def resize_grid(self, grid: np.ndarray) -> np.ndarray:
        rows, cols = capped_grid_size(grid.shape[0], grid.shape[1], self.feature_grid, self.max_num_patches)
        return grid if (rows, cols) == grid.shape[:2] else resize_bilinear(grid, rows, cols)

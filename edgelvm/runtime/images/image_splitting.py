"""Idefics3 / SmolVLM image splitting as plain data (numpy + PIL, no torch): ``preprocess.tiling == "split"``.

An image becomes a row-major grid of square tiles plus a global view, all of the vision tower's input size ``tile``:

1. (``resize_longest_edge`` set, the processor's ``do_resize``) the image is resized so that its longest edge is
   ``resize_longest_edge`` — up or down — with the other edge ``int(longest / aspect)`` rounded up to even, then
   scaled down below ``max_size`` (4096) if needed;
2. (``do_image_splitting``) resized again so that both edges are multiples of ``tile`` (ceil, the other edge from
   ``int(edge / aspect)``); if either edge then exceeds ``tile``, the tiles are cropped row by row and the global
   view is that image resized to ``tile x tile``; otherwise the image (``tile x tile`` already) is the only view;
   without splitting the only view is the step-1 image resized to ``tile x tile``.

Every resize is PIL's with the bundle's filter on uint8 pixels, as ``Idefics3ImageProcessorPil`` /
``SmolVLMImageProcessorPil`` do; each view then goes through the usual rescale / normalize. All views are full tiles,
so the processor's ``pixel_attention_mask`` is all ones and the vision graph needs none.

In the prompt each image becomes (``Idefics3Processor`` / ``SmolVLMProcessor.get_image_prompt_string``)::

    <fake><row_1_col_1><image>*T <fake><row_1_col_2><image>*T ... "\\n"   (one line per tile row)
    "\\n" <fake><global-img><image>*T <fake>

or, for a single view, ``<fake><global-img><image>*T<fake>``. The marker ids (the ``\\n`` ids as the tokenizer encodes
them between those special tokens) are in ``tiling_params``; the features of the views fill the image tokens in view
order, so packing is a reshape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BundleError, EdgeLVMError

#: transformers' absolute cap on an image's resized edge (``MAX_IMAGE_SIZE`` in the Idefics3 image processors)
MAX_IMAGE_SIZE = 4096


def rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Longest edge to ``max_len``, the other from the aspect ratio, rounded up to even (at least 1)."""
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        if height % 2:
            height += 1
    else:
        height = max_len
        width = int(height * aspect)
        if width % 2:
            width += 1
    return max(height, 1), max(width, 1)


def scale_below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Longest edge down to ``max_len`` if it is longer (aspect ratio kept, floor)."""
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def multiple_of_tile(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both edges up to multiples of ``tile`` (``resize_for_vision_encoder``)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@dataclass(frozen=True)
class ImageSplittingRule:
    """The manifest's ``preprocess.tiling_params`` for ``tiling == "split"``."""

    tile: int  # side of every view (the processor's max_image_size["longest_edge"] = the tower's image_size)
    resize_longest_edge: int | None  # size["longest_edge"] when the processor resizes first, else None
    do_image_splitting: bool
    image_seq_len: int  # image tokens (feature vectors) per view
    fake_token_ids: list[int]  # <fake_token_around_image>
    global_token_ids: list[int]  # <global-img>
    row_col_token_ids: list[list[list[int]]]  # [row - 1][col - 1] -> ids of <row_{row}_col_{col}>
    row_end_ids: list[int]  # "\n" between a tile row's last image token and the next row's <fake>
    grid_end_ids: list[int]  # "\n\n" between the last tile row and the global view's <fake>
    max_size: int = MAX_IMAGE_SIZE

    @classmethod
    def load(cls, params: dict[str, Any], bundle_dir: str | Path | None = None) -> ImageSplittingRule:
        try:
            longest = params.get("resize_longest_edge")

            def ids(values: Any) -> list[int]:
                return [int(v) for v in values]

            rule = cls(
                tile=int(params["tile"]),
                resize_longest_edge=int(longest) if longest is not None else None,
                do_image_splitting=bool(params["do_image_splitting"]),
                image_seq_len=int(params["image_seq_len"]),
                fake_token_ids=ids(params["fake_token_ids"]),
                global_token_ids=ids(params["global_token_ids"]),
                row_col_token_ids=[[ids(cell) for cell in row] for row in params["row_col_token_ids"]],
                row_end_ids=ids(params["row_end_ids"]),
                grid_end_ids=ids(params["grid_end_ids"]),
                max_size=int(params.get("max_size", MAX_IMAGE_SIZE)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"preprocess.tiling_params is incomplete for split tiling ({err!r})",
                where="edgelvm.json",
                fix="re-export the bundle with `edgelvm export`",
            ) from None
        if rule.tile < 1 or rule.image_seq_len < 1:
            raise BundleError(
                f"split tiling needs tile >= 1 and image_seq_len >= 1 (got {rule.tile}, {rule.image_seq_len})",
                where="edgelvm.json: preprocess.tiling_params",
                fix="re-export the bundle with `edgelvm export`",
            )
        return rule

    def to_params(self) -> dict[str, Any]:
        return {
            "tile": self.tile,
            "resize_longest_edge": self.resize_longest_edge,
            "do_image_splitting": self.do_image_splitting,
            "image_seq_len": self.image_seq_len,
            "fake_token_ids": self.fake_token_ids,
            "global_token_ids": self.global_token_ids,
            "row_col_token_ids": self.row_col_token_ids,
            "row_end_ids": self.row_end_ids,
            "grid_end_ids": self.grid_end_ids,
            "max_size": self.max_size,
            "max_views": self.max_views,  # informative (engine profiles size the vision batch by it)
        }

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def max_grid(self) -> int:
        """The most tile rows (or columns) an image can get: bounded by the first resize, else by ``max_size``."""
        longest = min(self.resize_longest_edge or self.max_size, self.max_size)
        return math.ceil(longest / self.tile)

    @property
    def max_views(self) -> int:
        return self.max_grid**2 + 1 if self.do_image_splitting else 1

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The image's size after the processor's first resize (step 1)."""
        if self.resize_longest_edge is not None:
            height, width = rescale_to_max_len(height, width, self.resize_longest_edge)
            height, width = scale_below_upper_bound(height, width, self.max_size)
        return height, width

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(tile rows, tile columns) for an image of this size; ``(0, 0)`` when its only view is the global one."""
        if not self.do_image_splitting:
            return 0, 0
        h, w = multiple_of_tile(*self.resized_size(height, width), self.tile)
        if h > self.tile or w > self.tile:
            return h // self.tile, w // self.tile
        return 0, 0

    def token_count(self, height: int, width: int, tokens_per_view: int) -> int:
        rows, cols = self.grid(height, width)
        return (rows * cols + 1) * tokens_per_view

    def segment(self, height: int, width: int, image_token_id: int) -> list[int]:
        """The image's prompt token ids: markers and ``image_seq_len`` image tokens per view, in view order."""
        rows, cols = self.grid(height, width)
        image = [int(image_token_id)] * self.image_seq_len
        glob = [*self.fake_token_ids, *self.global_token_ids, *image, *self.fake_token_ids]
        if rows == 0:
            return glob
        if rows > len(self.row_col_token_ids) or any(cols > len(r) for r in self.row_col_token_ids[:rows]):
            raise EdgeLVMError(
                f"the image splits into {rows}x{cols} tiles but the bundle knows <row_i_col_j> markers only up to "
                f"{len(self.row_col_token_ids)}x{len(self.row_col_token_ids[0]) if self.row_col_token_ids else 0}",
                where="image",
                fix="use a smaller image",
            )
        out: list[int] = []
        for r in range(rows):
            for c in range(cols):
                out += [*self.fake_token_ids, *self.row_col_token_ids[r][c], *image]
            if r < rows - 1:
                out += self.row_end_ids
        return out + self.grid_end_ids + glob

    def planned_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Every image :meth:`views` makes for an image of this size: the first resize, the tile-multiple resize and
        a view."""
        resized = self.resized_size(height, width)
        sizes = [resized, (self.tile, self.tile)]
        return [*sizes, multiple_of_tile(*resized, self.tile)] if self.do_image_splitting else sizes

    # ---- pixels ------------------------------------------------------------------------------------------------
    def views(self, rgb: Any, resample: int) -> list[Any]:
        """PIL RGB image -> ``[tile_1_1, tile_1_2, ..., global]`` (or ``[global]``), every one ``tile x tile``."""
        from PIL import Image

        size = self.tile
        image = _resize(rgb, *self.resized_size(rgb.height, rgb.width), resample)
        if not self.do_image_splitting:
            return [_resize(image, size, size, resample)]
        image = _resize(image, *multiple_of_tile(image.height, image.width, size), resample)
        if image.height <= size and image.width <= size:
            return [image]
        pixels = np.asarray(image)
        tiles = [
            Image.fromarray(np.ascontiguousarray(pixels[top : top + size, left : left + size]))
            for top in range(0, image.height, size)
            for left in range(0, image.width, size)
        ]
        return [*tiles, _resize(image, size, size, resample)]

    # ---- features ----------------------------------------------------------------------------------------------
    def pack(self, features: np.ndarray, height: int, width: int) -> np.ndarray:
        """``[n_views, T, E]`` (tiles row by row, then the global view) -> ``[n_views * T, E]``."""
        rows, cols = self.grid(height, width)
        if features.shape[0] != rows * cols + 1 or features.shape[1] != self.image_seq_len:
            raise BundleError(
                f"the vision graph returned {features.shape[0]} views of {features.shape[1]} features; split tiling "
                f"expects {rows * cols + 1} of {self.image_seq_len}",
                where="preprocess.tiling_params",
                fix="re-export the bundle with `edgelvm export`",
            )
        return features.reshape(-1, features.shape[-1])


def _resize(image: Any, height: int, width: int, resample: int) -> Any:
    return image if (image.height, image.width) == (height, width) else image.resize((width, height), resample=resample)

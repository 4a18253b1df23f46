"""Native-resolution patching as plain data: Qwen2-VL's image rule (numpy + PIL, no torch).

An image keeps (about) its own size: it is resized to the nearest multiple of ``patch_size * merge_size`` pixels
per side within ``[min_pixels, max_pixels]`` (``smart_resize``), rescaled and normalized, repeated
``temporal_patch_size`` times along a time axis (a still image is a one-frame video), and cut into patches
flattened as ``[channel, time, patch_row, patch_col]`` vectors. The patches are ordered merge-block by merge-block
(the ``merge_size²`` neighbours that the vision tower's merger turns into one token are consecutive), and the
vision graph takes, besides them, each patch's (row, column) in the patch grid for its 2-D rotary embedding.

With ``window_size`` (Qwen2.5-VL) most vision blocks attend only within windows of that many pixels: the rule
also gives the block order window by window and each patch's window (:meth:`NativeResolutionRule.windows`).

With ``position_table_side`` (Qwen3-VL, Qwen3.5) the tower also adds a learned ``side x side`` position table,
resampled to the image's patch grid by bilinear interpolation (corners aligned): the rule gives each patch's four
table rows and their weights (:meth:`NativeResolutionRule.position_interpolation`), and the graph sums the rows.

The image's grid is ``(1, grid_h, grid_w)`` patches (``image_grid_thw``) and it occupies
``grid_h * grid_w / merge_size²`` tokens in the prompt. Every function mirrors transformers'
``Qwen2VLImageProcessorPil`` (``smart_resize``, ``patchify``) and ``vision_utils.get_vision_position_ids`` line for
line, including the rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelvm.errors import BundleError, EdgeLVMError


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(h, w)``: multiples of ``factor``, with ``min_pixels <= h * w <= max_pixels``, close to the aspect ratio."""
    if max(height, width) / min(height, width) > 200:
        raise EdgeLVMError(
            f"image aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200 ({width}x{height})",
            where="image",
            fix="crop the image to a less extreme aspect ratio",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class NativeResolutionRule:
    """The manifest's ``preprocess.tiling_params`` for ``tiling == "native"``."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    do_resize: bool = True
    #: Qwen2.5-VL's window attention: the window side in pixels (None: every block attends over the whole image)
    window_size: int | None = None
    #: Qwen3-VL's learned position table: its side (``sqrt(num_position_embeddings)``; None: no table)
    position_table_side: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> NativeResolutionRule:
        try:
            return cls(
                patch_size=int(params["patch_size"]),
                merge_size=int(params["merge_size"]),
                temporal_patch_size=int(params["temporal_patch_size"]),
                min_pixels=int(params["min_pixels"]),
                max_pixels=int(params["max_pixels"]),
                do_resize=bool(params.get("do_resize", True)),
                window_size=int(params["window_size"]) if params.get("window_size") else None,
                position_table_side=int(params["position_table_side"]) if params.get("position_table_side") else None,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"preprocess.tiling_params is incomplete for native-resolution patching ({err!r})",
                where="edgelvm.json",
                fix="re-export the bundle with `edgelvm export`",
            ) from None

    @classmethod
    def load(cls, params: dict[str, Any], bundle_dir: Any = None) -> NativeResolutionRule:
        """The ``TILING_RULES`` factory (the rule needs no bundle file)."""
        return cls.from_params(params)

    def to_params(self) -> dict[str, Any]:
        return {
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "do_resize": self.do_resize,
            **({"window_size": self.window_size} if self.window_size else {}),
            **({"position_table_side": self.position_table_side} if self.position_table_side else {}),
            "graph_inputs": ["pixel_values", *self._extra_inputs],  # informative: what the vision graph takes
        }

    @property
    def _extra_inputs(self) -> list[str]:
        return [
            "vision_position_ids",
            *(["window_index", "window_ids"] if self.window_size else []),
            *(["vision_pos_indices", "vision_pos_weights"] if self.position_table_side else []),
        ]

    # ---- sizes -------------------------------------------------------------------------------------------------
    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The size the image is resized to before patching."""
        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """``(t, grid_h, grid_w)`` in patches (transformers' ``image_grid_thw`` row) for an image of this size."""
        new_h, new_w = self.resized(height, width)
        return 1, new_h // self.patch_size, new_w // self.patch_size

    def token_count(self, height: int, width: int, tokens_per_view: int = 0) -> int:
        """Image tokens for an image of this size: one per ``merge_size x merge_size`` block of patches."""
        t, grid_h, grid_w = self.grid(height, width)
        return t * grid_h * grid_w // (self.merge_size**2)

    # ---- the preprocessor's tiling-rule interface (images/preprocess.TilingRule) ------------------------------
    def planned_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The one image :meth:`views` makes for an image of this size (``smart_resize``'s)."""
        return [self.resized(height, width)]

    def views(self, rgb: Any, resample: int) -> list[Any]:
        """One view: the image resized by :func:`smart_resize` (then rescaled / normalized by the preprocessor)."""
        new_h, new_w = self.resized(rgb.height, rgb.width)
        return [rgb if (new_h, new_w) == (rgb.height, rgb.width) else rgb.resize((new_w, new_h), resample=resample)]

    def flatten(self, views: list[np.ndarray]) -> np.ndarray:
        """The one view ``[C, H, W]`` -> the vision graph's ``pixel_values`` ``[N, C * T * P * P]``."""
        return self.patchify(views[0])

    def pack(self, features: np.ndarray, height: int, width: int) -> np.ndarray:
        """The vision graph's ``[tokens, E]`` are the prompt features as they are (the merger already ordered them)."""
        expected = self.token_count(height, width)
        if features.shape[0] != expected:
            raise BundleError(
                f"the vision graph returned {features.shape[0]} features; a {width}x{height} image has {expected}",
                where="preprocess.tiling_params",
                fix="re-export the bundle with `edgelvm export`",
            )
        return features.reshape(expected, features.shape[-1])

    # ---- pixels ------------------------------------------------------------------------------------------------
    def patchify(self, chw: np.ndarray) -> np.ndarray:
        """A resized, normalized ``[C, H, W]`` image -> ``[grid_h * grid_w, C * T * P * P]`` patches."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        channels, height, width = chw.shape
        grid_h, grid_w = height // p, width // p
        if grid_h % m or grid_w % m or height % p or width % p:
            raise BundleError(
                f"a {width}x{height} image is not a whole number of {m}x{m} blocks of {p}-px patches",
                where="preprocess.tiling_params",
                fix="re-export the bundle (do_resize must be on for images of arbitrary size)",
            )
        patches = np.asarray(chw, dtype=np.float32).reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * t * p * p))

    def position_ids(self, grid_h: int, grid_w: int) -> np.ndarray:
        """``[grid_h * grid_w, 2]`` int64: each patch's (row, column), in the patches' merge-block order."""
        m = self.merge_size
        rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        shape = (grid_h // m, m, grid_w // m, m)
        rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        return np.stack([rows, cols], axis=-1).astype(np.int64)

    def graph_inputs(self, height: int, width: int) -> dict[str, np.ndarray]:
        """The vision graph's inputs besides ``pixel_values`` for one image of this size."""
        return self.grid_inputs(*self.grid(height, width))

    def grid_inputs(self, t: int, grid_h: int, grid_w: int) -> dict[str, np.ndarray]:
        """The vision graph's inputs besides ``pixel_values`` for one image of ``(t, grid_h, grid_w)`` patches, in
        the graph's input order."""
        inputs = {"vision_position_ids": np.tile(self.position_ids(grid_h, grid_w), (t, 1))}
        if self.window_size:
            inputs["window_index"], inputs["window_ids"] = self.windows(t, grid_h, grid_w)
        if self.position_table_side:
            inputs["vision_pos_indices"], inputs["vision_pos_weights"] = self.position_interpolation(t, grid_h, grid_w)
        return inputs

    def position_interpolation(self, t: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
        """The learned position table resampled to the patch grid (Qwen3-VL; ``vision_utils.
        get_vision_interpolation_indices_and_weights`` with bilinear, corners aligned): ``indices [N, 4]`` int64
        rows of the flattened ``side x side`` table and ``weights [N, 4]`` float32, per patch in the patches' order.
        Computed in float32 in transformers' operation order, so the weights are bitwise equal."""
        side = self.position_table_side
        positions = np.tile(self.position_ids(grid_h, grid_w), (t, 1))

        def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
            src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
            floor = np.floor(src)
            offsets = np.arange(2)
            taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
            distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
            return taps, np.maximum(np.float32(1) - distance, np.float32(0))

        h_taps, h_weights = axis(positions[:, 0], grid_h)
        w_taps, w_weights = axis(positions[:, 1], grid_w)
        indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        return indices.astype(np.int64), weights.astype(np.float32)

    def windows(self, t: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
        """Window attention (Qwen2.5-VL, ``vision_utils.get_vision_window_index``): ``window_index [N / m²]`` —
        the merge blocks reordered window by window (windows of ``window_size`` pixels, row-major; blocks inside a
        window row-major) — and ``window_ids [N]``: the window of each patch in that order (patches attend within
        their window in the windowed blocks)."""
        m = self.merge_size
        side = self.window_size // m // self.patch_size  # merge blocks per window side
        llm_h, llm_w = grid_h // m, grid_w // m
        pad_h, pad_w = side - llm_h % side, side - llm_w % side
        rows, cols = (llm_h + pad_h) // side, (llm_w + pad_w) // side
        padded = np.full((t, llm_h + pad_h, llm_w + pad_w), -100, dtype=np.int64)
        padded[:, :llm_h, :llm_w] = np.arange(t * llm_h * llm_w).reshape(t, llm_h, llm_w)
        padded = padded.reshape(t, rows, side, cols, side).transpose(0, 1, 3, 2, 4).reshape(t * rows * cols, -1)
        counts = (padded != -100).sum(axis=1)
        window_index = padded[padded != -100]
        window_ids = np.repeat(np.arange(len(counts)), counts * m * m)
        return window_index.astype(np.int64), window_ids.astype(np.int64)

"""Turning what callers hold (a path, a PIL image, a camera frame) into an RGB image, with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np

from edgelvm.errors import ImageError

ImageInput = Union[str, Path, "Any", np.ndarray]  # Any: PIL.Image.Image (PIL is imported lazily)


def load_image(image: ImageInput) -> Any:
    """Return a PIL image for a path, PIL image, or ``HxWx3`` / ``HxW`` uint8 array (e.g. an RGB camera frame)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError("image file not found", where=path, fix="check the path")
        try:
            with Image.open(path) as handle:
                handle.load()  # decode now so truncation is caught here, not deep in preprocessing
                return handle.copy()
        except UnidentifiedImageError:
            raise ImageError(
                "not an image file PIL can read", where=path, fix="pass a PNG, JPEG, BMP, WebP, ... image"
            ) from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(
                f"image file is truncated or corrupt ({err})", where=path, fix="re-save or re-capture the image"
            ) from None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(
                f"array images must be uint8, got {image.dtype}",
                where="image",
                fix="convert with `frame.astype(np.uint8)` (values 0-255), or pass a PIL image",
            )
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise ImageError(f"empty image array of shape {image.shape}", where="image", fix="pass a real frame")
            return Image.fromarray(np.ascontiguousarray(image))
        raise ImageError(
            f"array images must be HxWx3 (RGB), HxWx4 or HxW, got shape {image.shape}",
            where="image",
            fix="pass an RGB frame; convert BGR camera frames with `frame[..., ::-1]`",
        )
    raise ImageError(
        f"unsupported image type {type(image).__name__}",
        where="image",
        fix="pass a file path, a PIL.Image.Image or an HxWx3 uint8 numpy array",
    )

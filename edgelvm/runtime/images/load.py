"""Turning what callers hold (a path, a PIL image, a camera frame) into an RGB image, with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np

from edgelvm.errors import ImageError

ImageInput = Union[str, Path, "Any", np.ndarray]  # Any: PIL.Image.Image (PIL is imported lazily)

#: The most elongated image accepted (longest edge / shortest edge): transformers' own cap (Qwen2-VL's
#: ``smart_resize``). A thinner image is a resize bomb — a 1x40000 strip resized to a 96-pixel shortest edge is
#: 96 x 3.84M pixels — and no camera produces one.
MAX_ASPECT_RATIO = 200


def check_image_size(width: int, height: int, where: str | Path = "image") -> None:
    """Refuse (:class:`ImageError`) an empty image or one more elongated than :data:`MAX_ASPECT_RATIO`; cheap, so
    it runs on the header's size before any pixel is decoded or resized."""
    if width < 1 or height < 1:
        raise ImageError(f"empty image ({width}x{height} pixels)", where=where, fix="pass a real image")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"image aspect ratio {max(width, height) / min(width, height):.0f}:1 ({width}x{height}) exceeds "
            f"{MAX_ASPECT_RATIO}:1",
            where=where,
            fix="crop the image to a less extreme aspect ratio",
        )


def load_image(image: ImageInput) -> Any:
    """Return a PIL image for a path, PIL image, or ``HxWx3`` / ``HxW`` uint8 array (e.g. an RGB camera frame)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError("image file not found", where=path, fix="check the path")
        try:
            with Image.open(path) as handle:
                check_image_size(*handle.size, where=path)  # from the header, before decoding
                handle.load()  # decode now so truncation is caught here, not deep in preprocessing
                return handle.copy()
        except Image.DecompressionBombError as err:  # PIL's guard: over Image.MAX_IMAGE_PIXELS (2 x 89.5M)
            raise ImageError(
                f"image has too many pixels to decode safely ({err})",
                where=path,
                fix="downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted",
            ) from None
        except UnidentifiedImageError:
            raise ImageError(
                "not an image file PIL can read", where=path, fix="pass a PNG, JPEG, BMP, WebP, ... image"
            ) from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(
                f"image file is truncated or corrupt ({err})", where=path, fix="re-save or re-capture the image"
            ) from None
    if isinstance(image, Image.Image):
        check_image_size(*image.size)
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
            check_image_size(image.shape[1], image.shape[0])
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

"""Image preprocessing in numpy/PIL, driven by the bundle's ``preprocess`` section.

It reproduces transformers' *PIL backend* image processors (``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``):
convert to RGB → PIL resize (same filter, same output-size rule) → center crop → rescale in float64 then float32 →
normalize. transformers' torchvision backend resizes slightly differently; the runtime matches the PIL one
(tested to ≤ 1e-5 against it).

With a tiling rule (``preprocess.tiling``, one module each) one image becomes several views, each of which goes
through the same per-view steps, and the number of image tokens depends on the image's size (modules of this
package): "anyres" / "anyres_max" (a base view + high-resolution tiles, unpadding, newline rows, a capped grid;
``tiling.py``), "dynamic_tiles" (aspect-ratio grid + thumbnail last; ``dynamic_tiles.py``), "split" (row × column
tiles + a global view, per-tile marker tokens; ``image_splitting.py``), "native" (the image at its own resolution as
flattened patches; ``native_resolution.py``), "lfm2_tiles" (LFM2-VL: tiles + a thumbnail, each view patched at its own
grid and padded to the longest; ``lfm2_tiles.py``). :meth:`ImagePreprocessor.prepare` returns the views with
their token count, and :meth:`ImagePreprocessor.pack` turns the vision graph's per-view features into the image's
token features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgelvm.errors import BundleError, EdgeLVMError, ImageError
from edgelvm.manifest import PreprocessSpec
from edgelvm.runtime.images.dynamic_tiles import DynamicTilesRule
from edgelvm.runtime.images.image_splitting import ImageSplittingRule
from edgelvm.runtime.images.lfm2_tiles import Lfm2TilesRule
from edgelvm.runtime.images.load import ImageInput, check_image_size, load_image
from edgelvm.runtime.images.native_resolution import NativeResolutionRule
from edgelvm.runtime.images.tiling import AnyresMaxRule, AnyresRule

#: The most pixels of any image preprocessing makes (a resize, a tiling canvas, a view), checked from the geometry
#: before the resize allocates it: 4096² RGB is 48 MiB as uint8 (384 MiB as the float64 of one view). Together with
#: ``images.MAX_ASPECT_RATIO`` this bounds the memory and time one image can cost, whatever its size.
MAX_RESIZED_PIXELS = 4096 * 4096

_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


class TilingRule(Protocol):
    """What a tiling rule (``preprocess.tiling``, parameters in ``tiling_params``) does for the preprocessor.

    Optional members, looked up by name (each family's rule adds only what it needs):

    - ``segment(height, width, image_token_id) -> list[int]``: the image's prompt tokens, where they are more than
      ``token_count`` image tokens (start/end markers, per-tile text tokens); the image token marks the positions
      its features fill, in order;
    - ``flatten(views) -> array``: the normalized views (a list of ``[3, H, W]``, sizes may differ) in the layout
      the vision graph takes (e.g. flattened patches, padded to the longest view);
    - ``graph_inputs(height, width) -> {name: array}``: the vision graph's inputs besides ``pixel_values`` for an
      image of this size (patch positions, window order); the image is then encoded in a call of its own;
    - ``grid(height, width)``: the image's feature grid, for position rules that need it (``positions.py``);
    - ``max_images_per_prompt``: more images in one prompt are refused (a rule that lays several out differently);
    - ``planned_sizes(height, width) -> list[(h, w)]``: the size of every image :meth:`views` allocates (resizes,
      canvases, views) for an image of this size, computed without pixels, so that the preprocessor refuses a
      geometry whose resizes would be too large before any is made."""

    def views(self, rgb: Any, resample: int) -> list[Any]:
        """PIL RGB image -> the PIL views the vision graph encodes (before the per-view resize / crop / normalize)."""

    def token_count(self, height: int, width: int, tokens_per_view: int) -> int:
        """How many image-feature positions an image of this size fills."""

    def pack(self, features: np.ndarray, height: int, width: int) -> np.ndarray:
        """The vision graph's ``[n_views, T, E]`` for one image -> its ``[tokens, E]`` prompt features."""


#: ``preprocess.tiling`` -> a factory ``(tiling_params, bundle_dir) -> TilingRule``. A new rule is a module of its
#: own under ``edgelvm/runtime/images/`` and one line here.
TILING_RULES: dict[str, Any] = {
    "anyres": AnyresRule.load,
    "anyres_max": AnyresMaxRule.load,
    "native": NativeResolutionRule.load,
    "dynamic_tiles": DynamicTilesRule.load,
    "split": ImageSplittingRule.load,
    "lfm2_tiles": Lfm2TilesRule.load,
}
#: Tiling rules this runtime implements (``preprocess.tiling``).
TILINGS = ("none", *TILING_RULES)
#: Where image tokens go in the prompt (``preprocess.image_placement``): at each placeholder of the rendered text, or
#: (one image) before the whole encoded prompt; "cross_attention": one image token at each placeholder, and the
#: features go to the decoder's cross-attention inputs instead of the embeddings (``cross_attention.py``).
PLACEMENTS = ("placeholder", "prefix", "cross_attention")


@dataclass
class PreparedImage:
    """One image ready for the vision graph: its views ``[n_views, 3, H, W]``, its original size and how many
    image tokens (placeholder positions) it occupies in the prompt."""

    pixels: np.ndarray
    height: int
    width: int
    tokens: int
    #: The vision graph's inputs besides ``pixel_values`` (a rule's ``graph_inputs``); with any, the image is
    #: encoded in a graph call of its own.
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


class ImagePreprocessor:
    """``images -> pixel_values`` for one bundle: ``[N, 3, H, W]`` float32, or with tiling ``[N, max_views, 3, H,
    W]`` zero-padded over the views (the HF processor's batch layout)."""

    def __init__(self, spec: PreprocessSpec, bundle_dir: str | Path | None = None) -> None:
        self.spec = spec
        self._filter = _FILTERS[spec.resample]
        self._mean = np.asarray(spec.mean, dtype=np.float64)[:, None, None] if spec.mean else None
        self._std = np.asarray(spec.std, dtype=np.float64)[:, None, None] if spec.std else None
        if spec.tiling not in TILINGS:
            raise BundleError(
                f"image tiling {spec.tiling!r} is not implemented by this edgelvm (it knows: {', '.join(TILINGS)})",
                where="edgelvm.json: preprocess.tiling",
                fix="upgrade edgelvm (`pip install -U edgelvm`)",
            )
        if spec.image_placement not in PLACEMENTS:
            raise BundleError(
                f"image placement {spec.image_placement!r} is not implemented by this edgelvm (it knows: "
                f"{', '.join(PLACEMENTS)})",
                where="edgelvm.json: preprocess.image_placement",
                fix="upgrade edgelvm (`pip install -U edgelvm`)",
            )
        factory = TILING_RULES.get(spec.tiling)
        self.tiling: TilingRule | None = factory(spec.tiling_params or {}, bundle_dir) if factory else None
        self.max_resized_pixels = MAX_RESIZED_PIXELS

    def __call__(self, images: list[ImageInput]) -> np.ndarray:
        if self.tiling is None:
            return np.stack([self.one(image) for image in images], axis=0)
        views = [self.views(image) for image in images]
        shape = np.max([v.shape for v in views], axis=0)  # views (and, LFM2-VL: patches) zero-padded to the largest
        batch = np.zeros((len(views), *shape), dtype=np.float32)
        for row, v in enumerate(views):
            batch[(row, *(slice(0, n) for n in v.shape))] = v
        return batch

    # ---- per image: views, token count, feature packing ----------------------------------------------------------
    @property
    def size_dependent(self) -> bool:
        """Whether an image's token count depends on its size (then the image must be opened to count)."""
        return self.tiling is not None

    def token_count(self, height: int, width: int) -> int:
        if self.tiling is None:
            return self.spec.tokens_per_image
        return self.tiling.token_count(height, width, self.spec.tokens_per_image)

    def image_segment(self, height: int, width: int) -> list[int]:
        """The prompt token ids one image of this size becomes: ``token_count`` image tokens, or what the tiling
        rule's ``segment`` says (image tokens between markers the rule adds)."""
        if self.spec.image_placement == "cross_attention":  # a marker only: the features are not spliced in
            return [self.spec.image_token_id]
        segment = getattr(self.tiling, "segment", None)
        if segment is not None:
            return list(segment(height, width, self.spec.image_token_id))
        return [self.spec.image_token_id] * self.token_count(height, width)

    # ---- image tokens in the prompt -------------------------------------------------------------------------------
    @property
    def images_in_text(self) -> bool:
        """Whether the rendered prompt carries one placeholder per image (else image items are not rendered)."""
        return self.spec.image_placement in ("placeholder", "cross_attention")

    def place_image_tokens(self, ids: list[int], segments: list[list[int]]) -> list[int]:
        """The encoded prompt with each image's token ids (:meth:`image_segment`) where the bundle's placement puts
        them: at its placeholder, or before the prompt."""
        spec = self.spec
        placeholders = sum(1 for i in ids if i == spec.image_token_id)
        most = getattr(self.tiling, "max_images_per_prompt", None)  # a rule that treats several images differently
        if most is not None and len(segments) > most:
            raise EdgeLVMError(
                f"{len(segments)} images were given in one prompt but this bundle's tiling takes at most {most}",
                where="images",
                fix="ask about one image at a time (a batch of requests may each have their own image)",
            )
        if spec.image_placement == "prefix":
            if len(segments) > 1:
                raise EdgeLVMError(
                    f"{len(segments)} images were given but this model takes one image per prompt",
                    where="images",
                    fix="ask about one image at a time (a batch of requests may each have their own image)",
                )
            if placeholders:
                raise EdgeLVMError(
                    f"the prompt contains the image token {spec.image_token!r}, but this model places the image "
                    "before the prompt, not at a placeholder",
                    where="prompt",
                    fix=f"remove {spec.image_token!r} from the prompt text",
                )
            return [token for segment in segments for token in segment] + list(ids)
        if placeholders != len(segments):
            raise EdgeLVMError(
                f"the prompt has {placeholders} image placeholder(s) but {len(segments)} image(s) were given",
                where="prompt",
                fix=f"give one image per {spec.image_token!r} placeholder (prompts built from a plain string get one "
                "placeholder per image automatically)",
            )
        expanded: list[int] = []
        image = 0
        for token in ids:
            if token == spec.image_token_id:
                expanded.extend(segments[image])
                image += 1
            else:
                expanded.append(token)
        return expanded

    # ---- geometry limits -------------------------------------------------------------------------------------------
    def planned_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(h, w)`` of every image preprocessing an image of this size makes (the tiling rule's resizes and views,
        then each view's resize), from the geometry alone."""
        if self.tiling is None:
            return [self.output_size(height, width)]
        plan = getattr(self.tiling, "planned_sizes", None)
        views = [(int(h), int(w)) for h, w in plan(height, width)] if plan is not None else []
        return views + [self.output_size(h, w) for h, w in views]

    def check_geometry(self, height: int, width: int) -> None:
        """Refuse (:class:`ImageError`) an image whose preprocessing would make an image over
        ``max_resized_pixels`` (or an empty or too elongated one) — before anything is resized or allocated."""
        check_image_size(width, height)
        for h, w in self.planned_sizes(height, width):
            self._check_resize(height, width, h, w)

    def _check_resize(self, height: int, width: int, new_h: int, new_w: int) -> None:
        if new_h < 1 or new_w < 1 or new_h * new_w > self.max_resized_pixels:
            raise ImageError(
                f"a {width}x{height} image would be resized to {new_w}x{new_h} pixels by this bundle's preprocessing "
                f"(the limit is {self.max_resized_pixels} pixels)",
                where="image",
                fix="crop the image to a less elongated shape or downscale it",
            )

    def views(self, image: ImageInput) -> np.ndarray:
        """``[n_views, 3, H, W]``: the vision graph's inputs for one image (one view unless the bundle tiles)."""
        if self.tiling is None:
            return self.one(image)[None]
        pil = self._rgb(image)
        views = [self._pipeline(view) for view in self.tiling.views(pil, self._filter)]
        flatten = getattr(self.tiling, "flatten", None)  # a rule whose graph takes another layout (patches)
        return flatten(views) if flatten is not None else np.stack(views)

    def prepare(self, image: ImageInput) -> PreparedImage:
        pil = load_image(image)
        self.check_geometry(pil.height, pil.width)
        graph_inputs = getattr(self.tiling, "graph_inputs", None)
        inputs = graph_inputs(pil.height, pil.width) if graph_inputs is not None else {}
        return PreparedImage(self.views(pil), pil.height, pil.width, self.token_count(pil.height, pil.width), inputs)

    def pack(self, features: np.ndarray, image: PreparedImage) -> np.ndarray:
        """The vision graph's ``[n_views, T, E]`` for one image -> its ``[tokens, E]`` prompt features."""
        if self.tiling is None:
            return features.reshape(-1, features.shape[-1])
        return self.tiling.pack(features, image.height, image.width)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        spec = self.spec
        if spec.resize_mode == "exact":
            return spec.size["height"], spec.size["width"]
        if spec.resize_mode == "shortest_edge":
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = spec.size["shortest_edge"], int(spec.size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return height, width

    def one(self, image: ImageInput) -> np.ndarray:
        """``[3, H, W]`` for one image, untiled."""
        return self._pipeline(self._rgb(image))

    def _rgb(self, image: ImageInput) -> Any:
        pil = load_image(image)
        self.check_geometry(pil.height, pil.width)
        return _to_rgb(pil) if self.spec.convert_rgb else pil

    def _pipeline(self, pil: Any) -> np.ndarray:
        """Resize -> center crop -> rescale -> normalize one (already RGB-converted) image or view."""
        height, width = pil.height, pil.width
        new_h, new_w = self.output_size(height, width)
        if (new_h, new_w) != (height, width):
            self._check_resize(height, width, new_h, new_w)  # the last line of defence: before the allocation
            pil = pil.resize((new_w, new_h), resample=self._filter)
        array = np.asarray(pil)
        if array.ndim == 2:
            array = array[:, :, None]
        chw = np.moveaxis(array, -1, 0)
        if self.spec.center_crop:
            chw = _center_crop(chw, self.spec.center_crop["height"], self.spec.center_crop["width"])
        out = chw.astype(np.float64)
        if self.spec.rescale_factor is not None:
            out = out * self.spec.rescale_factor
        out = out.astype(np.float32)
        if self._mean is not None:
            out = ((out - self._mean.astype(np.float32)) / self._std.astype(np.float32)).astype(np.float32)
        return out


def _to_rgb(pil: Any) -> Any:
    """Transparency is composited on white, as transformers' ``convert_to_rgb`` does."""
    from PIL import Image

    if "A" in pil.getbands() or pil.info.get("transparency") is not None:
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def _center_crop(chw: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    _, height, width = chw.shape
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return chw[:, top : top + crop_h, left : left + crop_w]
    # Smaller than the crop: pad with zeros around the centre (transformers' behaviour).
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((chw.shape[0], new_h, new_w), dtype=chw.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[:, top_pad : top_pad + height, left_pad : left_pad + width] = chw
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return padded[:, top : top + crop_h, left : left + crop_w]

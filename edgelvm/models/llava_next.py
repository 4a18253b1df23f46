"""LLaVA-NeXT (llava-hf ``llava_next``, ``LlavaNextForConditionalGeneration``): LLaVA with "anyres" tiling.

The towers, projector, language model and their layer structure are LLaVA's, so everything but the image rule is
inherited from :class:`~edgelvm.models.llava.LlavaAdapter` (prune, distill and the fused decoder included). What
differs is how an image becomes features: a base view plus the tiles of a high-resolution copy whose grid is chosen
from ``image_grid_pinpoints`` by the image's size; the tiles' feature maps are stitched, unpadded to the image's
aspect ratio, and closed row by row with the learned ``image_newline`` vector. The vision graph stays LLaVA's
(``[views, 3, H, W] -> [views, T, E]``); the tiling, unpadding and newline rows are plain data in the manifest
(``preprocess.tiling = "anyres"``) that the runtime applies in numpy (``edgelvm/runtime/images/tiling.py``), with
``image_newline.npy`` shipped in the bundle. Positions are plain 1-D.
"""

from __future__ import annotations

from typing import Any

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec
from edgelvm.models.llava import LlavaAdapter

NEWLINE_FILE = "image_newline.npy"


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)

    def _check_text_model(self) -> None:
        super()._check_text_model()
        self._tiling_geometry()  # fail at load, not after minutes of tracing

    def _tiling_geometry(self) -> tuple[int, tuple[int, int], int]:
        """(tile side, base-view size, feature-grid side), checked against what transformers' model assumes."""
        ip = self.processor.image_processor
        size = dict(ip.size or {})
        crop = dict(ip.crop_size or {}) if getattr(ip, "crop_size", None) else {}
        # LlavaNextImageProcessor: tiles are crop_size["height"] (else size) squares; the base view is size.
        tile = crop.get("height") or size.get("height") or size.get("shortest_edge")
        if size.get("height") and size.get("width"):
            base = (int(size["height"]), int(size["width"]))
        else:
            base = (int(size["shortest_edge"]), int(size["shortest_edge"]))
        vc = self.vision_config()
        where = self.source or None
        if tile != vc.image_size:
            raise UnsupportedModelError(
                f"the image processor cuts {tile}-px tiles but the vision tower takes {vc.image_size}-px images",
                where=where,
                fix="use a checkpoint whose processor crop_size equals vision_config.image_size",
            )
        pinpoints = [list(p) for p in self.config.image_grid_pinpoints]
        if [list(p) for p in ip.image_grid_pinpoints] != pinpoints:
            raise UnsupportedModelError(
                "the processor's image_grid_pinpoints differ from the model config's (transformers counts tokens with "
                "one and lays features out with the other)",
                where=where,
                fix="make preprocessor_config.json's image_grid_pinpoints equal config.json's",
            )
        if any(h % tile or w % tile for h, w in pinpoints):
            raise UnsupportedModelError(
                f"grid pinpoints {pinpoints} are not multiples of the {tile}-px tile",
                where=where,
                fix="use pinpoints that are whole numbers of tiles",
            )
        if vc.model_type.startswith("clip") and self.config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                "a CLIP tower with vision_feature_select_strategy 'full' keeps the CLS token, so the tile features "
                "do not form a grid (transformers cannot run it either)",
                where=where,
                fix="use vision_feature_select_strategy 'default'",
            )
        return int(tile), base, vc.image_size // vc.patch_size

    def preprocess_spec(self) -> PreprocessSpec:
        from edgelvm.runtime.images.tiling import AnyresRule  # plain numpy: the runtime's own description of the rule

        spec = super().preprocess_spec()  # each view: resize → crop → rescale → normalize, like LLaVA's image
        tile, base, side = self._tiling_geometry()
        rule = AnyresRule(
            grid_pinpoints=[[int(h), int(w)] for h, w in self.config.image_grid_pinpoints],
            tile_size=tile,
            base_size=base,
            feature_grid=(side, side),
            newline=NEWLINE_FILE,
        )
        spec.tiling = "anyres"
        spec.tiling_params = rule.to_params()
        return spec

    def bundle_arrays(self) -> dict[str, Any]:
        return {NEWLINE_FILE: self.model.model.image_newline.detach().float().numpy()}

    def tokens_per_image(self) -> int:
        """Tokens of one view (the base view or one tile); a whole image has more, depending on its size."""
        return super().tokens_per_image()

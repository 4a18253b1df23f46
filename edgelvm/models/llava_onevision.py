"""LLaVA-OneVision (llava-hf ``llava_onevision``, ``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres
tiling with a cap on the packed grid, usually a SigLIP tower (all features of its last layer) and a Qwen2 LLM.

Towers, projector (``linear_1 → act → linear_2``), language model, ``image_newline`` and their layer structure are
LLaVA-NeXT's, so everything but the image rule is inherited from
:class:`~edgelvm.models.llava_next.LlavaNextAdapter` (prune, quantize and the fused decoder included). The image
rule differs in one step: ``vision_aspect_ratio = "anyres_max_N"`` — after the tiles' feature grid is unpadded, a grid
of more than about ``N`` tiles' worth of features is bilinearly downscaled (``pack_image_features``), and the
processor counts tokens to match. The manifest says ``preprocess.tiling = "anyres_max"`` with ``max_num_patches``
in ``tiling_params`` (:class:`~edgelvm.runtime.images.tiling.AnyresMaxRule`); the views (base view = the whole
image resized to the tile size, then the tiles of the padded best-resolution copy) are LLaVA-NeXT's.

Scope: one image per prompt (a batch of requests may each have one). For a prompt of several images transformers
switches to its multi-image layout (each image padded to a square with the mean colour, one untiled view, one
newline) — ``apply_chat_template`` does, and so does the processor given a nested list (``images=[[a, b]]``), while
a flat list tiles every image. The runtime does not reproduce that layout, so the bundle's rule refuses a second
image in a prompt (``tiling_params.max_images_per_prompt = 1``). Videos are not supported.

``LlavaOnevisionProcessor`` holds a video processor, which transformers only builds with torchvision. Where
``AutoProcessor`` fails for that reason, :meth:`LlavaOnevisionAdapter.load_processor` loads the processor without
one (:func:`edgelvm.models.processors.load_processor_without_video`: the checkpoint's image processor with its PIL
backend, tokenizer, processor fields and chat template); the image and text paths are transformers' own.
"""

from __future__ import annotations

from typing import Any

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec
from edgelvm.models.llava_next import NEWLINE_FILE, LlavaNextAdapter
from edgelvm.models.processors import load_processor_without_video


def max_num_patches(vision_aspect_ratio: Any, *, where: Any = None) -> int:
    """``N`` of ``"anyres_max_N"``; other values (transformers accepts no other either) are unsupported."""
    text = str(vision_aspect_ratio)
    prefix = "anyres_max_"
    if not text.startswith(prefix) or not text[len(prefix) :].isdigit() or int(text[len(prefix) :]) < 1:
        raise UnsupportedModelError(
            f"vision_aspect_ratio {vision_aspect_ratio!r} is not of the form 'anyres_max_N'",
            where=where,
            fix="use a checkpoint with vision_aspect_ratio 'anyres_max_N' (N >= 1), e.g. 'anyres_max_9'",
        )
    return int(text[len(prefix) :])


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)

    @classmethod
    def load_processor(cls, source: str) -> Any:
        from transformers import LlavaOnevisionProcessor

        return load_processor_without_video(source, LlavaOnevisionProcessor)

    def _check_text_model(self) -> None:
        super()._check_text_model()  # LLaVA's checks and the anyres geometry (tile, pinpoints)
        where = self.source or None
        cap = max_num_patches(self.config.vision_aspect_ratio, where=where)
        processor_ratio = getattr(self.processor, "vision_aspect_ratio", None)
        if processor_ratio is not None and max_num_patches(processor_ratio, where=where) != cap:
            raise UnsupportedModelError(
                f"the processor's vision_aspect_ratio {processor_ratio!r} differs from the model config's "
                f"{self.config.vision_aspect_ratio!r} (transformers counts tokens with one and packs features with "
                "the other)",
                where=where,
                fix="make processor_config.json's vision_aspect_ratio equal config.json's",
            )
        _, _, side = self._tiling_geometry()
        per_view = self.tokens_per_image()
        counted = getattr(self.processor, "num_image_tokens", None)
        strategy_drop = 1 if getattr(self.processor, "vision_feature_select_strategy", None) == "default" else 0
        if counted is None or int(counted**0.5) != side or counted - strategy_drop != per_view:
            raise UnsupportedModelError(
                f"the processor's num_image_tokens {counted} does not match the tower ({side}x{side} features, "
                f"{per_view} per view)",
                where=where,
                fix="set num_image_tokens in processor_config.json to the tower's features per view",
            )

    def preprocess_spec(self) -> PreprocessSpec:
        from edgelvm.runtime.images.tiling import AnyresMaxRule  # plain numpy: the runtime's description of the rule

        spec = super().preprocess_spec()  # LLaVA-NeXT's views and per-view steps
        tile, base, side = self._tiling_geometry()
        rule = AnyresMaxRule(
            grid_pinpoints=[[int(h), int(w)] for h, w in self.config.image_grid_pinpoints],
            tile_size=tile,
            base_size=base,
            feature_grid=(side, side),
            newline=NEWLINE_FILE,
            max_num_patches=max_num_patches(self.config.vision_aspect_ratio),
            max_images_per_prompt=1,  # several images in one prompt: transformers' multi-image layout (see above)
        )
        spec.tiling = "anyres_max"
        spec.tiling_params = rule.to_params()
        return spec

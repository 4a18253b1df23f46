"""LLaVA-OneVision (llava-hf ``llava_onevision``, ``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres
tiling with a cap on the packed grid, usually a SigLIP tower (all features of its last layer) and a Qwen2 LLM.

Towers, projector (``linear_1 → act → linear_2``), language model, ``image_newline`` and their layer structure are
LLaVA-NeXT's, so everything but the image rule is inherited from
:class:`~edgelvm.models.llava_next.LlavaNextAdapter` (prune, quantize and the fused decoder included). The image
rule differs in one step: ``vision_aspect_ratio = "anyres_max_N"`` — after the tiles' feature grid is unpadded, a grid
of more than about ``N`` tiles' worth of features is bilinearly downscaled (``pack_image_features``), and the
processor counts tokens to match. The manifest says ``preprocess.tiling = "anyres_max"`` with ``max_num_patches``
in ``tiling_params`` (:class:`~edgelvm.runtime.tiling.AnyresMaxRule`); the views (base view = the whole image resized
to the tile size, then the tiles of the padded best-resolution copy) are LLaVA-NeXT's.

Scope: one image per prompt (a batch of requests may each have one). For a prompt of several images transformers
switches to its multi-image layout (each image padded to a square with the mean colour, one untiled view, one
newline) — ``apply_chat_template`` does, and so does the processor given a nested list (``images=[[a, b]]``), while
a flat list tiles every image. The runtime does not reproduce that layout, so the bundle's rule refuses a second
image in a prompt (``tiling_params.max_images_per_prompt = 1``). Videos are not supported.

``LlavaOnevisionProcessor`` holds a video processor, which transformers only builds with torchvision. Where
``AutoProcessor`` fails for that reason, :meth:`LlavaOnevisionAdapter.load_processor` builds the processor from the
checkpoint's image processor (PIL backend) and tokenizer without one; the image and text paths are transformers'
own (:func:`image_only_processor`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec
from edgelvm.models.llava_next import NEWLINE_FILE, LlavaNextAdapter

log = logging.getLogger(__name__)

#: processor_config.json fields that LlavaOnevisionProcessor takes besides its sub-processors.
_PROCESSOR_FIELDS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token",
                     "video_token")  # fmt: skip


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


@functools.cache
def _image_only_processor_class() -> type:
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
        """``LlavaOnevisionProcessor`` without its video processor (transformers builds none without torchvision).

        Only the constructor's class check and ``save_pretrained`` differ; image and text processing are
        transformers' own. It saves the llava-hf checkpoint layout (``preprocessor_config.json``, tokenizer files,
        ``processor_config.json`` with the processor's fields, ``chat_template.jinja``), which
        ``AutoProcessor`` loads where torchvision is installed."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory: Any, **kwargs: Any) -> list[str]:
            out = Path(save_directory)
            out.mkdir(parents=True, exist_ok=True)
            self.image_processor.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            fields = {name: getattr(self, name) for name in _PROCESSOR_FIELDS}
            config = {"processor_class": "LlavaOnevisionProcessor", **fields}
            (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if self.chat_template:
                (out / "chat_template.jinja").write_text(self.chat_template)
            return [str(out)]

    return LlavaOnevisionImageOnlyProcessor


def image_only_processor(image_processor: Any, tokenizer: Any, **fields: Any) -> Any:
    """A ``LlavaOnevisionProcessor`` from its image processor and tokenizer, without a video processor."""
    return _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                         **fields)  # fmt: skip


def load_image_only_processor(source: str | Path) -> Any:
    """The processor of a local checkpoint built from its image processor (PIL backend), tokenizer, processor fields
    and chat template, without the video processor."""
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil

    path = Path(source)
    config_file = path / "processor_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    fields = {name: config[name] for name in _PROCESSOR_FIELDS if config.get(name) is not None}
    template = config.get("chat_template")
    for name in ("chat_template.jinja", "chat_template.json"):
        file = path / name
        if template is None and file.is_file():
            text = file.read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = template or getattr(tokenizer, "chat_template", None)
    image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path)
    return image_only_processor(image_processor, tokenizer, chat_template=template, **fields)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """``AutoProcessor`` (a checkpoint's normal path); where it fails because torchvision is missing (the video
        processor needs it), the processor without its video part (:func:`load_image_only_processor`)."""
        try:
            return super().load_processor(source)
        except ImportError as err:
            if importlib.util.find_spec("torchvision") is not None or not Path(source).is_dir():
                raise
            log.info("AutoProcessor failed without torchvision (%s); building the image-only processor", err)
            return load_image_only_processor(source)

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
        from edgelvm.runtime.tiling import AnyresMaxRule  # plain numpy: the runtime's own description of the rule

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

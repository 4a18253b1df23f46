"""Loading a family's processor where its video part cannot be built (no torchvision).

Qwen2-VL, LLaVA-OneVision, InternVL and SmolVLM processors hold a video processor, which transformers builds only
with torchvision. edgelvm never uses it, and the image processor has a PIL backend, so without torchvision the
adapters load the same processor class minus its video part: the image processor, tokenizer, processor fields
(``processor_config.json``) and chat template come from the checkpoint's files exactly as ``AutoProcessor`` reads
them, and the class keeps the full processor's name, so what it saves loads as the full processor where
torchvision is installed. A real checkpoint on a machine with torchvision takes the normal ``AutoProcessor`` path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


def load_processor_without_video(source: str, full_class: type) -> Any:
    """``AutoProcessor.from_pretrained(source)``; where that fails (or quietly returns a bare tokenizer) and
    torchvision is missing, ``full_class`` without its video processor (:func:`image_only_class`)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        processor = AutoProcessor.from_pretrained(source)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
        reason = f"AutoProcessor returned a {type(processor).__name__}"
    except Exception as err:  # ImportError / ValueError from the video processor's torchvision requirement
        if is_torchvision_available():
            raise
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    log.info("loading %s without its video processor (%s)", full_class.__name__, reason)
    return image_only_class(full_class).from_pretrained(source)


@functools.cache
def image_only_class(full_class: type) -> type:
    """``full_class`` (a transformers processor) with only its image processor and tokenizer, built as the full
    class is (``image_processor=``, ``tokenizer=``, its processor fields, ``chat_template=``) with
    ``video_processor`` defaulting to ``None`` (some take it as a required argument)."""
    from transformers.processing_utils import ProcessorMixin

    attributes = [name for name in full_class.get_attributes() if name != "video_processor"]
    code = full_class.__init__.__code__
    init_names = [name for name in code.co_varnames[1 : code.co_argcount] if name != "video_processor"]

    class ImageOnlyProcessor(full_class):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return list(attributes)

        # transformers saves (to_dict: the __init__ signature) and loads (from_args_and_dict: validate_init_kwargs
        # with the __init__ code's argument names) the processor fields that __init__ names: the full class's.
        @functools.wraps(full_class.__init__)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("video_processor", None)
            super().__init__(*args, **kwargs)

        @staticmethod
        def validate_init_kwargs(processor_config: Any, valid_kwargs: Any) -> Any:
            return ProcessorMixin.validate_init_kwargs(processor_config, init_names)

        def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
            saved = super().save_pretrained(save_directory, *args, **kwargs)
            # The image processor's own file too (preprocessor_config.json): these files hold no video processor
            # config, and the full class (where torchvision is installed) then builds its video processor from that
            # file, as it does for checkpoints that ship none.
            self.image_processor.save_pretrained(save_directory)
            return saved

        def apply_chat_template(self, conversation: Any, chat_template: Any = None, **kwargs: Any) -> Any:
            # Some families' own version reads video defaults (frames, fps) from the video processor.
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = full_class.__name__  # saved as processor_class
    return ImageOnlyProcessor

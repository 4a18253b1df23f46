"""The image rules of the runtime, one module each, all driven by the manifest (plain numpy + PIL):

- ``load``: what callers hold (path, PIL image, camera frame) → an RGB image, with size limits;
- ``preprocess``: resize / crop / normalize and the tiling-rule table (``tiling``: anyres / anyres_max,
  ``dynamic_tiles``, ``image_splitting``, ``native_resolution``), image tokens placed in the prompt;
- ``encoder``: the feature cache (``cache``) and a text-conditioned vision graph's tokenizer (``vision_text``);
- ``positions`` (M-RoPE), ``cross_attention``, ``deepstack`` and ``image_blocks`` (Gemma 3's bidirectional image
  tokens): rules that give the decoder per-step inputs derived from the images (:func:`step_input_rules`).

A family whose images need a new rule adds a module here and a line in a table; the generation loop does not change.
"""

from __future__ import annotations

from typing import Any

from edgelvm.manifest import Manifest
from edgelvm.runtime.images.cross_attention import cross_attention_inputs
from edgelvm.runtime.images.deepstack import deepstack_rule
from edgelvm.runtime.images.encoder import ImageEncoder
from edgelvm.runtime.images.image_blocks import image_block_rule
from edgelvm.runtime.images.load import ImageInput, check_image_size, load_image
from edgelvm.runtime.images.positions import positions_rule
from edgelvm.runtime.images.preprocess import ImagePreprocessor

__all__ = ["ImageEncoder", "ImageInput", "ImagePreprocessor", "check_image_size", "load_image", "step_input_rules"]


def step_input_rules(manifest: Manifest, preprocessor: ImagePreprocessor) -> dict[str, Any]:
    """The bundle's rules for per-step decoder inputs by kind, each with ``inputs(prompts, images, features, dtype)``
    returning a :class:`~edgelvm.runtime.generate.StepInputs`; empty for 1-D positions with spliced features."""
    rules = {
        "positions": positions_rule(manifest.positions, getattr(preprocessor.tiling, "grid", None)),
        "cross_attention": cross_attention_inputs(manifest.preprocess),
        "deepstack": deepstack_rule(manifest.preprocess),
        "image_blocks": image_block_rule(manifest),
    }
    return {kind: rule for kind, rule in rules.items() if rule is not None}

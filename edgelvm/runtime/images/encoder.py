"""Images → the prompt's image tokens and the vision graph's features, as the bundle's ``preprocess`` section says.

One object per bundle holds the preprocessor (tiling rule), the image-feature cache and, for text-conditioned
vision graphs (``preprocess.vision_text``, InstructBLIP's Q-Former), the vision graph's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import ConfigError
from edgelvm.manifest import Manifest
from edgelvm.runtime.images.cache import VisionCache, pixel_key
from edgelvm.runtime.images.load import ImageInput, load_image
from edgelvm.runtime.images.preprocess import ImagePreprocessor, PreparedImage
from edgelvm.runtime.images.vision_text import VisionTextTokenizer


class ImageEncoder:
    """Counts, places and encodes one bundle's images (through a feature cache of ``cache_bytes``)."""

    def __init__(self, manifest: Manifest, bundle_dir: Path, cache_bytes: int) -> None:
        self.spec = manifest.preprocess
        self.preprocessor = ImagePreprocessor(manifest.preprocess, bundle_dir)
        vision_text = manifest.preprocess.vision_text
        #: the vision graph's text input (``preprocess.vision_text``: InstructBLIP's Q-Former reads the prompt)
        self.vision_text = VisionTextTokenizer(vision_text, bundle_dir) if vision_text else None
        self.cache = VisionCache(cache_bytes)

    @property
    def reads_text(self) -> bool:
        """Whether an image's features depend on its request's prompt (then they change every chat turn)."""
        return self.vision_text is not None

    # ---- prompt tokens ---------------------------------------------------------------------------------------------
    def token_counts(self, images: list[ImageInput]) -> list[int]:
        """How many image-feature positions each image fills in the prompt (with tiling it depends on the image's
        size; with cross-attention, none: the features go to the decoder's cross-attention inputs)."""
        if self.spec.image_placement == "cross_attention":
            return [0] * len(images)
        sizes = self.checked_sizes(images)
        if not self.preprocessor.size_dependent:
            return [self.spec.tokens_per_image] * len(images)
        return [self.preprocessor.token_count(h, w) for h, w in sizes]

    def place(self, ids: list[int], images: list[ImageInput]) -> list[int]:
        """The encoded prompt with each image's token ids where the bundle puts them (at placeholders, or before)."""
        segments = [self.preprocessor.image_segment(h, w) for h, w in self.checked_sizes(images)]
        return self.preprocessor.place_image_tokens(ids, segments)

    def checked_sizes(self, images: list[ImageInput]) -> list[tuple[int, int]]:
        """Each image's ``(height, width)``, refusing (:class:`ImageError`) a geometry whose preprocessing would be
        too large — when the request is built, before anything is resized."""
        sizes = [(pil.height, pil.width) for pil in map(load_image, images)]
        for height, width in sizes:
            self.preprocessor.check_geometry(height, width)
        return sizes

    # ---- features --------------------------------------------------------------------------------------------------
    def features(self, backend: Any, images: list[ImageInput], texts: list[str] | None, stats: Any) -> list[np.ndarray]:
        """Per image ``[tokens, hidden]``: cached features where the pixels were seen before, one encoder run over
        the views of the rest (duplicates within the call are encoded once).

        ``texts``: with a text-conditioned vision graph, each image's prompt; the features then depend on both, and
        so does the cache key. ``stats`` (:class:`~edgelvm.runtime.vlm.GenerationStats`) counts hits and runs."""
        if not images:
            return []
        prepared = [self.preprocessor.prepare(image) for image in images]
        keys = [self._key(p) for p in prepared]
        text_ids: dict[str, list[int]] = {}
        if self.vision_text is not None:
            if texts is None or len(texts) != len(images):
                raise ConfigError(
                    "this bundle's vision encoder reads the prompt: pass one text per image",
                    where="_image_features(texts=...)",
                    fix="call it through generate() / generate_batch() / chat()",
                )
            encoded_texts = [self.vision_text.encode(t) for t in texts]
            keys = [f"{k}-t{pixel_key(np.asarray(ids, dtype=np.int64))}" for k, ids in zip(keys, encoded_texts)]
            text_ids = dict(zip(keys, encoded_texts))
        found = {k: f for k in dict.fromkeys(keys) if (f := self.cache.get(k)) is not None}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        stats.image_cache_hits += len(found)
        if missing:
            chosen = [prepared[keys.index(k)] for k in missing]
            if any(p.inputs for p in chosen):  # graphs with per-image inputs (native resolution): one call each
                outputs = [backend.encode_images(p.pixels, p.inputs) for p in chosen]
            else:
                extra = self.vision_text.batch([text_ids[k] for k in missing]) if text_ids else {}
                encoded = backend.encode_images(np.concatenate([p.pixels for p in chosen]), extra)
                outputs = np.split(encoded, np.cumsum([len(p.pixels) for p in chosen])[:-1])
            for key, image, views in zip(missing, chosen, outputs):
                found[key] = self.preprocessor.pack(views, image)
                self.cache.put(key, found[key])
            stats.images_encoded += len(missing)
        return [found[k] for k in keys]

    def _key(self, image: PreparedImage) -> str:
        key = pixel_key(image.pixels)
        # Tiled features are unpadded by the original size, which the views alone do not determine.
        return f"{key}-{image.height}x{image.width}" if self.preprocessor.size_dependent else key

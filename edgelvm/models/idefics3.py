"""Idefics3 (``idefics3``, ``Idefics3ForConditionalGeneration``) and SmolVLM (``smolvlm``,
``SmolVLMForConditionalGeneration``): a SigLIP-style vision tower, a pixel-shuffle connector with a linear
projection, and a Llama text model — one architecture under two names.

Images are split (``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil``): resized so the longest edge is
``size["longest_edge"]``, then to multiples of the tile (``max_image_size["longest_edge"]``, the tower's
``image_size``), cut into a row-major grid of tiles, plus a global view of the whole image at tile size. The vision
graph is ``[views, 3, tile, tile] -> [views, image_seq_len, text hidden]`` (tower, post-layernorm, pixel shuffle,
projection: ``get_image_features`` for full tiles, whose ``pixel_attention_mask`` is all ones). The splitting, the
per-image prompt (``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>``, newlines and the image tokens)
and their token ids are plain data in the manifest (``preprocess.tiling = "split"``,
:class:`~edgelvm.runtime.images.image_splitting.ImageSplittingRule`). Positions are plain 1-D.

``SmolVLMProcessor`` holds a video processor, which transformers only builds with torchvision. Where
``AutoProcessor`` fails for that reason, :meth:`Idefics3Adapter.load_processor` loads the processor without one
(:func:`edgelvm.models.processors.load_processor_without_video`; image and text paths are transformers' own).
"""

from __future__ import annotations

from typing import Any

from edgelvm.errors import ExportError, UnsupportedModelError
from edgelvm.manifest import PreprocessSpec
from edgelvm.models.base import _RESAMPLE_NAMES
from edgelvm.models.llava import LlavaAdapter
from edgelvm.models.processors import load_processor_without_video

_FAKE, _GLOBAL, _IMAGE = "<fake_token_around_image>", "<global-img>", "<image>"


class _Idefics3VisionEncoder:
    @staticmethod
    def build(model: Any) -> Any:
        import torch

        class Idefics3VisionEncoder(torch.nn.Module):
            """pixel_values ``[N, 3, tile, tile]`` -> ``[N, image_seq_len, text hidden]``: ``get_image_features``
            for full tiles (all-ones patch mask, transformers' default) with the batch kept as a tensor dimension."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.vision_model = inner.vision_model
                self.connector = inner.connector

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                hidden = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
                return self.connector(hidden)

        return Idefics3VisionEncoder(model.model).eval()


class Idefics3Adapter(LlavaAdapter):
    """Idefics3 and SmolVLM. The layer structure (SigLIP-style q/k/v/out_proj + fc1/fc2 vision blocks, Llama text
    blocks) has LLaVA's names, so attention / MLP blocks, scale groups and the fused decoder are inherited."""

    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    supported_text_models = ("llama",)

    @classmethod
    def load_processor(cls, source: str) -> Any:
        from transformers import SmolVLMProcessor

        return load_processor_without_video(source, SmolVLMProcessor)  # Idefics3Processor has no video part

    def _check_text_model(self) -> None:
        super()._check_text_model()  # text model kind, image token id
        self._geometry()  # fail at load, not after minutes of tracing

    def _geometry(self) -> tuple[int, int]:
        """(tile, image_seq_len), checked against the tower and the connector."""
        ip = self.processor.image_processor
        vc = self.vision_config()
        where = self.source or None
        tile = int(dict(ip.max_image_size)["longest_edge"])
        if tile != vc.image_size:
            raise UnsupportedModelError(
                f"the image processor cuts {tile}-px tiles but the vision tower takes {vc.image_size}-px images",
                where=where,
                fix="use a checkpoint whose max_image_size['longest_edge'] equals vision_config.image_size",
            )
        scale = int(self.config.scale_factor)
        side = vc.image_size // vc.patch_size
        if side % scale:
            raise UnsupportedModelError(
                f"the pixel shuffle's scale factor {scale} does not divide the {side}x{side} patch grid",
                where=where,
                fix="use a checkpoint whose scale_factor divides image_size / patch_size",
            )
        seq = side * side // (scale * scale)
        if int(self.processor.image_seq_len) != seq:
            raise UnsupportedModelError(
                f"the processor puts {self.processor.image_seq_len} image tokens per view but the connector yields "
                f"{seq}",
                where=where,
                fix="set image_seq_len in processor_config.json to (image_size / patch_size)^2 / scale_factor^2",
            )
        size = dict(ip.size or {})
        if getattr(ip, "do_resize", True) and not size.get("longest_edge"):
            raise UnsupportedModelError(
                f"image processor size {size} has no longest_edge (the only resize rule of this family's processor "
                "edgelvm reproduces)",
                where=where,
                fix="use size={'longest_edge': n}",
            )
        return tile, seq

    # ---- structure ----------------------------------------------------------------------------------------------
    def vision_encoder(self) -> Any:
        return _Idefics3VisionEncoder.build(self.model)

    def config_parameter_counts(self) -> Any:
        """The SigLIP-style tower + the pixel-shuffle connector (one bias-free linear from ``hidden × scale²``) and
        the decoder, from the config."""
        from edgelvm.models.param_counts import ParameterCounts, decoder_params, idefics3_vision_params, linear

        cfg, tc = self.config, self.text_config
        connector = linear(cfg.vision_config.hidden_size * cfg.scale_factor**2, tc.hidden_size, bias=False)
        return ParameterCounts(
            vision=idefics3_vision_params(cfg.vision_config) + connector,
            decoder=decoder_params(tc, where=self.source or None),
        )

    def language_model(self) -> Any:
        return self.model.model.text_model

    def input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()

    def layer_stacks(self) -> dict[str, Any]:
        return {"vision": self.model.model.vision_model.encoder.layers, "text": self.language_model().layers}

    def image_feature_module(self) -> Any:
        return self.model.model.connector

    def tokens_per_image(self) -> int:
        """Tokens of one view (a tile or the global view); a whole image has ``views x`` this many."""
        vc = self.vision_config()
        scale = int(self.config.scale_factor)
        return (vc.image_size // vc.patch_size) ** 2 // (scale * scale)

    # ---- prompt and preprocessing as data ----------------------------------------------------------------------
    def image_token(self) -> tuple[str, int]:
        token = getattr(self.processor, "image_token", None) or _IMAGE
        return token, int(self.processor.tokenizer.convert_tokens_to_ids(token))

    def _between(self, before: str, text: str, after: str) -> list[int]:
        """The ids ``text`` encodes to between the special tokens ``before`` and ``after`` (as the processor's
        tokenizer sees it in the expanded prompt)."""
        tokenizer = self.processor.tokenizer
        head = tokenizer(before, add_special_tokens=False)["input_ids"]
        tail = tokenizer(after, add_special_tokens=False)["input_ids"]
        ids = tokenizer(before + text + after, add_special_tokens=False)["input_ids"]
        if ids[: len(head)] != head or ids[len(ids) - len(tail) :] != tail or len(ids) <= len(head) + len(tail):
            raise ExportError(
                f"the tokenizer does not keep {before!r} and {after!r} apart from {text!r}",
                where=self.source or None,
                fix="the image markers must be special tokens of the tokenizer",
            )
        return [int(i) for i in ids[len(head) : len(ids) - len(tail)]]

    def preprocess_spec(self) -> PreprocessSpec:
        from edgelvm.runtime.images.image_splitting import ImageSplittingRule  # plain numpy: the runtime's description

        ip = self.processor.image_processor
        tile, seq = self._geometry()
        token, token_id = self.image_token()
        fake = getattr(self.processor, "fake_image_token", None) or _FAKE
        names = ("global_image_token", "global_image_tag")  # SmolVLMProcessor's, Idefics3Processor's
        glob = next((getattr(self.processor, n) for n in names if getattr(self.processor, n, None)), _GLOBAL)
        tokenizer = self.processor.tokenizer
        fake_ids = tokenizer(fake, add_special_tokens=False)["input_ids"]
        longest = int(dict(ip.size)["longest_edge"]) if getattr(ip, "do_resize", True) else None
        probe = ImageSplittingRule(tile, longest, bool(ip.do_image_splitting), seq, [], [], [], [], [])
        grid = probe.max_grid if probe.do_image_splitting else 0
        row_col = []
        for r in range(1, grid + 1):
            row = []
            for c in range(1, grid + 1):
                marker = f"<row_{r}_col_{c}>"
                ids = self._between(fake, marker, token)
                if len(ids) != 1:
                    if longest is None:  # no resize: grids are bounded by the markers the tokenizer has
                        break
                    raise UnsupportedModelError(
                        f"{marker} is not one token of the tokenizer, but images can split into {grid}x{grid} tiles",
                        where=self.source or None,
                        fix="use a checkpoint whose tokenizer has every <row_i_col_j> marker",
                    )
                row.append(ids)
            if not row:
                break
            row_col.append(row)
        rule = ImageSplittingRule(
            tile=tile,
            resize_longest_edge=longest,
            do_image_splitting=bool(ip.do_image_splitting),
            image_seq_len=seq,
            fake_token_ids=[int(i) for i in fake_ids],
            global_token_ids=self._between(fake, glob, token),
            row_col_token_ids=row_col,
            row_end_ids=self._between(token, "\n", fake),
            grid_end_ids=self._between(token, "\n\n", fake),
        )
        resample = getattr(ip, "resample", 1)
        do_normalize = getattr(ip, "do_normalize", True)

        def floats(values: Any) -> list[float]:
            return [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]

        return PreprocessSpec(
            resize_mode="exact",  # every view is tile x tile already (the rule resizes)
            size={"height": tile, "width": tile},
            resample=_RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), "lanczos"),
            center_crop=None,
            rescale_factor=float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else None,
            mean=floats(ip.image_mean) if do_normalize else None,
            std=floats(ip.image_std) if do_normalize else None,
            convert_rgb=bool(getattr(ip, "do_convert_rgb", True)),
            image_token=token,
            image_token_id=token_id,
            tokens_per_image=seq,
            tiling="split",
            tiling_params=rule.to_params(),
        )

    def example_pixel_values(self, batch: int) -> Any:
        import torch

        vc = self.vision_config()
        dtype = next(self.model.parameters()).dtype
        return torch.randn(batch, vc.num_channels, vc.image_size, vc.image_size, dtype=dtype)

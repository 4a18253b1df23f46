"""LFM2-VL (``lfm2_vl``, ``Lfm2VlForConditionalGeneration``; LiquidAI's 450M / 1.6B): a SigLIP2 NaFlex tower, pixel
unshuffle + MLP projector, and LFM2 — a hybrid language model of short-convolution and attention layers.

- **Images** (``preprocess.tiling = "lfm2_tiles"``, ``runtime/images/lfm2_tiles.py``): a small image is resized to
  multiples of 32 px within the token budget (``min_image_tokens`` … ``max_image_tokens``); a large one is cut into a
  grid of ``tile_size`` tiles (2–10, chosen by aspect ratio) plus a thumbnail. Each view is patched at its own grid
  (NaFlex: no square resize), so views differ in size: the vision graph takes them padded to the longest,
  ``pixel_values [views, patches, 3·p²]`` with ``pixel_attention_mask [views, patches]`` and ``spatial_shapes
  [views, 2]`` (transformers' own layout), resamples the tower's learned position table to each view's grid inside
  the graph (transformers writes that resize as a matrix product over ``spatial_shapes``), and returns ``[views,
  patches / 4, E]``, each view's tokens first. In the prompt each image is ``<|image_start|>``, per tile
  ``<|img_row_r_col_c|>`` and its tokens, ``<|img_thumbnail|>`` and the thumbnail's tokens, ``<|image_end|>``.
- **Decoder** (:class:`~edgelvm.models.hybrid_decoder.Lfm2DecoderForExport`): attention layers (GQA, q/k RMS-normed
  per head, 1-D RoPE) keep keys and values (``kv_cache.layers``); each short-convolution layer keeps its last
  ``conv_L_cache - 1`` gated inputs as a ``conv`` state ``[hidden, L - 1]`` (``kv_cache.states``), constant in the
  context length. Portable graph only.

``Lfm2VlImageProcessor`` exists only as a torchvision backend. Where torchvision is missing the adapter loads the
tokenizer and reads ``preprocessor_config.json`` as data (:class:`Lfm2VlDataProcessor`): export and the runtime need
nothing more, and calibration encodes records through the runtime's rule (the same layout and ids; pixels within
one grey level of the torchvision backend).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import KVCacheSpec, PreprocessSpec, StateSpec, TokenizerSpec
from edgelvm.models.base import VLMAdapter
from edgelvm.runtime.images.lfm2_tiles import Lfm2TilesRule, token_patch_index

VISION_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes", "token_patches")

#: ``Lfm2VlImageProcessor``'s class defaults (used where preprocessor_config.json leaves a field out).
IMAGE_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "downsample_factor": 2,
    "do_image_splitting": True,
    "min_tiles": 2,
    "max_tiles": 10,
    "use_thumbnail": True,
    "min_image_tokens": 64,
    "max_image_tokens": 256,
    "encoder_patch_size": 16,
    "tile_size": 512,
    "max_pixels_tolerance": 2.0,
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_MARKERS = {"image_start": "<|image_start|>", "image_end": "<|image_end|>", "thumbnail": "<|img_thumbnail|>"}


def _token_ids(tokenizer: Any, token: str, where: Any) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(token)
    if ids is None or (tokenizer.unk_token_id is not None and ids == tokenizer.unk_token_id):
        raise UnsupportedModelError(
            f"{token} is not a token of the checkpoint's tokenizer, but LFM2-VL's prompts use it",
            where=where,
            fix="use a checkpoint whose tokenizer has LFM2-VL's image marker tokens",
        )
    return [int(ids)]


def lfm2_preprocess_spec(
    tokenizer: Any, ip: Any, image_token: str, image_token_id: int, tokens_per_image: int, where: Any = None
) -> PreprocessSpec:
    """The bundle's ``preprocess`` section from the image processor's settings ``ip`` (attributes) and the tokenizer
    (the marker tokens' ids): rescale / normalize per view, the ``lfm2_tiles`` rule for everything else."""
    splitting = bool(ip.do_image_splitting)
    min_tiles, max_tiles = (int(ip.min_tiles), int(ip.max_tiles)) if splitting else (1, 1)
    rule = Lfm2TilesRule(
        encoder_patch_size=int(ip.encoder_patch_size),
        downsample_factor=int(ip.downsample_factor),
        tile_size=int(ip.tile_size),
        min_image_tokens=int(ip.min_image_tokens),
        max_image_tokens=int(ip.max_image_tokens),
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        do_image_splitting=splitting,
        use_thumbnail=bool(ip.use_thumbnail),
        max_pixels_tolerance=float(ip.max_pixels_tolerance),
        image_start_ids=_token_ids(tokenizer, _MARKERS["image_start"], where),
        image_end_ids=_token_ids(tokenizer, _MARKERS["image_end"], where),
        thumbnail_ids=_token_ids(tokenizer, _MARKERS["thumbnail"], where),
        row_col_token_ids=[  # row r has at most max_tiles // r columns
            [_token_ids(tokenizer, f"<|img_row_{r}_col_{c}|>", where) for c in range(1, max_tiles // r + 1)]
            for r in range(1, max_tiles + 1)
        ]
        if splitting
        else [],
        use_image_special_tokens=True,
    )
    resample = int(getattr(ip.resample, "value", ip.resample))

    def floats(values: Any) -> list[float]:
        return [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]

    return PreprocessSpec(
        resize_mode="none",  # the tiling rule decides every view's size
        size={"tile_size": int(ip.tile_size)},
        resample=_RESAMPLE_NAMES.get(resample, "bilinear"),
        center_crop=None,
        rescale_factor=float(ip.rescale_factor) if ip.do_rescale else None,
        mean=floats(ip.image_mean) if ip.do_normalize else None,
        std=floats(ip.image_std) if ip.do_normalize else None,
        # the tower takes 3 channels; transformers' class leaves do_convert_rgb unset (None) and then fails on RGBA
        # or grey images, which the runtime converts (transparency on white) as do_convert_rgb=True does
        convert_rgb=True,
        image_token=image_token,
        image_token_id=int(image_token_id),
        tokens_per_image=tokens_per_image,
        tiling="lfm2_tiles",
        tiling_params=rule.to_params(),
    )


class Lfm2VlDataProcessor:
    """LFM2-VL's processor where transformers cannot build it (no torchvision): the tokenizer, the image processor's
    settings as data (``image_processor`` is a namespace of them: all export and the runtime read) and a call that
    makes ``Lfm2VlProcessor``'s outputs with the runtime's own rule, for the stages that encode records
    (calibration). ``save_pretrained`` writes tokenizer and settings back, so stages keep the source's files."""

    is_data_only = True

    def __init__(self, tokenizer: Any, settings: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.settings = settings  # preprocessor_config.json as the checkpoint has it
        self.image_processor = SimpleNamespace(**{**IMAGE_PROCESSOR_DEFAULTS, **settings})
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(conversation, chat_template=chat_template or self.chat_template,
                                                  **kwargs)  # fmt: skip

    def __call__(self, images: Any = None, text: Any = None, return_tensors: str = "pt", padding: bool = False,
                 **kwargs: Any) -> dict[str, Any]:  # fmt: skip
        """``Lfm2VlProcessor(images, text)``'s outputs, made by the runtime's rule (numpy + PIL; pixels within one grey
        level of the torchvision backend, layout and ids equal): each ``<image>`` expanded to the image's markers and
        tokens, the images' views concatenated and padded to one patch count (``pixel_attention_mask``)."""
        import torch

        texts = [text] if isinstance(text, str) else list(text)
        flat = [image for group in (images or []) for image in (group if isinstance(group, (list, tuple)) else [group])]
        preprocessor, token_id = self._preprocessor, self._image_token_id
        prepared = [preprocessor.prepare(image) for image in flat]
        segments = iter([preprocessor.image_segment(p.height, p.width) for p in prepared])
        rows = []
        for one in texts:
            ids = self.tokenizer(one, add_special_tokens=False)["input_ids"]
            rows.append([t for token in ids for t in (next(segments) if token == token_id else [token])])
        if next(segments, None) is not None:
            raise ValueError(f"{len(prepared)} images but fewer {self.image_token} placeholders in the text")
        out = dict(self.tokenizer.pad({"input_ids": rows}, padding=bool(padding or len(rows) > 1),
                                      return_tensors="pt"))  # fmt: skip
        if prepared:
            patches = max(p.pixels.shape[1] for p in prepared)

            def cat(arrays: list[np.ndarray]) -> Any:
                widths = [[(0, 0), (0, patches - a.shape[1])] + [(0, 0)] * (a.ndim - 2) for a in arrays]
                return torch.from_numpy(np.concatenate([np.pad(a, w) for a, w in zip(arrays, widths)]))

            out["pixel_values"] = cat([p.pixels for p in prepared])
            out["pixel_attention_mask"] = cat([p.inputs["pixel_attention_mask"] for p in prepared])
            out["spatial_shapes"] = torch.from_numpy(np.concatenate([p.inputs["spatial_shapes"] for p in prepared]))
        return out

    @functools.cached_property
    def _image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    @functools.cached_property
    def _preprocessor(self) -> Any:
        """The runtime's preprocessing for these settings (built once: calibration calls this processor per record)."""
        from edgelvm.runtime.images.preprocess import ImagePreprocessor

        spec = lfm2_preprocess_spec(self.tokenizer, self.image_processor, self.image_token, self._image_token_id, 0)
        return ImagePreprocessor(spec)

    def save_pretrained(self, out: str | Path) -> None:
        self.tokenizer.save_pretrained(out)
        (Path(out) / "preprocessor_config.json").write_text(json.dumps(self.settings, indent=2) + "\n")


def load_lfm2_vl_processor(source: str) -> Any:
    """``AutoProcessor.from_pretrained(source)`` where it can be built (torchvision installed); else
    :class:`Lfm2VlDataProcessor`."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.utils import cached_file, is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(source)
    local = Path(source) / "preprocessor_config.json"
    path = local if local.is_file() else Path(cached_file(source, "preprocessor_config.json"))
    return Lfm2VlDataProcessor(AutoTokenizer.from_pretrained(source), json.loads(path.read_text()))


def _no_check(*args: Any, **kwargs: Any) -> None:
    return None


class _Lfm2VisionEncoder:
    """Factory for the export-facing vision module (lazy: importing this file never imports torch)."""

    @staticmethod
    def build(model: Any, factor: int) -> Any:
        import torch

        class Lfm2VisionEncoder(torch.nn.Module):
            """``(pixel_values [V, P, 3·p²], pixel_attention_mask [V, P], spatial_shapes [V, 2], token_patches
            [V, P / f², f²]) -> [V, P / f², E]``: ``Lfm2VlModel.get_image_features`` with its patch gather given as
            data (``token_patches``, the runtime's rule computes it) and without its final split into per-view lists
            (a data-dependent shape): view ``v``'s ``(h / f)·(w / f)`` tokens come first in its row, the rest is
            padding."""

            def __init__(self, vlm: Any) -> None:
                super().__init__()
                self.vision_tower, self.projector = vlm.vision_tower, vlm.multi_modal_projector

            def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                        spatial_shapes: torch.Tensor, token_patches: torch.Tensor) -> torch.Tensor:  # fmt: skip
                from transformers.models.siglip2 import modeling_siglip2

                # transformers asserts on spatial_shapes' values inside the graph (an op with no ONNX form); the
                # runtime's rule makes them (positive, within the padded length), so the check is left out here
                check, modeling_siglip2.torch_compilable_check = modeling_siglip2.torch_compilable_check, _no_check
                try:
                    hidden = self.vision_tower(pixel_values=pixel_values, spatial_shapes=spatial_shapes,
                                               pixel_attention_mask=pixel_attention_mask).last_hidden_state  # fmt: skip
                finally:
                    modeling_siglip2.torch_compilable_check = check
                # each token's f x f patches (row offset, column offset), as the projector's pixel unshuffle orders them
                views, tokens = token_patches.shape[:2]
                grid = hidden.reshape(-1, hidden.shape[-1])[token_patches].reshape(views, tokens, -1)
                projector = self.projector
                if projector.layer_norm is not None:
                    grid = projector.layer_norm(grid)
                return projector.linear_2(projector.act(projector.linear_1(grid)))

        return Lfm2VisionEncoder(model.model).eval()


class Lfm2VlAdapter(VLMAdapter):
    family = "lfm2_vl"
    model_types = ("lfm2_vl",)
    display_name = "LFM2-VL"
    supported_text_models = ("lfm2",)

    @classmethod
    def load_processor(cls, source: str) -> Any:
        return load_lfm2_vl_processor(source)

    def _check_text_model(self) -> None:
        super()._check_text_model()
        if self.processor is None:  # a config-only adapter (the fit check)
            return
        _, token_id = self.image_token()
        if int(self.config.image_token_id) != token_id:
            raise UnsupportedModelError(
                f"config.image_token_id is {self.config.image_token_id} but the tokenizer's image token is id "
                f"{token_id}",
                where=self.source or None,
                fix="set image_token_id in config.json to the tokenizer's <image> id",
            )

    # ---- structure ----------------------------------------------------------------------------------------------
    def _factor(self) -> int:
        return int(self.config.downsample_factor)

    def vision_encoder(self) -> Any:
        return _Lfm2VisionEncoder.build(self.model, self._factor())

    def language_model(self) -> Any:
        return self.model.model.language_model

    def lm_head(self) -> Any:
        return self.model.lm_head

    def input_embeddings(self) -> Any:
        return self.model.model.language_model.embed_tokens

    def layer_stacks(self) -> dict[str, Any]:
        return {"vision": self.model.model.vision_tower.encoder.layers, "text": self.language_model().layers}

    def image_feature_module(self) -> Any:
        return self.model.model.multi_modal_projector

    def _settings(self) -> Any:
        return self.processor.image_processor

    def tokens_per_image(self) -> int:
        """The most tokens one view can have: a tile's, or the single view's / thumbnail's budget."""
        ip = self._settings()
        tile = -(-(int(ip.tile_size) // int(ip.encoder_patch_size)) // self._factor())
        return max(tile * tile if ip.do_image_splitting else 0, int(ip.max_image_tokens))

    def _patch_dim(self) -> int:
        vc = self.config.vision_config
        return int(vc.num_channels * vc.patch_size * vc.patch_size)

    def example_pixel_values(self, batch: int) -> Any:
        return self.example_vision_inputs(batch)["pixel_values"]

    def example_vision_inputs(self, batch: int) -> dict[str, Any]:
        """``batch`` views of different grids (the first ``(2 + 2b) x 4`` patches, then smaller ones zero-padded to
        it), so that parity checks see padding and the position table resampled up and down."""
        import torch

        grids = [(2 + 2 * batch, 4)] + [(2, 2 * (1 + i % 2)) for i in range(batch - 1)]
        patches = grids[0][0] * grids[0][1]
        dtype = next(self.model.model.vision_tower.parameters()).dtype
        generator = torch.Generator().manual_seed(batch)
        pixels = torch.zeros(len(grids), patches, self._patch_dim(), dtype=dtype)
        mask = torch.zeros(len(grids), patches, dtype=torch.long)
        for view, (h, w) in enumerate(grids):
            pixels[view, : h * w] = torch.randn(h * w, self._patch_dim(), generator=generator).to(dtype)
            mask[view, : h * w] = 1
        index = token_patch_index(np.asarray(grids), patches, self._factor())
        shapes = torch.tensor(grids, dtype=torch.long)
        return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes,
                "token_patches": torch.from_numpy(index)}  # fmt: skip

    def vision_input_dims(self) -> dict[str, dict[int, str]]:
        return {"pixel_values": {0: "views", 1: "patches"}, "pixel_attention_mask": {0: "views", 1: "patches"},
                "spatial_shapes": {0: "views"}, "token_patches": {0: "views", 1: "tokens"}}  # fmt: skip

    def vision_inputs(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """A processor batch (every view of every image, padded to one patch count) -> one encoder call."""
        import torch

        pixels = batch.get("pixel_values")
        if pixels is None:
            return []
        index = token_patch_index(batch["spatial_shapes"].numpy(), pixels.shape[1], self._factor())
        return [{**{name: batch[name] for name in VISION_INPUTS[:3]}, "token_patches": torch.from_numpy(index)}]

    def patches_per_image(self) -> int:
        ip = self._settings()
        return (int(ip.tile_size) // int(ip.encoder_patch_size)) ** 2

    # ---- the hybrid decoder ---------------------------------------------------------------------------------------
    def attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.text_config.layer_types) if kind == "full_attention"]

    def kv_cache_spec(self, max_length: int, dtype: str) -> KVCacheSpec:
        """Keys and values of the attention layers; a ``conv`` state ``[hidden, L - 1]`` per convolution layer."""
        from edgelvm.models.hybrid_decoder import lfm2_state_shapes

        cfg = self.text_config
        heads = int(cfg.num_attention_heads)
        states = [StateSpec(layer=layer, kind=kind, shape=shape, dtype=dtype)
                  for layer, kind, shape in lfm2_state_shapes(cfg)]  # fmt: skip
        layers = self.attention_layers()
        return KVCacheSpec(num_layers=len(layers), num_kv_heads=int(cfg.num_key_value_heads),
                           head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads), dtype=dtype,
                           max_length=max_length, layers=layers, states=states)  # fmt: skip

    def decoder_module(self) -> Any:
        from edgelvm.models.hybrid_decoder import Lfm2DecoderForExport

        return Lfm2DecoderForExport(self.language_model(), self.lm_head(), self.text_config).eval()

    def decoder_weights(self, max_length: int) -> Any:
        raise UnsupportedModelError(
            "no fused decoder for LFM2-VL: its short-convolution layers are outside the fused decoder's Llama-family "
            "layers",
            where=self.source or None,
            fix="export with --decoder portable (auto does this)",
        )

    # ---- plain data for the bundle ------------------------------------------------------------------------------
    def image_token(self) -> tuple[str, int]:
        token = getattr(self.processor, "image_token", None) or "<image>"
        return token, int(self.processor.tokenizer.convert_tokens_to_ids(token))

    def preprocess_spec(self) -> PreprocessSpec:
        return lfm2_preprocess_spec(self.processor.tokenizer, self._settings(), *self.image_token(),
                                    self.tokens_per_image(), where=self.source or None)  # fmt: skip

    def tokenizer_spec(self, file: str) -> TokenizerSpec:
        """The template renders BOS itself: the processor tokenizes with ``add_special_tokens=False``."""
        spec = super().tokenizer_spec(file)
        spec.add_special_tokens = False
        return spec

    # ---- compression stages ---------------------------------------------------------------------------------------
    def check_stage(self, stage: str, config: Any = None, data: Any = None) -> None:
        if stage == "prune":
            why = "its short-convolution layers (in_proj -> B, C, x gates -> conv -> out_proj) are not described"
            raise self._unsupported("pruning", why, "quantize instead (`edgelvm quantize --llm rtn`)")
        if stage == "distill":
            why = "derived students do not keep the conv / attention layer pattern yet (nor is a given student tried)"
            raise self._unsupported("distilling", why, "quantize instead (`edgelvm quantize --llm rtn`)")
        return None

    def _unsupported(self, what: str, why: str, fix: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{what} LFM2-VL is not supported: {why}", where=self.source or None, fix=fix)

    def attention_blocks(self) -> list[Any]:
        raise self._unsupported("pruning", "the short-convolution layers are not described", "quantize instead")

    def mlp_blocks(self) -> list[Any]:
        raise self._unsupported("pruning", "the short-convolution layers are not described", "quantize instead")

    def text_scale_groups(self) -> list[Any]:
        raise UnsupportedModelError(
            "LFM2-VL's scale groups are not described (the short-convolution layers' gates)",
            where=self.source or None,
            fix="use --llm rtn or --llm gptq",
        )

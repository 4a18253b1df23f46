"""InternVL (llava-hf style ``internvl``, ``InternVLForConditionalGeneration``; InternVL2.5 / 3 "-hf" checkpoints).

``InternVLVisionModel`` (a ViT with a CLS token, layer scale, separate q/k/v) → CLS dropped → pixel shuffle (each
2 x 2 block of patch features concatenated into one, ``downsample_ratio = 0.5``) → MLP projector (LayerNorm,
Linear, GELU, Linear) → a Qwen2 or Llama language model. The vision graph is that whole path
(``[views, 3, H, W] -> [views, T, E]``, the model's ``get_image_features``).

Images are tiled dynamically (``GotOcr2ImageProcessor`` with ``crop_to_patches``, which ``InternVLProcessor`` turns
on): a grid of tiles chosen by aspect ratio (up to ``max_patches``), plus a thumbnail last. The rule is plain data
in the manifest (``preprocess.tiling = "dynamic_tiles"``, ``runtime/images/dynamic_tiles.py``). In the prompt the chat
template writes ``<IMG_CONTEXT>`` per image; the processor expands it to ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per
tile x views) + ``</img>``, and the features fill the ``<IMG_CONTEXT>`` positions. The manifest's image token is
``<IMG_CONTEXT>`` (placeholder and feature positions alike); ``<img>`` / ``</img>`` ids are in ``tiling_params``.

Loading without torchvision: ``InternVLProcessor`` holds a video processor that exists only with torchvision; then
the processor is loaded without it (:func:`edgelvm.models.processors.load_processor_without_video`;
``processor_config.json`` still gives ``image_seq_length`` and the chat template) — it processes images and text
exactly as the full one does.

Pruning: the vision attention has separate q/k/v projections and ``projection_layer``, so heads are cut as CLIP's
(its ``embed_dim`` follows the kept heads); a tower with q/k RMSNorm over all heads (``use_qk_norm``, InternViT-6B)
is refused. The text side is LLaVA's (inherited, as the fused decoder and AWQ scale groups are).
"""

from __future__ import annotations

from typing import Any

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec
from edgelvm.models.base import AttentionBlock, MLPBlock, qkvo_attention_blocks
from edgelvm.models.llava import LlavaAdapter
from edgelvm.models.processors import load_processor_without_video


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


class _InternVLVisionEncoder:
    """Factory for the export-facing vision module (lazy: importing this file never imports torch)."""

    @staticmethod
    def build(internvl_model: Any) -> Any:
        import torch

        class InternVLVisionEncoder(torch.nn.Module):
            """pixel_values -> tower -> CLS dropped -> pixel shuffle -> projector: ``[N, T, E]``.

            Mirrors ``InternVLModel.get_image_features`` (and its ``pixel_shuffle``) with the feature-grid side a
            constant, so that the batch stays the only dynamic dimension."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.vision_tower = inner.vision_tower
                self.projector = inner.multi_modal_projector
                config = inner.config
                self.layer = int(config.vision_feature_layer)
                self.ratio = float(config.downsample_ratio)
                vc = config.vision_config
                self.side = _pair(vc.image_size)[0] // _pair(vc.patch_size)[0]

            def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
                n, width, height, channels = x.shape
                r = self.ratio
                x = x.view(n, width, int(height * r), int(channels / r)).permute(0, 2, 1, 3).contiguous()
                x = x.view(n, int(height * r), int(width * r), int(channels / (r**2)))
                return x.permute(0, 2, 1, 3).contiguous()

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                if self.layer == -1:
                    features = self.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
                else:
                    out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
                    features = out.hidden_states[self.layer]
                features = features[:, 1:, :]  # the CLS token ("default" feature select strategy)
                n = features.shape[0]
                features = self.pixel_shuffle(features.reshape(n, self.side, self.side, features.shape[-1]))
                return self.projector(features.reshape(n, -1, features.shape[-1]))

        return InternVLVisionEncoder(internvl_model.model).eval()


class _HeadCount:
    """An InternVL vision attention as :func:`edgelvm.models.checkpoint.pruned.cut_heads` patches it: setting
    ``num_heads`` also sets ``embed_dim`` (its forward reshapes the heads' output to ``embed_dim``)."""

    def __init__(self, attention: Any) -> None:
        self.attention = attention

    @property
    def num_heads(self) -> int:
        return int(self.attention.num_heads)

    @num_heads.setter
    def num_heads(self, heads: int) -> None:
        self.attention.num_heads = heads
        self.attention.embed_dim = heads * self.attention.head_dim


class InternVLAdapter(LlavaAdapter):
    family = "internvl"
    model_types = ("internvl",)
    supported_text_models = ("qwen2", "llama")

    @classmethod
    def load_processor(cls, source: str) -> Any:
        from transformers import InternVLProcessor

        return load_processor_without_video(source, InternVLProcessor)

    def _check_text_model(self) -> None:
        super()._check_text_model()  # the text model, and config.image_token_id == the tokenizer's <IMG_CONTEXT>
        self._geometry()
        self._markers()

    # ---- geometry ------------------------------------------------------------------------------------------------
    def _geometry(self) -> tuple[tuple[int, int], int]:
        """(tile size (h, w), tokens per tile), checked against what the model and the processor assume."""
        config, where = self.config, self.source or None
        vc = config.vision_config
        image, patch = _pair(vc.image_size), _pair(vc.patch_size)
        if image[0] != image[1] or patch[0] != patch[1]:
            raise UnsupportedModelError(
                f"a non-square vision input ({image}, patches {patch}): get_image_features assumes a square grid",
                where=where,
                fix="use a checkpoint with square image_size and patch_size",
            )
        side = image[0] // patch[0]
        inverse = 1 / float(config.downsample_ratio)
        if abs(inverse - round(inverse)) > 1e-9 or side % round(inverse):
            raise UnsupportedModelError(
                f"downsample_ratio {config.downsample_ratio} does not divide the {side} x {side} patch grid into "
                "whole blocks (pixel shuffle)",
                where=where,
                fix="use a checkpoint whose patch grid is a multiple of 1 / downsample_ratio",
            )
        if not isinstance(config.vision_feature_layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer {config.vision_feature_layer!r}: InternVL takes one layer's features",
                where=where,
                fix="set vision_feature_layer to a single layer index",
            )
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} keeps the CLS token, so "
                "the patch features do not form a grid (transformers cannot run it either)",
                where=where,
                fix="use vision_feature_select_strategy 'default'",
            )
        tokens = (side // round(inverse)) ** 2
        ip = self.processor.image_processor
        tile = (int(ip.size["height"]), int(ip.size["width"]))
        if tile != image:
            raise UnsupportedModelError(
                f"the image processor makes {tile[0]}x{tile[1]} tiles but the vision tower takes {image[0]}x{image[1]}",
                where=where,
                fix="make preprocessor_config.json's size equal vision_config.image_size",
            )
        seq = int(getattr(self.processor, "image_seq_length", tokens))
        if seq != tokens:
            raise UnsupportedModelError(
                f"the processor writes {seq} image tokens per tile but the vision graph yields {tokens}",
                where=where,
                fix="set image_seq_length in processor_config.json to (image_size / patch_size * downsample_ratio)²",
            )
        return tile, tokens

    def _markers(self) -> tuple[int, int]:
        """Ids of ``<img>`` and ``</img>``, which the processor writes around each image's image tokens."""
        tokenizer = self.processor.tokenizer
        ids = []
        for name in ("start_image_token", "end_image_token"):
            token = getattr(self.processor, name, None) or getattr(tokenizer, name, None)
            token_id = tokenizer.convert_tokens_to_ids(token) if token else None
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise UnsupportedModelError(
                    f"the tokenizer has no {name} (InternVL's <img> / </img> markers)",
                    where=self.source or None,
                    fix="use the checkpoint's own tokenizer files",
                )
            ids.append(int(token_id))
        return ids[0], ids[1]

    def _tiling_settings(self) -> dict[str, Any]:
        """crop_to_patches / min_patches / max_patches as the processor applies them (its defaults override the
        image processor's: ``InternVLProcessor`` turns ``crop_to_patches`` on)."""
        ip, processor = self.processor.image_processor, self.processor
        merged: dict[str, Any] = {}
        try:
            merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"]
        except (AttributeError, KeyError, TypeError):  # an older processor API: the class defaults
            merged = dict(getattr(type(processor), "images_kwargs", {}) or {})
        return {name: merged.get(name, getattr(ip, name)) for name in ("crop_to_patches", "min_patches", "max_patches")}

    def preprocess_spec(self) -> PreprocessSpec:
        from edgelvm.runtime.images.dynamic_tiles import DynamicTilesRule  # plain numpy: the runtime's own rule

        spec = super().preprocess_spec()  # each view: exact resize (a no-op on tiles) → rescale → normalize
        tile, tokens = self._geometry()
        start, end = self._markers()
        settings = self._tiling_settings()
        tiled = bool(settings["crop_to_patches"]) and int(settings["max_patches"]) > 1
        rule = DynamicTilesRule(
            tile_size=tile,
            min_tiles=int(settings["min_patches"]) if tiled else 1,
            max_tiles=int(settings["max_patches"]) if tiled else 1,
            tokens_per_view=tokens,
            start_token_id=start,
            end_token_id=end,
        )
        spec.tiling = "dynamic_tiles"
        spec.tiling_params = rule.to_params()
        return spec

    def tokens_per_image(self) -> int:
        """Tokens of one view (a tile or the thumbnail); a whole image has more, depending on its size."""
        return self._geometry()[1]

    def vision_config(self) -> Any:
        return self.model.config.vision_config

    def vision_encoder(self) -> Any:
        return _InternVLVisionEncoder.build(self.model)

    def config_parameter_counts(self) -> Any:
        """InternViT + the pixel-shuffle projector (LayerNorm over ``hidden × (1/ratio)²``, two linears) and the
        decoder, from the config."""
        from edgelvm.models.param_counts import ParameterCounts, decoder_params, internvl_vision_params, linear

        cfg, tc = self.config, self.text_config
        width = cfg.vision_config.hidden_size * int(1 / cfg.downsample_ratio) ** 2
        projector = 2 * width + linear(width, tc.hidden_size) + linear(tc.hidden_size, tc.hidden_size)
        return ParameterCounts(
            vision=internvl_vision_params(cfg.vision_config) + projector,
            decoder=decoder_params(tc, where=self.source or None),
        )

    def example_pixel_values(self, batch: int) -> Any:
        import torch

        vc = self.vision_config()
        h, w = _pair(vc.image_size)
        dtype = next(self.model.model.vision_tower.parameters()).dtype
        return torch.randn(batch, vc.num_channels, h, w, dtype=dtype)

    # ---- structure for the compression stages --------------------------------------------------------------------
    def layer_stacks(self) -> dict[str, Any]:
        return {"vision": self.model.model.vision_tower.encoder.layer, "text": self.language_model().layers}

    def attention_blocks(self) -> list[AttentionBlock]:
        if self.vision_config().use_qk_norm:
            raise UnsupportedModelError(
                "the InternVL vision tower normalises q and k over all heads together (use_qk_norm), so its heads "
                "cannot be removed one by one",
                where=self.source or None,
                fix="prune only checkpoints whose vision_config.use_qk_norm is false (InternViT-300M towers)",
            )
        blocks = qkvo_attention_blocks("text", self.layer_stacks()["text"])
        for i, layer in enumerate(self.layer_stacks()["vision"]):
            attn = layer.attention
            head_dim = int(attn.head_dim)
            heads = attn.q_proj.out_features // head_dim
            blocks.append(
                AttentionBlock(
                    "vision", i, _HeadCount(attn), attn.q_proj, attn.k_proj, attn.v_proj, attn.projection_layer,
                    heads, heads, head_dim,
                )
            )  # fmt: skip
        return blocks

    def mlp_blocks(self) -> list[MLPBlock]:
        blocks = [MLPBlock("text", i, [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj)
                  for i, layer in enumerate(self.layer_stacks()["text"])]  # fmt: skip
        blocks += [MLPBlock("vision", i, [layer.mlp.fc1], layer.mlp.fc2)
                   for i, layer in enumerate(self.layer_stacks()["vision"])]  # fmt: skip
        return blocks

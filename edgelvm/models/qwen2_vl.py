"""Qwen2-VL (``qwen2_vl``, ``Qwen2VLForConditionalGeneration``): native-resolution ViT, 2×2 patch merger, M-RoPE.

An image is resized to a multiple of ``patch_size * merge_size`` pixels within ``[min_pixels, max_pixels]``
(``smart_resize``) and cut into patches; the tower sees *all* patches of one image (its own grid, no fixed size) and
the merger turns every ``merge_size²`` neighbouring patches into one language-model token, so an image's token count
is ``grid_h * grid_w / merge_size²``. The runtime does this in numpy (``runtime/images/native_resolution.py``, manifest
``preprocess.tiling = "native"``) and runs the vision graph once per image.

The vision graph is an export-friendly rewrite of the tower for ONE image (transformers' forward splits a packed
batch with ``torch.split(x, cu_seqlens.tolist())``, which torch.export cannot trace): ``pixel_values [N, D]`` (the
image processor's flattened patches) and ``vision_position_ids [N, 2]`` (each patch's (row, column) in the patch
grid, in the processor's merge-block order; the runtime computes them) → ``image_features [N / merge², E]``. It uses
the tower's own modules and weights (patch embedding, rotary table, blocks, merger).

Positions are M-RoPE: every token has a (temporal, height, width) position; text tokens have three equal ones, an
image's tokens their grid coordinates offset by the text before them, and text after an image continues from the
largest position + 1 (``get_rope_index``). The decoder graph takes ``position_ids [3, B, S]`` and the runtime
computes them (``runtime/images/positions.py``, manifest ``positions.kind = "mrope"``). The language model is
Qwen2-shaped (RMSNorm, SwiGLU, GQA, q/k/v biases) but rotates by 3-D positions, so only the portable decoder is
exported.

Qwen2.5-VL (``qwen2_5_vl``, :class:`Qwen25VLAdapter`) is the same layout with window attention in the tower: the
graph also takes ``window_index`` / ``window_ids`` (computed by the runtime from ``tiling_params.window_size``).

Loading without torchvision: ``Qwen2VLProcessor`` holds a video processor that exists only with torchvision; then
the processor is loaded without it (:func:`edgelvm.models.processors.load_processor_without_video`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec
from edgelvm.models.base import (
    _RESAMPLE_NAMES,
    AttentionBlock,
    MLPBlock,
    ScaleGroup,
    VLMAdapter,
    qkvo_attention_blocks,
)
from edgelvm.models.config_json import move_flat_fields
from edgelvm.models.processors import load_processor_without_video

#: Graph input names of the vision graph, in order (the runtime's native-resolution rule produces the second one).
VISION_INPUTS = ("pixel_values", "vision_position_ids")


class _QwenVisionEncoder:
    """Factory for the export-facing vision module (lazy: importing this file never imports torch)."""

    @staticmethod
    def build(visual: Any, windowed: bool, position_table: bool = False, deepstack: Sequence[int] = ()) -> Any:
        """``windowed``: Qwen2.5-VL's window attention; ``position_table``: Qwen3-VL's learned position table
        (interpolated rows and weights as graph inputs); ``deepstack``: the blocks whose output (through their own
        merger) is appended to the features (Qwen3-VL's DeepStack: ``[tokens, (1 + len(deepstack)) * E]``)."""
        import torch
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        merge_unit = int(visual.spatial_merge_size) ** 2
        stack = list(deepstack)
        if windowed and stack:
            raise UnsupportedModelError("window attention together with DeepStack is not implemented",
                                        fix="use a Qwen2.5-VL or a Qwen3-VL checkpoint")  # fmt: skip

        class QwenVisionEncoder(torch.nn.Module):
            """``(pixel_values [N, D], vision_position_ids [N, 2]) -> [N / merge², E]`` for one image; Qwen2.5-VL's
            windowed tower also takes ``window_index [N / merge²]`` and ``window_ids [N]``.

            The tower's forward for a single image (one attention segment: ``cu_seqlens = [0, N]``), the
            per-segment split replaced by one attention call (masked to each patch's window in the windowed blocks,
            on the patches reordered window by window as the tower does); every module and weight is the tower's
            own."""

            def __init__(self, tower: Any) -> None:
                super().__init__()
                self.tower = tower
                self.full_blocks = set(getattr(tower, "fullatt_block_indexes", None) or range(len(tower.blocks)))

            def forward(
                self,
                pixel_values: torch.Tensor,
                vision_position_ids: torch.Tensor,
                window_index: torch.Tensor | None = None,
                window_ids: torch.Tensor | None = None,
            ) -> torch.Tensor:
                return self.encode(pixel_values, vision_position_ids, window_index, window_ids)

            def encode(
                self,
                pixel_values: torch.Tensor,
                vision_position_ids: torch.Tensor,
                window_index: torch.Tensor | None = None,
                window_ids: torch.Tensor | None = None,
                pos_indices: torch.Tensor | None = None,
                pos_weights: torch.Tensor | None = None,
            ) -> torch.Tensor:
                tower = self.tower
                hidden = tower.patch_embed(pixel_values)
                if position_table:  # Qwen3-VL: the learned table, bilinearly resampled to this grid
                    table = (tower.pos_embed(pos_indices) * pos_weights[:, :, None]).sum(1)
                    hidden = hidden + table.to(hidden.dtype)
                cos, sin = tower.rotary_pos_emb(hidden, vision_position_ids)
                mask = None
                if windowed:
                    hidden, cos, sin = (self._by_window(t, window_index) for t in (hidden, cos, sin))
                    mask = window_ids[:, None] == window_ids[None, :]
                stacked = []
                for index, block in enumerate(tower.blocks):
                    block_mask = None if index in self.full_blocks else mask
                    hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, block_mask)
                    hidden = hidden + block.mlp(block.norm2(hidden))
                    if index in stack:
                        stacked.append(tower.deepstack_merger_list[stack.index(index)](hidden))
                merged = tower.merger(hidden)
                if windowed:  # back to the patch grid's block order
                    merged = torch.zeros_like(merged).index_copy(0, window_index, merged)
                return torch.cat([merged, *stacked], dim=-1) if stacked else merged

            @staticmethod
            def _by_window(t: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
                n = t.shape[0]
                return t.reshape(n // merge_unit, merge_unit, -1)[window_index].reshape(n, -1)

            @staticmethod
            def _attention(
                attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
            ) -> torch.Tensor:
                n = x.shape[0]
                q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
                return attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))

        class TableVisionEncoder(QwenVisionEncoder):
            """Qwen3-VL's tower: ``(pixel_values, vision_position_ids, vision_pos_indices [N, 4], vision_pos_weights
            [N, 4]) -> [N / merge², (1 + deepstack) * E]`` (the graph's inputs in this order)."""

            def forward(  # type: ignore[override]
                self,
                pixel_values: torch.Tensor,
                vision_position_ids: torch.Tensor,
                vision_pos_indices: torch.Tensor,
                vision_pos_weights: torch.Tensor,
            ) -> torch.Tensor:
                return self.encode(pixel_values, vision_position_ids, None, None, vision_pos_indices,
                                   vision_pos_weights)  # fmt: skip

        return (TableVisionEncoder if position_table else QwenVisionEncoder)(visual).eval()


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    #: The text model's layer kinds the decoder export handles (``layer_types``); a hybrid family adds its own.
    text_layer_kinds: ClassVar[tuple[str, ...]] = ("full_attention",)
    #: The family's name in messages.
    display_name = "Qwen2-VL"

    @classmethod
    def plain_config_layout(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Qwen2-VL's hub configs are flat: the text model's fields sit at the top level (transformers moves them
        into ``text_config`` when it builds the config; so does this)."""
        return move_flat_fields(raw, "text_config")

    @classmethod
    def load_processor(cls, source: str) -> Any:
        from transformers import Qwen2VLProcessor

        return load_processor_without_video(source, Qwen2VLProcessor)

    def _check_text_model(self) -> None:
        where = self.source or None
        _, token_id = self.image_token()
        if self.config.image_token_id != token_id:
            raise UnsupportedModelError(
                f"config.image_token_id is {self.config.image_token_id} but the tokenizer's image token is id "
                f"{token_id}",
                where=where,
                fix="set image_token_id in config.json to the tokenizer's <|image_pad|> id",
            )
        text = self.text_config
        if any(t not in self.text_layer_kinds for t in getattr(text, "layer_types", None) or []):
            raise UnsupportedModelError(
                "sliding-window attention layers (use_sliding_window) are not supported",
                where=where,
                fix="use a checkpoint with use_sliding_window false (every released Qwen2-VL has it off)",
            )
        ip, vc = self.processor.image_processor, self.config.vision_config
        if (ip.patch_size, ip.merge_size, ip.temporal_patch_size) != (
            vc.patch_size,
            vc.spatial_merge_size,
            vc.temporal_patch_size,
        ):
            raise UnsupportedModelError(
                f"the image processor's patch/merge/temporal sizes ({ip.patch_size}, {ip.merge_size}, "
                f"{ip.temporal_patch_size}) differ from the vision tower's ({vc.patch_size}, "
                f"{vc.spatial_merge_size}, {vc.temporal_patch_size})",
                where=where,
                fix="make preprocessor_config.json agree with config.json's vision_config",
            )

    # ---- structure ----------------------------------------------------------------------------------------------
    def vision_encoder(self) -> Any:
        return _QwenVisionEncoder.build(self.model.model.visual, windowed=bool(self._window_size()))

    def config_parameter_counts(self) -> Any:
        """The native-resolution tower with its patch merger and the M-RoPE decoder, from the config."""
        from edgelvm.models import param_counts

        vision = (
            param_counts.qwen2_5_vl_vision_params
            if self._window_size()
            else param_counts.qwen2_vl_vision_params
        )(self.config.vision_config)
        return param_counts.ParameterCounts(
            vision=vision, decoder=param_counts.decoder_params(self.text_config, where=self.source or None)
        )

    def language_model(self) -> Any:
        return self.model.model.language_model  # Qwen2VLTextModel: position_ids [3, B, S]

    def lm_head(self) -> Any:
        return self.model.lm_head

    def input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()

    def image_token(self) -> tuple[str, int]:
        token = getattr(self.processor, "image_token", None) or "<|image_pad|>"
        return token, int(self.processor.tokenizer.convert_tokens_to_ids(token))

    def _merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def tokens_per_image(self) -> int:
        """The most tokens one image can have (``max_pixels``); an image's count depends on its size."""
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        return int(ip.size["longest_edge"]) // (factor * factor)

    def _patch_dim(self) -> int:
        vc = self.config.vision_config
        return int(vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size)

    def example_pixel_values(self, batch: int) -> Any:
        """Flattened patches of one image whose grid depends on ``batch`` (so parity checks see other shapes)."""
        return self.example_vision_inputs(batch)["pixel_values"]

    def example_vision_inputs(self, batch: int) -> dict[str, Any]:
        """One image's patches and graph inputs; ``batch`` picks the grid (2: 6x4 patches, 3: 8x8 at merge 2)."""
        import torch

        merge = self._merge()
        grid = (1, merge * (batch + 1), merge * (2 * batch - 2))
        dtype = next(self.model.model.visual.parameters()).dtype
        generator = torch.Generator().manual_seed(batch)
        pixels = torch.randn(int(np.prod(grid)), self._patch_dim(), generator=generator).to(dtype)
        return {"pixel_values": pixels, **self._graph_inputs(grid)}

    def _graph_inputs(self, grid: tuple[int, int, int]) -> dict[str, Any]:
        """The vision graph's inputs besides the patches, from the runtime's own (numpy) rule."""
        import torch

        inputs = self._native_rule().grid_inputs(*(int(v) for v in grid))
        return {name: torch.from_numpy(array) for name, array in inputs.items()}

    def vision_input_dims(self) -> dict[str, dict[int, str]]:
        dims = {"pixel_values": {0: "patches"}, "vision_position_ids": {0: "patches"}}
        if self._window_size():
            dims.update(window_index={0: "merged_patches"}, window_ids={0: "patches"})
        return dims

    def vision_inputs(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """A processor batch (images concatenated patch-wise, ``image_grid_thw``) -> one encoder call per image."""
        pixels, grids = batch.get("pixel_values"), batch.get("image_grid_thw")
        if pixels is None or grids is None:
            return []
        calls, start = [], 0
        for grid in grids.tolist():
            n = int(np.prod(grid))
            calls.append({"pixel_values": pixels[start : start + n], **self._graph_inputs(tuple(grid))})
            start += n
        return calls

    def _window_size(self) -> int | None:
        return None

    def _position_table_side(self) -> int | None:
        """The side of the tower's learned position table (Qwen3-VL); None: the tower has none."""
        return None

    def _native_rule(self) -> Any:
        from edgelvm.runtime.images.native_resolution import NativeResolutionRule  # plain numpy: the runtime's own rule

        ip = self.processor.image_processor
        return NativeResolutionRule(
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            min_pixels=int(ip.size["shortest_edge"]),
            max_pixels=int(ip.size["longest_edge"]),
            do_resize=bool(getattr(ip, "do_resize", True)),
            window_size=self._window_size(),
            position_table_side=self._position_table_side(),
        )

    def positions_spec(self) -> dict[str, Any]:
        _, token_id = self.image_token()
        section = self.text_config.rope_parameters.get("mrope_section")
        return {
            "kind": "mrope",
            "rows": 3,
            "image_token_id": token_id,
            "spatial_merge_size": self._merge(),
            "mrope_section": [int(s) for s in section] if section else None,  # informative: applied in the graph
        }

    def preprocess_spec(self) -> PreprocessSpec:
        ip = self.processor.image_processor
        token, token_id = self.image_token()
        resample = int(getattr(ip.resample, "value", ip.resample))

        def floats(values: Any) -> list[float]:
            return [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]

        spec = PreprocessSpec(
            resize_mode="none",  # the native rule's smart_resize decides the size
            size={"shortest_edge": int(ip.size["shortest_edge"]), "longest_edge": int(ip.size["longest_edge"])},
            resample=_RESAMPLE_NAMES.get(resample, "bicubic"),
            center_crop=None,
            rescale_factor=float(ip.rescale_factor) if ip.do_rescale else None,
            mean=floats(ip.image_mean) if ip.do_normalize else None,
            std=floats(ip.image_std) if ip.do_normalize else None,
            convert_rgb=bool(getattr(ip, "do_convert_rgb", True)),
            image_token=token,
            image_token_id=token_id,
            tokens_per_image=self.tokens_per_image(),
        )
        rule = self._native_rule()
        spec.tiling = "native"
        spec.tiling_params = rule.to_params()
        return spec

    def decoder_weights(self, max_length: int) -> Any:
        raise UnsupportedModelError(
            f"no fused decoder for {self.display_name}: its language model rotates by 3-D M-RoPE positions, the "
            "fused decoder's rotary is 1-D",
            where=self.source or None,
            fix="export with --decoder portable (auto does this)",
        )

    # ---- structure for the compression stages ------------------------------------------------------------------
    def layer_stacks(self) -> dict[str, Any]:
        return {"vision": self.model.model.visual.blocks, "text": self.language_model().layers}

    def image_feature_module(self) -> Any:
        return self.model.model.visual.merger

    def sub_configs(self, config: Any | None = None) -> dict[str, Any]:
        raise UnsupportedModelError(
            f"derived {self.display_name} students are not supported yet",
            where=self.source or None,
            fix=f"{self.display_name} supports export, quantize (--llm, --vision int8) and language-model MLP pruning "
            "(edgelvm prune --text-mlp)",
        )

    def check_stage(self, stage: str, config: Any = None, data: Any = None) -> None:
        """Pruning: the language model's MLP neurons (and whole text blocks) only. The vision tower's blocks have
        one fused ``qkv`` projection and run an image's patches packed as ``[patches, dim]``; the text attention
        derives head_dim from hidden_size / num_attention_heads (no config field), so no config describes a
        head-pruned language model."""
        if stage != "prune" or config is None:
            return super().check_stage(stage, config, data)
        name, where = self.display_name, self.source or None
        fix = f"prune only the language model's MLP neurons of a {name} model (--text-mlp)"
        if getattr(config, "vision_heads", 0):
            raise UnsupportedModelError(
                f"pruning {name}'s vision heads is not supported: its vision blocks have one fused qkv projection "
                "(heads cannot be cut out of q, k and v separately)",
                where=where,
                fix=fix,
            )
        if getattr(config, "vision_mlp", 0) or getattr(config, "vision_drop_layers", 0):
            raise UnsupportedModelError(
                f"pruning {name}'s vision tower is not supported yet: its blocks run all of an image's patches "
                "packed as [patches, dim] (native resolution, no batch axis), which the pruning statistics and the "
                "reload record do not describe",
                where=where,
                fix=fix,
            )
        if getattr(config, "text_heads", 0) and not self._text_heads_prunable():
            raise UnsupportedModelError(
                f"pruning {name}'s language-model heads is not supported: its text attention takes head_dim as "
                "hidden_size / num_attention_heads (there is no head_dim field, and transformers requires heads x "
                "head_dim == hidden_size), so no config describes a head-pruned language model",
                where=where,
                fix=fix,
            )
        return None

    def _text_heads_prunable(self) -> bool:
        """Whether a config describes a head-pruned language model (Qwen2: no, head_dim is derived)."""
        return False

    def patches_per_image(self) -> int:
        """Native resolution: the tower sees merge² patches per language-model token (at ``max_pixels``)."""
        return self.tokens_per_image() * self._merge() ** 2

    def attention_blocks(self) -> list[AttentionBlock]:
        """The language model's attention (Qwen2: separate q/k/v with biases, o_proj); the vision tower's fused-qkv
        blocks are not described (:meth:`check_stage` refuses pruning them)."""
        return qkvo_attention_blocks("text", self.language_model().layers)

    def mlp_blocks(self) -> list[MLPBlock]:
        """The language model's SwiGLU MLPs (gate + up → down)."""
        return [MLPBlock("text", i, [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj)
                for i, layer in enumerate(self.language_model().layers)]  # fmt: skip

    def text_scale_groups(self) -> list[ScaleGroup]:
        from edgelvm.models.llama_family import llama_scale_groups

        return llama_scale_groups(self.language_model())  # Qwen2 layers: the Llama layout (q/k/v biases included)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL (``qwen2_5_vl``): Qwen2-VL's layout with RMSNorm / SwiGLU vision blocks, an RMSNorm merger and
    window attention — all blocks but ``fullatt_block_indexes`` attend within ``window_size``-pixel windows of the
    patches reordered window by window. The runtime computes the window order and each patch's window from the
    grid (``tiling_params.window_size``) and feeds them to the vision graph (``window_index``, ``window_ids``)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    display_name = "Qwen2.5-VL"

    @classmethod
    def load_processor(cls, source: str) -> Any:
        from transformers import Qwen2_5_VLProcessor

        return load_processor_without_video(source, Qwen2_5_VLProcessor)

    def _check_text_model(self) -> None:
        super()._check_text_model()
        vc = self.config.vision_config
        if vc.window_size % (vc.patch_size * vc.spatial_merge_size):
            raise UnsupportedModelError(
                f"window_size {vc.window_size} is not a multiple of patch_size x spatial_merge_size "
                f"({vc.patch_size * vc.spatial_merge_size})",
                where=self.source or None,
                fix="use a checkpoint whose vision window is a whole number of merged patches",
            )

    def _window_size(self) -> int | None:
        return int(self.config.vision_config.window_size)

"""Qwen3-VL (``qwen3_vl``, ``Qwen3VLForConditionalGeneration``, dense sizes): Qwen2-VL's native-resolution layout
with a learned vision position table, DeepStack and interleaved M-RoPE.

What it shares with Qwen2-VL (:class:`~edgelvm.models.qwen2_vl.Qwen2VLAdapter`, subclassed): ``smart_resize`` +
merge-block-ordered patches (``Qwen2VLImageProcessorPil``, here 16-px patches merged 2×2; manifest ``preprocess.tiling
= "native"``), the one-image vision graph with the patches' (row, column) for the tower's 2-D rotary, M-RoPE
positions computed in the runtime (``positions.kind = "mrope"``: ``get_rope_index`` gives an image the same
(t, h, w) positions as Qwen2-VL's), the portable decoder only (the fused decoder's rotary is 1-D).

What it adds:

- **the tower's own position scheme**: besides the 2-D rotary, a learned ``side x side`` position table
  (``num_position_embeddings``) bilinearly resampled to each image's patch grid. The runtime computes each patch's
  four table rows and weights (``tiling_params.position_table_side``; bitwise equal to transformers') and the graph
  sums the rows: inputs ``vision_pos_indices [N, 4]``, ``vision_pos_weights [N, 4]``.
- **DeepStack**: the outputs of the vision blocks ``deepstack_visual_indexes`` go, each through its own merger, to
  decoder layers 0, 1, …: layer ``i`` adds feature ``i`` to its output at the image-token positions. The vision graph
  returns ``[tokens, (1 + L) * E]`` (token embeddings, then the L features) and the decoder graph takes
  ``deepstack_embeds [B, S, L, E]`` — zeros at text positions, padding and generated tokens, so adding it at every
  position is exact (manifest ``preprocess.deepstack``; ``runtime/images/deepstack.py``).
- **interleaved M-RoPE**: the text rotary interleaves the t / h / w frequencies (``mrope_section``) instead of
  concatenating them; it is inside the traced language model, so the runtime's positions are Qwen2-VL's.

DeepStack is optional (:attr:`Qwen3VLAdapter.deepstack`): Qwen3.5's tower is this one without it, so a subclass
that sets it False keeps the vision wrapper, the image rule and the positions and gets a plain decoder.

Text model: Qwen3 layers (q_norm / k_norm on each head after q_proj / k_proj, explicit ``head_dim``, no q/k/v
biases). AWQ's scale groups fold exactly: the norms act after the projections, so scaling their inputs does not
reach them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec
from edgelvm.models.base import VLMAdapter
from edgelvm.models.processors import load_processor_without_video
from edgelvm.models.qwen2_vl import Qwen2VLAdapter, _QwenVisionEncoder

#: The decoder graph's DeepStack input (between ``position_ids`` and the past tensors).
DEEPSTACK_INPUT = "deepstack_embeds"


class _DeepstackDecoder:
    """Factory for the export-facing decoder with DeepStack inputs (lazy: importing this file never imports torch)."""

    @staticmethod
    def build(language_model: Any, lm_head: Any, text_config: Any) -> Any:
        import torch

        from edgelvm.models.export_wrappers import DecoderForExport, split_logits_keep

        if not callable(getattr(language_model, "_deepstack_process", None)):
            raise UnsupportedModelError(
                f"this transformers' {type(language_model).__name__} has no _deepstack_process, through which "
                "edgelvm adds the DeepStack features",
                fix="install the transformers version in constraints.txt",
            )

        def dense(hidden: torch.Tensor, _mask: Any, embeds: torch.Tensor) -> torch.Tensor:
            return hidden + embeds.to(hidden.dtype)  # zeros at text positions: x + 0 is x

        class DeepstackDecoder(DecoderForExport):
            """``(inputs_embeds, attention_mask, position_ids [3, B, S], deepstack_embeds [B, S, L, E], *past,
            [logits_keep]) -> (logits, *present)``: ``Qwen3VLTextModel.forward`` with ``deepstack_visual_embeds``,
            its masked addition (``hidden[visual_pos_masks] += embeds``, a data-dependent shape torch.export cannot
            trace) replaced for the call by a dense one over per-position features that are zero off the image
            tokens."""

            def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        deepstack_embeds: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
                past, keep = split_logits_keep(rest)
                cache = self.cache_from(past)
                model = self.language_model
                model._deepstack_process = dense  # the instance attribute shadows the method for this call only
                try:
                    out = model(
                        inputs_embeds=inputs_embeds,
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        cache=cache,
                        use_cache=True,
                        visual_pos_masks=None,
                        deepstack_visual_embeds=list(deepstack_embeds.unbind(2)),
                    )
                finally:
                    del model._deepstack_process
                return self.outputs(self.last_logits(out.last_hidden_state, keep), cache)

        return DeepstackDecoder(language_model, lm_head, text_config).eval()


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    display_name = "Qwen3-VL"
    #: Whether the tower feeds DeepStack features into the first decoder layers (a subclass for a tower without
    #: them, e.g. Qwen3.5's, sets False: plain decoder, token embeddings only from the vision graph).
    deepstack: ClassVar[bool] = True

    @classmethod
    def plain_config_layout(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Qwen3-VL's hub configs are nested already (``text_config``, ``vision_config``)."""
        return VLMAdapter.plain_config_layout(raw)

    @classmethod
    def load_processor(cls, source: str) -> Any:
        from transformers import Qwen3VLProcessor

        return load_processor_without_video(source, Qwen3VLProcessor)

    # ---- structure ----------------------------------------------------------------------------------------------
    def deepstack_layers(self) -> list[int]:
        """The vision blocks whose outputs feed decoder layers 0, 1, … (empty without DeepStack)."""
        if not self.deepstack:
            return []
        indexes = getattr(self.config.vision_config, "deepstack_visual_indexes", None)
        return [int(i) for i in indexes] if isinstance(indexes, (list, tuple)) else []

    def vision_encoder(self) -> Any:
        return _QwenVisionEncoder.build(self.model.model.visual, windowed=False, position_table=True,
                                        deepstack=self.deepstack_layers())  # fmt: skip

    def config_parameter_counts(self) -> Any:
        """Tower (patch conv, position table, blocks, merger, the DeepStack mergers) and the Qwen3 decoder."""
        from edgelvm.models import param_counts

        return param_counts.ParameterCounts(
            vision=param_counts.qwen3_vl_vision_params(self.config.vision_config),
            decoder=param_counts.decoder_params(self.text_config, where=self.source or None),
        )

    def _position_table_side(self) -> int | None:
        return int(int(self.config.vision_config.num_position_embeddings) ** 0.5)

    def vision_input_dims(self) -> dict[str, dict[int, str]]:
        return {
            **super().vision_input_dims(),
            "vision_pos_indices": {0: "patches"},
            "vision_pos_weights": {0: "patches"},
        }

    def _width(self) -> int:
        return int(self.text_config.hidden_size)

    def _text_heads_prunable(self) -> bool:
        """Qwen3 text configs carry ``head_dim``: whole heads can be cut (q_norm / k_norm act per head)."""
        return True

    # ---- the decoder's DeepStack input --------------------------------------------------------------------------
    def decoder_module(self) -> Any:
        if not self.deepstack_layers():
            return super().decoder_module()
        return _DeepstackDecoder.build(self.language_model(), self.lm_head(), self.text_config)

    def decoder_example_inputs(self, batch: int, seq: int, dtype: Any) -> dict[str, Any]:
        """Random features at about half the positions (the other half zero: text)."""
        import torch

        layers = len(self.deepstack_layers())
        if not layers:
            return {}
        generator = torch.Generator().manual_seed(batch * 1000 + seq)
        values = torch.randn(batch, seq, layers, self._width(), generator=generator).to(dtype)
        keep = torch.rand(batch, seq, 1, 1, generator=generator) < 0.5
        return {DEEPSTACK_INPUT: values * keep}

    def decoder_input_dims(self) -> dict[str, dict[int, str]]:
        return {DEEPSTACK_INPUT: {0: "batch", 1: "seq"}} if self.deepstack_layers() else {}

    # ---- plain data for the bundle ------------------------------------------------------------------------------
    def positions_spec(self) -> dict[str, Any]:
        return {**super().positions_spec(), "mrope_interleaved": True}  # informative: applied in the graph

    def preprocess_spec(self) -> PreprocessSpec:
        spec = super().preprocess_spec()
        layers = self.deepstack_layers()
        if layers:
            spec.deepstack = {"input": DEEPSTACK_INPUT, "layers": len(layers), "feature_dim": self._width()}
        return spec

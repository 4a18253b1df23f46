"""LLaVA (llava-hf layout): CLIP or SigLIP tower → feature layer/strategy select → MLP projector → Llama-type LLM.

Each ``<image>`` placeholder in the prompt is expanded to ``tokens_per_image`` copies whose embeddings are replaced,
in order, by the projected image features (no tiling, 1-D positions).
"""

from __future__ import annotations

from typing import Any

from edgelvm.errors import ExportError
from edgelvm.models.base import AttentionBlock, MLPBlock, VLMAdapter, qkvo_attention_blocks
from edgelvm.models.checkpoint.quantized import fused_decoder_int4


class LlavaLayout:
    """The compression stages' view of a llava-hf layout, for adapters of such models (a mixin, before
    :class:`VLMAdapter`): ``model.model.vision_tower`` a CLIP / SigLIP-style tower (q/k/v/out_proj attention,
    fc1 → fc2 MLPs), ``model.model.multi_modal_projector`` the projector and a Llama-style language model
    (q/k/v/o_proj attention, gate/up → down MLPs)."""

    model: Any

    def language_model(self) -> Any:
        return self.model.model.language_model

    def layer_stacks(self) -> dict[str, Any]:
        tower = self.model.model.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder  # transformers 5 dropped the .vision_model level
        return {"vision": encoder.layers, "text": self.language_model().layers}

    def image_feature_module(self) -> Any:
        return self.model.model.multi_modal_projector

    def attention_blocks(self) -> list[AttentionBlock]:
        stacks = self.layer_stacks()
        vision = qkvo_attention_blocks("vision", stacks["vision"], out="out_proj")  # CLIP / SigLIP
        return vision + qkvo_attention_blocks("text", stacks["text"])

    def mlp_blocks(self) -> list[MLPBlock]:
        blocks = []
        for side, stack in self.layer_stacks().items():
            for i, layer in enumerate(stack):
                mlp = layer.mlp
                if side == "text":
                    blocks.append(MLPBlock(side, i, [mlp.gate_proj, mlp.up_proj], mlp.down_proj))
                else:
                    blocks.append(MLPBlock(side, i, [mlp.fc1], mlp.fc2))
        return blocks

    def sub_configs(self, config: Any | None = None) -> dict[str, Any]:
        config = config if config is not None else self.model.config
        return {"vision": config.vision_config, "text": config.text_config}


class _LlavaVisionEncoder:
    """Factory for the export-facing vision module (kept lazy so that importing this file never imports torch)."""

    @staticmethod
    def build(llava_model: Any) -> Any:
        import torch

        class LlavaVisionEncoder(torch.nn.Module):
            """pixel_values -> projected image features ``[N, T, E]``.

            Mirrors ``LlavaModel.get_image_features`` but keeps the batch as a tensor dimension (transformers
            returns a per-image list, which would make torch.export specialise the batch size).
            """

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.vision_tower = inner.vision_tower
                self.projector = inner.multi_modal_projector
                layer = inner.config.vision_feature_layer
                self.layers = [layer] if isinstance(layer, int) else list(layer)
                self.drop_cls = inner.config.vision_feature_select_strategy == "default"

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
                selected = [out.hidden_states[i] for i in self.layers]
                if self.drop_cls:
                    selected = [h[:, 1:] for h in selected]
                features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
                return self.projector(features)

        return LlavaVisionEncoder(llava_model.model).eval()


class LlavaAdapter(LlavaLayout, VLMAdapter):
    family = "llava"
    model_types = ("llava",)
    supported_text_models = ("llama", "qwen2", "mistral")

    def _check_text_model(self) -> None:
        super()._check_text_model()
        _, token_id = self.image_token()
        if self.config.image_token_id != token_id:
            # transformers then finds no placeholder and silently ignores the image; the export would not.
            raise ExportError(
                f"config.image_token_id is {self.config.image_token_id} but the tokenizer's image token is id "
                f"{token_id}",
                where=self.source or None,
                fix="set image_token_id in config.json to the tokenizer's <image> id",
            )

    def vision_encoder(self) -> Any:
        return _LlavaVisionEncoder.build(self.model)

    def lm_head(self) -> Any:
        return self.model.lm_head

    def input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()

    def decoder_weights(self, max_length: int) -> Any:
        from edgelvm.models.llama_family import describe_llama_decoder

        int4 = fused_decoder_int4(self.config, self.source)
        return describe_llama_decoder(self.language_model(), self.lm_head(), self.text_config, max_length, int4)

    def text_scale_groups(self) -> list[Any]:
        from edgelvm.models.llama_family import llama_scale_groups

        return llama_scale_groups(self.language_model())

    def vision_config(self) -> Any:
        return self.model.config.vision_config

    def config_parameter_counts(self) -> Any:
        """CLIP / SigLIP tower + the two-layer projector (input: the selected layers' features side by side) and a
        Llama-style decoder, from the config (LLaVA-NeXT / OneVision's ``image_newline`` is in neither graph)."""
        from edgelvm.models.param_counts import ParameterCounts, clip_like_vision_params, decoder_params, linear

        cfg, tc = self.config, self.text_config
        layer = cfg.vision_feature_layer
        width = cfg.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))
        bias = bool(getattr(cfg, "multimodal_projector_bias", True))
        projector = linear(width, tc.hidden_size, bias) + linear(tc.hidden_size, tc.hidden_size, bias)
        vision = clip_like_vision_params(cfg.vision_config, where=self.source or None) + projector
        return ParameterCounts(vision=vision, decoder=decoder_params(tc, where=self.source or None))

    def tokens_per_image(self) -> int:
        vc = self.vision_config()
        patches = (vc.image_size // vc.patch_size) ** 2
        has_cls = vc.model_type.startswith("clip")
        strategy = self.model.config.vision_feature_select_strategy
        return patches + (1 if has_cls else 0) - (1 if strategy == "default" else 0)

    def example_pixel_values(self, batch: int) -> Any:
        import torch

        vc = self.vision_config()
        dtype = next(self.model.parameters()).dtype
        return torch.randn(batch, vc.num_channels, vc.image_size, vc.image_size, dtype=dtype)

"""LLaVA (llava-hf layout): CLIP or SigLIP tower → feature layer/strategy select → MLP projector → Llama-type LLM.

Each ``<image>`` placeholder in the prompt is expanded to ``tokens_per_image`` copies whose embeddings are replaced,
in order, by the projected image features (no tiling, 1-D positions).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from edgelvm.errors import ExportError
from edgelvm.models import token_reduction
from edgelvm.models.base import AttentionBlock, MLPBlock, VLMAdapter, qkvo_attention_blocks
from edgelvm.models.checkpoint.quantized import fused_decoder_int4
from edgelvm.models.token_reduction import TokenReduction

log = logging.getLogger(__name__)


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
    def build(llava_model: Any, reduction: TokenReduction | None = None) -> Any:
        import torch

        class LlavaVisionEncoder(torch.nn.Module):
            """pixel_values -> projected image features ``[N, T, E]``.

            Mirrors ``LlavaModel.get_image_features`` but keeps the batch as a tensor dimension (transformers
            returns a per-image list, which would make torch.export specialise the batch size). With a
            ``reduction`` (``--image-tokens``) only its ``tokens_per_image`` highest-scoring tokens are projected,
            in raster order (:mod:`edgelvm.models.token_reduction`).
            """

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.vision_tower = inner.vision_tower
                self.projector = inner.multi_modal_projector
                layer = inner.config.vision_feature_layer
                self.layers = [layer] if isinstance(layer, int) else list(layer)
                self.drop_cls = inner.config.vision_feature_select_strategy == "default"
                self.reduction = reduction
                self.has_cls = inner.config.vision_config.model_type.startswith("clip")

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                if self.reduction is not None:
                    features, scores = self.features_and_scores(pixel_values)
                    kept = token_reduction.keep_top_tokens(features, scores, self.reduction.tokens_per_image)
                    return self.projector(kept)
                out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
                selected = [out.hidden_states[i] for i in self.layers]
                if self.drop_cls:
                    selected = [h[:, 1:] for h in selected]
                features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
                return self.projector(features)

            def features_and_scores(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                """Every selected tower token ``[N, T, C]`` (before the projector) and its score ``[N, T]``: the
                attention it gets in the layer ``reduction.vision_layer``, recomputed from that layer's input; a
                CLS token the strategy keeps scores +inf (always kept)."""
                assert self.reduction is not None
                out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
                selected = [out.hidden_states[i] for i in self.layers]
                tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
                index = self.reduction.vision_layer
                scores = token_reduction.attention_scores(
                    tower.encoder.layers[index], out.hidden_states[index], self.reduction.score
                )
                if self.drop_cls:
                    selected, scores = [h[:, 1:] for h in selected], scores[:, 1:]
                elif self.has_cls:
                    scores = torch.cat([torch.full_like(scores[:, :1], float("inf")), scores[:, 1:]], dim=1)
                features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
                return features, scores

            def align_to_graph(self, got: Any, pixel_values: torch.Tensor) -> torch.Tensor:
                """The export parity check's reference for the graph's output ``got``: PyTorch's features at the
                tokens the graph kept, when they are a valid top-N (a near tie may rank the other way in ONNX
                Runtime): :func:`~edgelvm.models.token_reduction.reference_at_graph_tokens`."""
                assert self.reduction is not None
                features, scores = self.features_and_scores(pixel_values)
                full = self.projector(features)
                return token_reduction.reference_at_graph_tokens(full, scores, got, self.reduction.tokens_per_image)

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

    #: Set on the copy :meth:`with_image_tokens` returns: the vision graph keeps this many tokens per image.
    image_token_reduction: TokenReduction | None = None

    def vision_encoder(self) -> Any:
        return _LlavaVisionEncoder.build(self.model, self.image_token_reduction)

    def with_image_tokens(self, value: int | float) -> tuple[LlavaAdapter, TokenReduction | None]:
        """A copy of this adapter whose vision graph keeps ``value`` image tokens per image (a count, or a fraction
        of :meth:`tokens_per_image`) chosen by the tower's attention, and what it applies; ``(self, None)`` when that
        is every token. The copy shares the model: the loaded adapter is unchanged.

        The score is the attention in the layer that produces the features (the deepest of a list of feature
        layers: its tokens are the same positions in every listed layer). Refused where the image tokens are not
        one fixed-count run with 1-D positions (a subclass that tiles or builds its own vision graph)."""
        spec = self.preprocess_spec()
        if spec.tiling != "none" or spec.image_placement != "placeholder" or self.positions_spec()["kind"] != "1d":
            raise token_reduction.refuse(self.family, "its image tokens are not one fixed-count run with 1-D positions")
        if type(self).vision_encoder is not LlavaAdapter.vision_encoder:
            raise token_reduction.refuse(self.family, "its adapter builds a vision graph of its own")
        full = self.tokens_per_image()
        keep = token_reduction.resolve_image_tokens(value, full)
        if keep == full:
            log.info("%s %s keeps all %d tokens per image: nothing to reduce", token_reduction.OPTION, value, full)
            return self, None
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        feature_layers = self.config.vision_feature_layer
        feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        deepest = max(i % (len(layers) + 1) for i in feature_layers)  # as an index of hidden_states
        if deepest == 0:
            raise token_reduction.refuse(
                self.family, "its features are the patch embeddings (vision_feature_layer 0): no attention ranks them"
            )
        layer = layers[deepest - 1]
        attention = getattr(layer, "self_attn", None)
        if not all(hasattr(attention, a) for a in ("q_proj", "k_proj", "head_dim", "scale")) or not hasattr(
            layer, "layer_norm1"
        ):
            raise token_reduction.refuse(
                self.family, f"its {type(layer).__name__} is not a CLIP / SigLIP layer (layer_norm1, q/k projections)"
            )
        has_cls = self.vision_config().model_type.startswith("clip")
        score = token_reduction.CLS_ATTENTION if has_cls else token_reduction.MEAN_ATTENTION
        reduced = copy.copy(self)
        reduced.image_token_reduction = TokenReduction(keep, full, score, deepest - 1)
        return reduced, reduced.image_token_reduction

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
        if self.image_token_reduction is not None:  # the reducing copy's vision graph keeps this many
            return self.image_token_reduction.tokens_per_image
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

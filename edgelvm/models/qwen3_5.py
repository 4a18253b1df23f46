"""Qwen3.5 (``qwen3_5``, ``Qwen3_5ForConditionalGeneration``, the small natively multimodal sizes): Qwen3-VL's
tower without DeepStack, and a hybrid language model.

The tower, the image rule (native resolution, 16-px patches merged 2×2, the learned position table) and the M-RoPE
positions are Qwen3-VL's (:class:`~edgelvm.models.qwen3_vl.Qwen3VLAdapter`, subclassed with ``deepstack = False``).

The language model interleaves Gated DeltaNet layers (linear attention: a short causal convolution over q/k/v, then
the gated delta rule on a ``[value_heads, key_dim, value_dim]`` state) with gated full-attention layers (every
``full_attention_interval``-th; ``q_proj`` also yields a sigmoid output gate, q/k RMS-normed per head, partial
interleaved M-RoPE). The bundle describes it as data: the KV cache covers the attention layers only
(``kv_cache.layers``) and each linear layer carries two fixed-size states (``kv_cache.states``: ``conv`` and
``recurrent``), so memory is constant in context length for three of every four layers. The decoder graph is
:class:`~edgelvm.models.hybrid_decoder.HybridDecoderForExport` (portable graph only: the fused decoder is written for
Llama-family layers).

Stages: INT4 RTN / GPTQ of the language model's linears (AWQ / SmoothQuant need scale groups, not described for the
linear-attention layers); INT8 vision. Pruning and derived students are refused (below).
"""

from __future__ import annotations

from typing import Any, ClassVar

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import KVCacheSpec, StateSpec
from edgelvm.models.base import AttentionBlock, MLPBlock, ScaleGroup, VLMAdapter
from edgelvm.models.qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)
    display_name = "Qwen3.5"
    deepstack: ClassVar[bool] = False
    text_layer_kinds: ClassVar[tuple[str, ...]] = ("full_attention", "linear_attention")

    #: Counted on the meta device: the hybrid layers have no arithmetic rule in param_counts (yet).
    config_parameter_counts = VLMAdapter.config_parameter_counts

    # ---- the hybrid decoder ---------------------------------------------------------------------------------------
    def attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.text_config.layer_types) if kind == "full_attention"]

    def kv_cache_spec(self, max_length: int, dtype: str) -> KVCacheSpec:
        """Keys and values of the attention layers; a convolution state (the model's dtype) and a recurrent state
        (fp32, as transformers keeps it) per linear layer."""
        from edgelvm.models.hybrid_decoder import hybrid_state_shapes

        cfg = self.text_config
        states = [StateSpec(layer=layer, kind=kind, shape=shape, dtype=dtype if kind == "conv" else "float32")
                  for layer, kind, shape in hybrid_state_shapes(cfg)]  # fmt: skip
        layers = self.attention_layers()
        return KVCacheSpec(num_layers=len(layers), num_kv_heads=int(cfg.num_key_value_heads),
                           head_dim=int(cfg.head_dim), dtype=dtype, max_length=max_length, layers=layers,
                           states=states)  # fmt: skip

    def decoder_module(self) -> Any:
        from edgelvm.models.hybrid_decoder import HybridDecoderForExport

        return HybridDecoderForExport(self.language_model(), self.lm_head(), self.text_config).eval()

    def decoder_weights(self, max_length: int) -> Any:
        raise UnsupportedModelError(
            "no fused decoder for Qwen3.5: its Gated DeltaNet layers and gated attention are outside the fused "
            "decoder's Llama-family layers (and its rotary is M-RoPE)",
            where=self.source or None,
            fix="export with --decoder portable (auto does this)",
        )

    # ---- compression stages ---------------------------------------------------------------------------------------
    def _prune_refusal(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            "pruning Qwen3.5 is not supported: a Gated DeltaNet layer's heads run through in_proj_qkv, the "
            "depthwise convolution, the gated norm and in_proj_a/b together, and the attention layers' q_proj also "
            "produces the output gate; neither is described to the pruner yet",
            where=self.source or None,
            fix="quantize instead (`edgelvm quantize --llm rtn` or gptq, `--vision int8`)",
        )

    def check_stage(self, stage: str, config: Any = None, data: Any = None) -> None:
        if stage == "prune":
            raise self._prune_refusal()
        return super().check_stage(stage, config, data)

    def attention_blocks(self) -> list[AttentionBlock]:
        raise self._prune_refusal()

    def mlp_blocks(self) -> list[MLPBlock]:
        raise self._prune_refusal()

    def text_scale_groups(self) -> list[ScaleGroup]:
        raise UnsupportedModelError(
            "Qwen3.5's scale groups are not described: in a Gated DeltaNet layer the RMSNorm feeds in_proj_qkv / z / "
            "a / b, whose outputs pass through a convolution, an L2 norm and a gated norm",
            where=self.source or None,
            fix="use --llm rtn or --llm gptq",
        )

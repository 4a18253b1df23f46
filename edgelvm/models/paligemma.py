"""PaliGemma (``paligemma``, ``PaliGemmaForConditionalGeneration``): SigLIP → linear projector → Gemma.

Prompt: ``PaliGemmaProcessor`` builds ``image_seq_length`` image tokens, then BOS, the prompt and ``"\\n"`` (its
tokenizer adds no special tokens itself). The manifest says so as data: ``preprocess.image_placement = "prefix"``
(one image per prompt, its tokens before the encoded prompt) and ``tokenizer.prompt_prefix`` / ``prompt_suffix``
(BOS / ``"\\n"`` around the rendered prompt). The google checkpoints have no chat template: the prompt is used as
given (``"caption en"``, ``"answer en What is ..."``).

Attention is prefix-LM: HF lets the image + prompt tokens (``token_type_ids == 0``) attend to each other
bidirectionally on the first forward pass, and generated tokens attend causally. The exported decoder
(:func:`_PrefixLMDecoder`) has no causal mask at all: every token of one step attends to all real tokens of the
cache and of the step. A prompt prefilled in one step from an empty cache is then exactly HF's bidirectional block,
and a one-token decode step is causal. The manifest's ``attention = "prefix_lm"`` tells the runtime never to split a
prompt's prefill (no shared batch prefix, no chat-cache reuse). The same graph adds PaliGemma's position offset
(HF's positions are ``cumsum(mask)``, 1-based; the runtime's are 0-based) and, for Gemma2, the final logit
soft-capping that ``PaliGemmaForConditionalGeneration`` applies outside the text model.

Embeddings: Gemma's embedding module multiplies by ``sqrt(hidden_size)``; image features are spliced in unscaled.
The bundle's table is the embedding module's output (export writes what the module returns), so the runtime's
spliced rows equal HF's ``inputs_embeds``.

Gemma is outside the fused decoder's Llama family (GeLU MLP, ``1 + weight`` RMSNorm, scaled embeddings): bundles
carry the portable decoder only.
"""

from __future__ import annotations

from typing import Any

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec, TokenizerSpec
from edgelvm.models.base import ScaleGroup, VLMAdapter
from edgelvm.models.llava import LlavaLayout


class _PaliGemmaVisionEncoder:
    """Factory for the export-facing vision module (lazy: importing this file never imports torch)."""

    @staticmethod
    def build(paligemma_model: Any) -> Any:
        import torch

        class PaliGemmaVisionEncoder(torch.nn.Module):
            """pixel_values -> SigLIP last hidden state -> linear projector (``PaliGemmaModel.get_image_features``)."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.vision_tower = inner.vision_tower
                self.projector = inner.multi_modal_projector

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                return self.projector(self.vision_tower(pixel_values, return_dict=True).last_hidden_state)

        return PaliGemmaVisionEncoder(paligemma_model.model).eval()


def _prefix_lm_decoder(language_model: Any, lm_head: Any, text_config: Any) -> Any:
    """The decoder module with PaliGemma's masking, position offset and logit soft-capping (see the module doc)."""
    import torch

    from edgelvm.models.export_wrappers import DecoderForExport, split_logits_keep

    class PrefixLMDecoder(DecoderForExport):
        """``DecoderForExport``'s interface; every token of a step attends to every real token of the cache and of
        the step (a ``[batch, 1, seq, past + seq]`` additive mask from the padding mask alone). Gemma2's local
        layers get the same mask: the context is at most their sliding window (``kv_cache_spec``), inside which
        HF's window hides nothing."""

        def __init__(self) -> None:
            super().__init__(language_model, lm_head, text_config)
            self.softcap = getattr(text_config, "final_logit_softcapping", None)

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
            past, keep = split_logits_keep(rest)
            seq, total = inputs_embeds.shape[1], attention_mask.shape[1]
            real = attention_mask.bool()[:, None, None, :].expand(-1, 1, seq, total)
            zero = torch.zeros((), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
            mask = torch.where(real, zero, torch.finfo(inputs_embeds.dtype).min)  # a 4-D mask is used as given
            cache = self.cache_from(past)
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                position_ids=position_ids + 1,  # PaliGemma's positions are 1-based
                cache=cache,
                use_cache=True,
            )
            logits = self.last_logits(out.last_hidden_state, keep)
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return self.outputs(logits, cache)

    return PrefixLMDecoder().eval()


#: Renders a conversation for calibration / distillation batches only (:meth:`PaliGemmaAdapter.conversation_template`,
#: passed per call, never set on the processor), for checkpoints without a template (the google ones): the user's
#: text, then each answer after a "\n", which the processor wraps in BOS … "\n" as PaliGemma's prefix "prompt\n" +
#: suffix. Never shipped to the runtime: bundles keep the checkpoint's own template (none), and a checkpoint that an
#: older edgelvm saved with this one (prune / quantize outputs) is recognised as having none.
CALIBRATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '\\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)


class PaliGemmaAdapter(LlavaLayout, VLMAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    supported_text_models = ("gemma", "gemma2")

    def __init__(self, model: Any, processor: Any, source: str = "") -> None:
        template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
        self._checkpoint_template = None if template == CALIBRATION_TEMPLATE else template
        super().__init__(model, processor, source)

    def conversation_template(self) -> str | None:
        return self._checkpoint_template or CALIBRATION_TEMPLATE

    def _check_text_model(self) -> None:
        super()._check_text_model()
        where = self.source or None
        token, token_id = self.image_token()
        if self.config.image_token_id != token_id:
            raise UnsupportedModelError(
                f"config.image_token_index is {self.config.image_token_id} but the tokenizer's {token!r} is id "
                f"{token_id}",
                where=where,
                fix="set image_token_index in config.json to the tokenizer's <image> id",
            )
        seq_length = getattr(self.processor, "image_seq_length", None)
        if seq_length != self.tokens_per_image():
            raise UnsupportedModelError(
                f"the processor inserts {seq_length} image tokens but the vision tower yields "
                f"{self.tokens_per_image()} features",
                where=where,
                fix="set image_seq_length in preprocessor_config.json to (image_size / patch_size)^2",
            )
        text = self.text_config
        if self.config.vision_config.projection_dim != text.hidden_size:
            raise UnsupportedModelError(
                f"the projector writes {self.config.vision_config.projection_dim} features but the language model's "
                f"hidden size is {text.hidden_size}",
                where=where,
                fix="set projection_dim in config.json to text_config.hidden_size",
            )
        if getattr(text, "sliding_window", None) is not None and "sliding_attention" in (text.layer_types or []):
            self._sliding_window = int(text.sliding_window)

    # ---- structure ----------------------------------------------------------------------------------------------
    def vision_encoder(self) -> Any:
        return _PaliGemmaVisionEncoder.build(self.model)

    def config_parameter_counts(self) -> Any:
        """SigLIP + the one-linear projector (to ``projection_dim``) and the Gemma decoder, from the config."""
        from edgelvm.models.param_counts import ParameterCounts, clip_like_vision_params, decoder_params, linear

        cfg, where = self.config, self.source or None
        vc = cfg.vision_config
        projector = linear(vc.hidden_size, getattr(vc, "projection_dim", None) or cfg.projection_dim)
        return ParameterCounts(
            vision=clip_like_vision_params(vc, where=where) + projector,
            decoder=decoder_params(self.text_config, where=where),
        )

    def lm_head(self) -> Any:
        return self.model.lm_head

    def input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()  # scales by sqrt(hidden_size) in forward

    def decoder_module(self) -> Any:
        return _prefix_lm_decoder(self.language_model(), self.lm_head(), self.text_config)

    def attention_kind(self) -> str:
        return "prefix_lm"

    def kv_cache_spec(self, max_length: int, dtype: str) -> Any:
        window = getattr(self, "_sliding_window", None)
        if window is not None and max_length > window:
            # transformers' cache keeps only the last `window` positions of a sliding layer: its present tensors
            # would stop growing, which the bundle's per-layer [batch, heads, length, dim] contract cannot say.
            raise UnsupportedModelError(
                f"max_length {max_length} exceeds the sliding window ({window}) of this Gemma2's local layers",
                where=self.source or None,
                fix=f"export with --max-length {window} or less",
            )
        return super().kv_cache_spec(max_length, dtype)

    def tokens_per_image(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def example_pixel_values(self, batch: int) -> Any:
        import torch

        vc = self.config.vision_config
        dtype = next(self.model.parameters()).dtype
        return torch.randn(batch, vc.num_channels, vc.image_size, vc.image_size, dtype=dtype)

    def preprocess_spec(self) -> PreprocessSpec:
        spec = super().preprocess_spec()  # SiglipImageProcessor: exact resize → rescale → normalize
        spec.image_placement = "prefix"
        return spec

    def tokenizer_spec(self, file: str) -> TokenizerSpec:
        # PaliGemmaProcessor turns off the tokenizer's own BOS and writes "<image>"*n + BOS + prompt + "\n".
        spec = super().tokenizer_spec(file)
        spec.chat_template = self._checkpoint_template
        spec.prompt_prefix = self.processor.tokenizer.bos_token or ""
        spec.prompt_suffix = "\n"
        spec.add_special_tokens = False
        return spec

    # ---- structure for the compression stages: the llava-hf layout (LlavaLayout), SigLIP's and Gemma's names ----
    def text_scale_groups(self) -> list[ScaleGroup]:
        """Per Gemma layer: up → down (the GeLU gate multiplies up's output elementwise) and, without GQA, v → o.
        No norm → q/k/v or norm → gate/up groups: Gemma's RMSNorm multiplies by ``1 + weight``, which dividing its
        weight by a scale does not fold exactly; those linears are quantized unscaled (with AWQ's clip search)."""
        groups = []
        for i, layer in enumerate(self.language_model().layers):
            attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
            if attn.v_proj.out_features == attn.o_proj.in_features:
                groups.append(ScaleGroup(attn.v_proj, "linear", {p + "self_attn.o_proj": attn.o_proj}))
            groups.append(ScaleGroup(mlp.up_proj, "linear", {p + "mlp.down_proj": mlp.down_proj}))
        return groups

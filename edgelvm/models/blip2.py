"""BLIP-2 (``blip-2``, ``Blip2ForConditionalGeneration``) with a decoder-only OPT language model.

An image goes through a ViT, then the Q-Former: ``num_query_tokens`` learned queries cross-attend to the ViT's
patch features, and ``language_projection`` maps the query outputs into the language model's embedding space. The
vision graph is that whole path (``pixel_values [N, 3, H, W] -> [N, num_query_tokens, E]``). The prompt holds no
image placeholder: ``Blip2Processor`` puts ``num_query_tokens`` image tokens in front of the encoded prompt (before
BOS), one image per prompt; the manifest says so as data (``preprocess.image_placement = "prefix"``) and the runtime
builds the same ids. Images are resized to a fixed size (``BlipImageProcessor``: exact resize, rescale, normalize).

The language model is OPT: learned absolute positions (offset 2, inside the traced graph) taken from
``position_ids``, which the runtime computes from the attention mask as for Llama, so padding anywhere gives what an
unpadded row gives. OPT is outside the fused ONNX Runtime decoder's Llama family: bundles carry the portable decoder.

BLIP-2 with a T5 (encoder-decoder) language model is refused at load: the bundle's decoder contract is
decoder-only.

Prompts: the published checkpoints ship no chat template; BLIP-2 is prompted ``"Question: … Answer:"`` (the answer
follows). Records for calibration / distillation are rendered that way (:data:`QA_TEMPLATE`, passed per call, never
saved with a checkpoint nor shipped to the runtime); a checkpoint's own template, where it has one, is used instead.
"""

from __future__ import annotations

from typing import Any

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec
from edgelvm.models.base import AttentionBlock, MLPBlock, ScaleGroup, VLMAdapter

#: How BLIP-2 is prompted, as a chat template for rendering records (:meth:`Blip2Adapter.conversation_template`):
#: each user turn as ``"Question: {text}"``, each answer as ``" Answer: {text}"`` + EOS, ``" Answer:"`` as the
#: generation prompt. Image items are not rendered: the processor puts the query tokens before the whole prompt.
QA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Question: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% else %} Answer: {{ message['content'] if message['content'] is string else message['content'][0]['text'] }}"
    "{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} Answer:{% endif %}"
)


class _Blip2VisionEncoder:
    """Factory for the export-facing vision module (lazy: importing this file never imports torch)."""

    @staticmethod
    def build(blip2_model: Any) -> Any:
        import torch

        class Blip2VisionEncoder(torch.nn.Module):
            """pixel_values -> ViT -> Q-Former (learned queries cross-attending to the patches) -> projection.

            Mirrors ``Blip2ForConditionalGeneration.get_image_features`` (its all-ones image mask is left out:
            adding zeros changes nothing)."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.vision_model = inner.vision_model
                self.query_tokens = inner.query_tokens
                self.qformer = inner.qformer
                self.language_projection = inner.language_projection

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                image_embeds = self.vision_model(pixel_values, return_dict=True).last_hidden_state
                queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
                out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, return_dict=True)
                return self.language_projection(out.last_hidden_state.to(image_embeds.dtype))

        return Blip2VisionEncoder(blip2_model).eval()


class Blip2Adapter(VLMAdapter):
    family = "blip-2"
    model_types = ("blip-2",)
    supported_text_models = ("opt",)
    #: The family's name in messages.
    display_name = "BLIP-2"

    def conversation_template(self) -> str | None:
        # Blip2Processor drops a chat_template (its __init__ does not pass it on): a template kept with the tokenizer
        # is the checkpoint's (the base class reads it there); without one, BLIP-2's "Question: … Answer:".
        return super().conversation_template() or QA_TEMPLATE

    def _check_text_model(self) -> None:
        where = self.source or None
        text = self.config.text_config
        if getattr(text, "is_encoder_decoder", False) or not self.config.use_decoder_only_language_model:
            raise UnsupportedModelError(
                f"BLIP-2 with an encoder-decoder language model ({text.model_type!r}, e.g. blip2-flan-t5) is not "
                "supported: edgelvm bundles hold a decoder-only KV-cache decoder",
                where=where,
                fix="use a BLIP-2 checkpoint with an OPT language model (e.g. Salesforce/blip2-opt-2.7b)",
            )
        super()._check_text_model()
        if getattr(text, "word_embed_proj_dim", text.hidden_size) != text.hidden_size:
            raise UnsupportedModelError(
                f"OPT with word_embed_proj_dim {text.word_embed_proj_dim} != hidden_size {text.hidden_size} (its "
                "embeddings are not in the space language_projection writes to)",
                where=where,
                fix="use an OPT whose word_embed_proj_dim equals hidden_size",
            )
        token, token_id = self.image_token()
        if self.config.image_token_index != token_id:
            raise UnsupportedModelError(
                f"config.image_token_index is {self.config.image_token_index} but the tokenizer's {token!r} is id "
                f"{token_id}",
                where=where,
                fix="set image_token_index in config.json to the tokenizer's image token id",
            )
        if getattr(self.processor, "num_query_tokens", None) != self.config.num_query_tokens:
            raise UnsupportedModelError(
                f"the processor inserts {self.processor.num_query_tokens} image tokens but the model has "
                f"{self.config.num_query_tokens} queries",
                where=where,
                fix="set num_query_tokens in processor_config.json to config.json's",
            )

    # ---- structure ----------------------------------------------------------------------------------------------
    def _opt(self) -> Any:
        return self.model.language_model  # OPTForCausalLM

    def vision_encoder(self) -> Any:
        return _Blip2VisionEncoder.build(self.model)

    def language_model(self) -> Any:
        return self._opt().model.decoder  # OPTDecoder: inputs_embeds, attention_mask, position_ids, cache

    def lm_head(self) -> Any:
        return self._opt().lm_head

    def input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()

    def image_token(self) -> tuple[str, int]:
        token = getattr(self.processor, "image_token", None) or "<image>"
        token = str(getattr(token, "content", token))  # Blip2Processor keeps an AddedToken
        return token, int(self.processor.tokenizer.convert_tokens_to_ids(token))

    def tokens_per_image(self) -> int:
        return int(self.config.num_query_tokens)

    def example_pixel_values(self, batch: int) -> Any:
        import torch

        vc = self.model.config.vision_config
        dtype = next(self.model.vision_model.parameters()).dtype
        return torch.randn(batch, 3, vc.image_size, vc.image_size, dtype=dtype)

    def preprocess_spec(self) -> PreprocessSpec:
        spec = super().preprocess_spec()  # BlipImageProcessor: exact resize → rescale → normalize
        spec.image_placement = "prefix"
        return spec

    # ---- structure for the compression stages ------------------------------------------------------------------
    def layer_stacks(self) -> dict[str, Any]:
        return {"vision": self.model.vision_model.encoder.layers, "text": self.language_model().layers}

    def image_feature_module(self) -> Any:
        return self.model.language_projection

    def sub_configs(self, config: Any | None = None) -> dict[str, Any]:
        raise UnsupportedModelError(
            f"derived {self.display_name} students are not supported yet (the Q-Former's cross-attention width and "
            "the language model's sizes would have to follow the new sizes)",
            where=self.source or None,
            fix=f"distil a LLaVA-family model; {self.display_name} supports export and quantize (--llm, --vision int8)",
        )

    def attention_blocks(self) -> list[AttentionBlock]:
        raise UnsupportedModelError(
            f"pruning {self.display_name} is not supported yet (its ViT has one fused qkv projection and its "
            "Q-Former derives head_dim from hidden / heads, so a pruned model has no config to reload from)",
            where=self.source or None,
            fix=f"prune a LLaVA-family model; {self.display_name} supports export and quantize (--llm, --vision int8)",
        )

    def mlp_blocks(self) -> list[MLPBlock]:
        return self.attention_blocks()  # raises: MLP pruning comes with head pruning (the same reload record)

    def text_scale_groups(self) -> list[ScaleGroup]:
        """Per OPT layer: self_attn_layer_norm → q/k/v and final_layer_norm → fc1 (pre-LayerNorm layers only: with
        post-LN the norms do not produce the linears' inputs), v → out_proj (no GQA), and with ReLU fc1 → fc2 (the
        scales are positive and ``relu(x / s) = relu(x) / s``)."""
        relu = getattr(self.text_config, "activation_function", "relu") == "relu"
        groups = []
        for i, layer in enumerate(self.language_model().layers):
            attn, p = layer.self_attn, f"layers.{i}."
            if layer.do_layer_norm_before:
                qkv = {p + f"self_attn.{n}": getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")}
                groups.append(ScaleGroup(layer.self_attn_layer_norm, "norm", qkv))
            groups.append(ScaleGroup(attn.v_proj, "linear", {p + "self_attn.out_proj": attn.out_proj}))
            if layer.do_layer_norm_before:
                groups.append(ScaleGroup(layer.final_layer_norm, "norm", {p + "fc1": layer.fc1}))
            if relu:
                groups.append(ScaleGroup(layer.fc1, "linear", {p + "fc2": layer.fc2}))
        return groups

"""Idefics v1 (``idefics``, ``IdeficsForVisionText2Text``): Flamingo-style gated cross-attention.

A CLIP-like tower → (optionally) a perceiver resampler gives each image ``L`` states of the tower's width. The
language model (Llama-style) does not read them as tokens: before every ``cross_layer_interval``-th decoder layer a
gated cross-attention block lets each text position attend to the states of the images its row of
``image_attention_mask [B, S, num_images]`` selects (``tanh(alpha)``-gated residuals; a position that selects no
image gets no cross-attention output at all). The ``<image>`` token in the text only marks where an image appears.

The bundle says so as data: ``preprocess.image_placement = "cross_attention"`` and ``preprocess.cross_attention``
(the decoder graph's two extra inputs, ``cross_states [B, I, L, D]`` and ``cross_mask [B, S, I]``, and the rule
that builds the mask from the prompt ids: each position attends to the latest image at or before it, none after an
end-of-document token until the next image — ``IdeficsProcessor``'s ``image_attention_mask``). The runtime feeds
both every step (HF recomputes the cross-attention keys / values from the image states every step too; they are not
in the KV cache) and never splices image features into the embeddings. Generated tokens copy the mask's last
prompt row, as ``IdeficsForVisionText2Text._update_model_kwargs_for_generation`` does.

Prompt: ``IdeficsProcessor`` writes BOS, then each image as ``<fake_token_around_image><image>
<fake_token_around_image>`` (an image right after another: ``<image><fake_token_around_image>``) and each text item
stripped of spaces, and encodes without special tokens. The bundle's chat template renders exactly that from the
request's items (images first, then the prompt: ``processor(text=[[image, ..., prompt]])``).

Embeddings: ``IdeficsDecoupledEmbedding`` keeps the added tokens' rows (``additional_vocab_size``) apart; the
bundle's table is both parts concatenated, and the decoupled LM head returns logits over both.

Quantize goes through the generic path: INT4 (RTN / AWQ with the Llama scale groups / GPTQ) of the decoder layers
— the gated cross-attention blocks and the LM head stay float — and INT8 QDQ of the tower + resampler; calibration
batches are rendered with :data:`CALIBRATION_TEMPLATE`. Not supported: prune, distill (``UnsupportedModelError``),
the fused decoder (cross-attention is outside the Llama description), chat sessions (``ConfigError``) and the
TensorRT backend (``BackendError``).
"""

from __future__ import annotations

from typing import Any

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec, TokenizerSpec
from edgelvm.models.base import AttentionBlock, MLPBlock, ScaleGroup, VLMAdapter

#: The decoder graph's inputs besides the standard ones (the runtime binds them by these names, from the manifest).
CROSS_INPUTS = ("cross_states", "cross_mask")
FAKE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE = "<end_of_utterance>"
#: Renders a conversation for calibration / distillation batches only (:meth:`IdeficsAdapter.conversation_template`,
#: passed per call, never set on the processor), for checkpoints without a template: the user's text, then each
#: answer after a "\n". ``IdeficsProcessor(images=[image], text=[rendered])`` puts BOS and the image's tokens before
#: it, as the runtime's prompt. Never shipped to the runtime (the bundle's template is :func:`prompt_template`).
CALIBRATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '\\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)


def prompt_template(image_token: str, end_of_utterance: bool) -> str:
    """A chat template rendering a conversation's items the way ``IdeficsProcessor`` renders a list of items: BOS,
    images as fake-token-wrapped image tokens, text stripped of spaces (``<end_of_utterance>`` between consecutive
    texts when the tokenizer was trained with it)."""
    eou = f"{{% if ns.text %}}{END_OF_UTTERANCE}{{% endif %}}" if end_of_utterance else ""
    return (
        "{{ bos_token }}{% set ns = namespace(image=false, text=false) %}"
        "{% for message in messages %}"
        "{% if message['content'] is string %}{% set items = [{'type': 'text', 'text': message['content']}] %}"
        "{% else %}{% set items = message['content'] %}{% endif %}"
        "{% for item in items %}"
        "{% if item['type'] == 'image' %}"
        f"{{% if not ns.image %}}{FAKE_TOKEN}{{% endif %}}{image_token}{FAKE_TOKEN}"
        "{% set ns.image = true %}{% set ns.text = false %}"
        f"{{% else %}}{eou}{{{{ item['text'].strip(' ') }}}}"
        "{% set ns.image = false %}{% set ns.text = true %}"
        "{% endif %}{% endfor %}{% endfor %}"
    )


class _Modules:
    """Factories for the export-facing modules (lazy: importing this file never imports torch)."""

    @staticmethod
    def vision(inner: Any) -> Any:
        import torch

        class IdeficsVisionEncoder(torch.nn.Module):
            """pixel_values ``[N, 3, H, W]`` -> tower last hidden state -> perceiver resampler (when the model uses
            one) -> ``[N, L, D]``: what ``IdeficsModel.forward`` cross-attends to per image."""

            def __init__(self) -> None:
                super().__init__()
                self.vision_model = inner.vision_model
                self.perceiver_resampler = getattr(inner, "perceiver_resampler", None)

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                states = self.vision_model(pixel_values=pixel_values).last_hidden_state
                if self.perceiver_resampler is not None:
                    states = self.perceiver_resampler(states)
                return states

        return IdeficsVisionEncoder().eval()

    @staticmethod
    def decoder(language_model: Any, lm_head: Any, config: Any) -> Any:
        import torch

        from edgelvm.models.export_wrappers import DecoderForExport, split_logits_keep

        class IdeficsDecoder(DecoderForExport):
            """``(inputs_embeds, attention_mask, position_ids, cross_states [B, I, L, D], cross_mask [B, S, I],
            *past, [logits_keep]) -> (logits, *present)``: ``IdeficsModel.forward`` given the images' states (after the
            resampler) and the step's rows of ``image_attention_mask``."""

            def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        cross_states: torch.Tensor, cross_mask: torch.Tensor,
                        *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
                past, keep = split_logits_keep(rest)
                cache = self.cache_from(past)
                if config.use_resampler:
                    images = {"perceiver_embeddings": cross_states.flatten(0, 1)}
                else:
                    images = {"image_encoder_embeddings": cross_states}
                out = self.language_model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                    image_attention_mask=cross_mask,
                    **images,
                )
                return self.outputs(self.last_logits(out.last_hidden_state, keep), cache)

        return IdeficsDecoder(language_model, lm_head, config).eval()


class IdeficsAdapter(VLMAdapter):
    family = "idefics"
    model_types = ("idefics",)

    def conversation_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or CALIBRATION_TEMPLATE  # see CALIBRATION_TEMPLATE

    def _check_text_model(self) -> None:  # the text model is Idefics' own Llama-style decoder
        tokenizer = self.processor.tokenizer
        for token in ("<image>", FAKE_TOKEN):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise UnsupportedModelError(
                    f"the tokenizer has no {token!r} token, which IdeficsProcessor writes around every image",
                    where=self.source or None,
                    fix="use the checkpoint's own processor files (tokenizer with the Idefics special tokens)",
                )

    # ---- structure ----------------------------------------------------------------------------------------------
    def vision_encoder(self) -> Any:
        return _Modules.vision(self.model.model)

    def language_model(self) -> Any:
        return self.model.model  # IdeficsModel: its forward takes the image states and image_attention_mask

    def lm_head(self) -> Any:
        return self.model.lm_head

    def input_embeddings(self) -> Any:
        """A plain embedding over the base and the additional (decoupled) rows, in id order."""
        import torch

        embed = self.model.model.embed_tokens
        weight = embed.weight
        extra = getattr(embed, "additional_embedding", None)
        if extra is not None and embed.num_additional_embeddings > 0:
            weight = torch.cat([weight, extra.weight])
        return torch.nn.Embedding.from_pretrained(weight.detach(), freeze=True)

    def tokens_per_image(self) -> int:
        if self.config.use_resampler:
            return int(self.config.perceiver_config.resampler_n_latents)
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + 1  # patches + CLS

    def example_pixel_values(self, batch: int) -> Any:
        import torch

        vc = self.config.vision_config
        dtype = next(self.model.parameters()).dtype
        return torch.randn(batch, vc.num_channels, vc.image_size, vc.image_size, dtype=dtype)

    def vision_inputs(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        pixels = batch.get("pixel_values")  # [B, max_images, 3, H, W], missing images zero
        if pixels is None:
            return []
        pixels = pixels.flatten(0, 1)
        return [{"pixel_values": pixels[pixels.abs().amax(dim=(1, 2, 3)) > 0]}]

    def decoder_module(self) -> Any:
        return _Modules.decoder(self.language_model(), self.lm_head(), self.text_config)

    def decoder_example_inputs(self, batch: int, seq: int, dtype: Any) -> dict[str, Any]:
        """Random image states for 2 images per row and a 0/1 mask in which some positions select no image."""
        import torch

        width = int(self.config.vision_config.embed_dim)
        states = torch.randn(batch, 2, self.tokens_per_image(), width, dtype=dtype)
        mask = torch.randint(0, 2, (batch, seq, 2), dtype=torch.int64)
        mask[:, 0] = 0
        return {CROSS_INPUTS[0]: states, CROSS_INPUTS[1]: mask}

    def decoder_input_dims(self) -> dict[str, dict[int, str]]:
        return {CROSS_INPUTS[0]: {0: "batch", 1: "images"}, CROSS_INPUTS[1]: {0: "batch", 1: "seq", 2: "images"}}

    # ---- plain data for the bundle ------------------------------------------------------------------------------
    def image_token(self) -> tuple[str, int]:
        return "<image>", int(self.processor.tokenizer.convert_tokens_to_ids("<image>"))

    def preprocess_spec(self) -> PreprocessSpec:
        spec = super().preprocess_spec()  # IdeficsImageProcessorPil: exact bicubic resize → rescale → normalize
        spec.image_placement = "cross_attention"
        tokenizer = self.processor.tokenizer
        spec.cross_attention = {
            "inputs": list(CROSS_INPUTS),
            "mask_rule": "latest_image",
            "reset_token_ids": [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [],
            "feature_dim": int(self.config.vision_config.embed_dim),
        }
        return spec

    def tokenizer_spec(self, file: str) -> TokenizerSpec:
        spec = super().tokenizer_spec(file)
        eou = bool(getattr(self.processor, "tokenizer_was_trained_with_end_of_utterance_token", False))
        spec.chat_template = prompt_template(self.image_token()[0], eou)
        spec.add_special_tokens = False  # the template writes BOS, as the processor does
        return spec

    # ---- what is not supported --------------------------------------------------------------------------------
    def _refuse(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{what} Idefics is not supported yet: its gated cross-attention blocks (between the decoder layers, "
            "reading the image states) are not described to the compression stages",
            where=self.source or None,
            fix="Idefics supports export and quantize (--llm awq/gptq/rtn, --vision int8); prune or distill a "
            "LLaVA-family model",
        )

    def check_stage(self, stage: str, config: Any = None, data: Any = None) -> None:
        if stage == "distill":
            raise self._refuse("distilling")

    def layer_stacks(self) -> dict[str, Any]:
        """The tower's encoder layers and the decoder layers (the gated cross-attention blocks between them are
        not in the stack: RTN INT4 leaves them float)."""
        return {"vision": self.model.model.vision_model.encoder.layers, "text": self.model.model.layers}

    def attention_blocks(self) -> list[AttentionBlock]:
        raise self._refuse("pruning")

    def mlp_blocks(self) -> list[MLPBlock]:
        raise self._refuse("pruning")

    def text_scale_groups(self) -> list[ScaleGroup]:
        """The decoder layers' Llama groups (their norms and projections have Llama's names and semantics)."""
        from edgelvm.models.llama_family import llama_scale_groups

        return llama_scale_groups(self.model.model)

    def sub_configs(self, config: Any | None = None) -> dict[str, Any]:
        raise self._refuse("deriving a student from")

    def decoder_weights(self, max_length: int) -> Any:
        raise UnsupportedModelError(
            "no fused decoder for Idefics (its cross-attention blocks are outside the fused Llama description)",
            fix="export with --decoder portable (--decoder auto skips the fused one)",
        )

"""InstructBLIP (``instructblip``, ``InstructBlipForConditionalGeneration``): BLIP-2 whose Q-Former reads the prompt.

The layout is BLIP-2's (ViT → Q-Former with learned queries → ``language_projection``, image tokens before the
encoded prompt), with one difference: the Q-Former also attends to the prompt's text, tokenized by its own
(BERT-style) tokenizer, so the image features depend on the question. The vision graph therefore takes the text as
well — ``pixel_values [N, 3, H, W]``, ``vision_text_ids [N, L]``, ``vision_text_mask [N, L]`` → ``[N, queries, E]`` —
and the bundle ships that tokenizer; the manifest names it (``preprocess.vision_text``), and the runtime feeds each
image the rendered prompt of its request (what ``InstructBlipProcessor(text=prompt)`` gives the Q-Former).

Language models: Vicuna (Llama; the fused ONNX Runtime decoder applies) and OPT (portable decoder). Flan-T5
(encoder-decoder) is refused at load, as for BLIP-2.
"""

from __future__ import annotations

from typing import Any

from edgelvm.manifest import PreprocessSpec
from edgelvm.models.base import ScaleGroup
from edgelvm.models.blip2 import Blip2Adapter
from edgelvm.models.checkpoint.quantized import fused_decoder_int4

#: The Q-Former tokenizer's file in the bundle.
VISION_TEXT_TOKENIZER = "vision_text_tokenizer.json"
#: Names of the vision graph's text inputs (the runtime binds them by these names).
VISION_TEXT_INPUTS = ("vision_text_ids", "vision_text_mask")


class _InstructBlipVisionEncoder:
    """Factory for the export-facing vision module (lazy: importing this file never imports torch)."""

    @staticmethod
    def build(model: Any) -> Any:
        import torch

        class InstructBlipVisionEncoder(torch.nn.Module):
            """(pixel_values, text ids, text mask) -> ViT -> Q-Former over [queries; text] -> projection of the
            queries. Mirrors ``InstructBlipForConditionalGeneration.get_image_features`` (its all-ones image mask
            is left out: it masks nothing)."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.vision_model = inner.vision_model
                self.query_tokens = inner.query_tokens
                self.qformer = inner.qformer
                self.language_projection = inner.language_projection

            def forward(
                self, pixel_values: torch.Tensor, vision_text_ids: torch.Tensor, vision_text_mask: torch.Tensor
            ) -> torch.Tensor:
                image_embeds = self.vision_model(pixel_values, return_dict=True).last_hidden_state
                queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
                query_mask = torch.ones(queries.shape[:2], dtype=vision_text_mask.dtype)
                out = self.qformer(
                    input_ids=vision_text_ids,
                    attention_mask=torch.cat([query_mask, vision_text_mask], dim=1),
                    query_embeds=queries,
                    encoder_hidden_states=image_embeds,
                    return_dict=True,
                )
                query_output = out.last_hidden_state[:, : queries.shape[1], :]
                return self.language_projection(query_output.to(image_embeds.dtype))

        return InstructBlipVisionEncoder(model).eval()


class InstructBlipAdapter(Blip2Adapter):
    family = "instructblip"
    model_types = ("instructblip",)
    supported_text_models = ("llama", "opt")
    display_name = "InstructBLIP"

    def _is_llama(self) -> bool:
        return self.text_config.model_type == "llama"

    # ---- structure ----------------------------------------------------------------------------------------------
    def vision_encoder(self) -> Any:
        return _InstructBlipVisionEncoder.build(self.model)

    def language_model(self) -> Any:
        causal_lm = self.model.language_model
        return causal_lm.model if self._is_llama() else causal_lm.model.decoder

    def example_vision_inputs(self, batch: int) -> dict[str, Any]:
        """Random (pixels, text ids, mask) for ``batch`` images with 5-token prompts, the last two padded in row 0."""
        import torch

        vocab = self.config.qformer_config.vocab_size
        ids = torch.randint(0, vocab, (batch, 5), dtype=torch.int64)
        mask = torch.ones(batch, 5, dtype=torch.int64)
        mask[0, -2:] = 0
        return {"pixel_values": self.example_pixel_values(batch), "vision_text_ids": ids, "vision_text_mask": mask}

    def vision_input_dims(self) -> dict[str, dict[int, str]]:
        return {"pixel_values": {0: "batch"}, **{n: {0: "batch", 1: "text"} for n in VISION_TEXT_INPUTS}}

    def vision_inputs(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        if batch.get("pixel_values") is None:
            return []
        ids, mask = VISION_TEXT_INPUTS
        return [{"pixel_values": batch["pixel_values"], ids: batch["qformer_input_ids"],
                 mask: batch["qformer_attention_mask"]}]  # fmt: skip

    def preprocess_spec(self) -> PreprocessSpec:
        spec = super().preprocess_spec()  # BLIP's image rule, image tokens as a prefix
        max_length = int(self.config.qformer_config.max_position_embeddings)
        inputs = list(VISION_TEXT_INPUTS)
        spec.vision_text = {"tokenizer": VISION_TEXT_TOKENIZER, "max_length": max_length, "inputs": inputs}
        return spec

    def bundle_tokenizers(self) -> dict[str, Any]:
        return {VISION_TEXT_TOKENIZER: self.processor.qformer_tokenizer}

    def decoder_weights(self, max_length: int) -> Any:
        if not self._is_llama():
            return super().decoder_weights(max_length)  # raises: OPT has no fused decoder
        from edgelvm.models.llama_family import describe_llama_decoder

        int4 = fused_decoder_int4(self.config, self.source)
        return describe_llama_decoder(self.language_model(), self.lm_head(), self.text_config, max_length, int4)

    def text_scale_groups(self) -> list[ScaleGroup]:
        if not self._is_llama():
            return super().text_scale_groups()
        from edgelvm.models.llama_family import llama_scale_groups

        return llama_scale_groups(self.language_model())

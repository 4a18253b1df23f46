"""Gemma 3 (``gemma3``, ``Gemma3ForConditionalGeneration``): SigLIP → average-pooled soft tokens → Gemma3 text model.

Vision: the SigLIP tower (896 px, 14-px patches: a 64×64 grid) and ``Gemma3MultiModalProjector``, which
average-pools the grid to ``mm_tokens_per_image`` (16×16 = 256) tokens, RMS-normalises them (``1 + weight``) and
projects them to the text width — all inside the vision graph (``get_image_features``).

Prompt: ``Gemma3Processor`` replaces each ``<start_of_image>`` of the rendered text by
``"\\n\\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\\n\\n"`` *before tokenizing*, so the
newlines merge with the text around them as the tokenizer merges them. The bundle says this as data: the shipped
chat template is the checkpoint's, wrapped in a jinja ``{% filter replace(...) %}`` that writes the same string
with ONE soft token; the runtime then expands that placeholder to ``tokens_per_image`` soft tokens at the id level
(a special token: nothing merges across it). The template writes BOS, so the encoder adds none (as
``apply_chat_template`` does). Checkpoints without a chat template are refused.

Attention: causal, except that the soft tokens of one image attend to each other bidirectionally (HF's
``token_type_ids``). The exported decoder (:func:`_image_block_decoder`) takes one more input, ``image_blocks
[batch, seq]`` (int64: 0 for text, ``k > 0`` for the tokens of the step's ``k``-th image), and masks
``causal OR same image block``; the manifest's ``attention = "image_bidirectional"`` tells the runtime to compute it
(``runtime/images/image_blocks.py``) and never to split an image's tokens across decoder steps.

Sliding window: 5 of every 6 layers are local (``sliding_window`` 1024 on the 4B): a query sees the keys of the
last ``window`` positions (itself included), and transformers' cache keeps the last ``window - 1`` of those layers.
Past the window the bundle says so (``kv_cache.windows``): the local layers' caches hold at most ``window - 1``
columns per row (the runtime's :class:`~edgelvm.runtime.kv_cache.SlidingWindows`), and the decoder takes their
columns' positions (``window_positions``) and masks them on positions — so padding, a shared prefix and a chat
rewind change nothing. Within the window nothing is hidden, and the bundle keeps plain full-length caches.

Embeddings: Gemma3's embedding module multiplies by ``sqrt(hidden_size)``; the bundle's table is the module's output
(stored apart from a tied head). ``Gemma3ForConditionalGeneration`` applies no final logit soft-capping.

Gemma is outside the fused decoder's Llama family: bundles carry the portable decoder only. Pan-and-scan
(``do_pan_and_scan``: extra crops whose count and prompt text depend on the image) is refused at load.
"""

from __future__ import annotations

import json
import math
from typing import Any

from edgelvm.errors import UnsupportedModelError
from edgelvm.manifest import PreprocessSpec, TokenizerSpec
from edgelvm.models.base import ScaleGroup, VLMAdapter
from edgelvm.models.llava import LlavaLayout

#: The decoder graph's extra input (the runtime's ``image_blocks`` rule feeds it by this name).
IMAGE_BLOCKS = "image_blocks"


class _Gemma3VisionEncoder:
    """Factory for the export-facing vision module (lazy: importing this file never imports torch)."""

    @staticmethod
    def build(gemma3_model: Any) -> Any:
        import torch

        class Gemma3VisionEncoder(torch.nn.Module):
            """pixel_values -> SigLIP last hidden state -> avg-pool, RMSNorm, projection
            (``Gemma3Model.get_image_features``)."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.vision_tower = inner.vision_tower
                self.projector = inner.multi_modal_projector

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                return self.projector(self.vision_tower(pixel_values, return_dict=True).last_hidden_state)

        return Gemma3VisionEncoder(gemma3_model.model).eval()


def _image_block_decoder(language_model: Any, lm_head: Any, text_config: Any) -> Any:
    """The decoder module with Gemma 3's image-block masking and window-sized local caches (see the module doc)."""
    import torch

    from edgelvm.models.export_wrappers import DecoderForExport, split_logits_keep

    class ImageBlockDecoder(DecoderForExport):
        """``DecoderForExport``'s interface plus ``image_blocks [batch, seq]`` after ``position_ids`` and, for a
        bundle whose local layers keep window-sized caches (``KVCacheSpec.windows``), ``window_positions [batch,
        local past + seq]`` after it (the position of each key column of the local layers, -1 for none).

        Global layers: a token attends to the real tokens at or before it (cache included) and to every token of its
        own image block in the step. Local layers, as transformers' ``create_masks_for_vision_model``: the same,
        AND the key within the window (``key > query - window``), on positions. Every layer's present is its past
        plus the step (transformers' sliding cache would cut it to ``window - 1`` inside the graph; the runtime
        selects what each row keeps)."""

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    image_blocks: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
            rest, keep = split_logits_keep(rest)
            windowed = len(rest) % 2 == 1  # window_positions, then the key/value pairs
            past = rest[1:] if windowed else rest
            seq, total = inputs_embeds.shape[1], attention_mask.shape[1]
            keys = torch.arange(total, device=inputs_embeds.device)
            queries = torch.arange(seq, device=inputs_embeds.device) + (total - seq)
            causal = keys[None, :] <= queries[:, None]  # [seq, total]
            allowed = attention_mask.bool()[:, None, :] & (causal[None] | _same_block(image_blocks, total))
            masks = {"full_attention": self._additive(allowed, inputs_embeds), "sliding_attention": None}
            if windowed:
                key_pos, query_pos = rest[0][:, None, :], position_ids[:, :, None]  # [B, 1, W], [B, S, 1]
                inside = (key_pos >= 0) & (key_pos > query_pos - self.window)
                local = inside & ((key_pos <= query_pos) | _same_block(image_blocks, rest[0].shape[1]))
                masks["sliding_attention"] = self._additive(local, inputs_embeds)
            else:  # a context within the window: the window hides nothing
                masks["sliding_attention"] = masks["full_attention"]
            cache = self.cache_from(past)
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=masks,  # used as given
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            return self.outputs(self.last_logits(out.last_hidden_state, keep), cache)

        @staticmethod
        def _additive(allowed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            zero = torch.zeros((), dtype=like.dtype, device=like.device)
            return torch.where(allowed[:, None], zero, torch.finfo(like.dtype).min)

        def cache_from(self, past: tuple[torch.Tensor, ...]) -> Any:
            """Plain layers for every pair: transformers' sliding layer would drop columns (the runtime does)."""
            from transformers.cache_utils import DynamicCache

            return DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])

    def _same_block(image_blocks: torch.Tensor, columns: int) -> torch.Tensor:
        """``[batch, seq, columns]``: query and key in the same image block of the step (the last ``seq`` of
        ``columns`` key columns; cached columns are in no block of the step)."""
        cached = torch.zeros_like(image_blocks[:, :1]).expand(-1, columns - image_blocks.shape[1])
        key_blocks = torch.cat([cached, image_blocks], dim=1)
        return (image_blocks[:, :, None] == key_blocks[:, None, :]) & (image_blocks[:, :, None] > 0)

    module = ImageBlockDecoder(language_model, lm_head, text_config)
    module.window = int(getattr(text_config, "sliding_window", None) or 0)
    return module.eval()


def sliding_window_of(text_config: Any) -> int | None:
    """The local layers' window, or None when no layer is local (``layer_types``; a config read as plain data may
    lack them: Gemma3's default pattern then has local layers whenever ``sliding_window`` is set)."""
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


class Gemma3Adapter(LlavaLayout, VLMAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    supported_text_models = ("gemma3_text",)

    def _check_text_model(self) -> None:
        super()._check_text_model()
        where = self.source or None
        text = self.text_config
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "use_bidirectional_attention is set: every text token attends both ways (an encoder, e.g. "
                "EmbeddingGemma), which a generating decoder with a KV cache cannot do",
                where=where,
                fix="use a generative Gemma 3 checkpoint (use_bidirectional_attention false)",
            )
        vc = self.config.vision_config
        side, tokens = vc.image_size // vc.patch_size, int(self.config.mm_tokens_per_image)
        per_side = math.isqrt(tokens)
        if per_side * per_side != tokens or side % per_side:
            raise UnsupportedModelError(
                f"mm_tokens_per_image {tokens} is not a square that divides the {side}x{side} patch grid",
                where=where,
                fix="use the checkpoint's own mm_tokens_per_image (256 for a 64x64 grid)",
            )
        processor = self.processor
        token, token_id = self.image_token()
        if self.config.image_token_id != token_id:
            raise UnsupportedModelError(
                f"config.image_token_index is {self.config.image_token_id} but the tokenizer's {token!r} is id "
                f"{token_id}",
                where=where,
                fix="set image_token_index in config.json to the tokenizer's <image_soft_token> id",
            )
        if getattr(processor, "image_seq_length", None) != tokens:
            raise UnsupportedModelError(
                f"the processor inserts {processor.image_seq_length} soft tokens per image but the projector pools "
                f"to {tokens}",
                where=where,
                fix="set image_seq_length in processor_config.json to mm_tokens_per_image",
            )
        if getattr(processor.image_processor, "do_pan_and_scan", None):
            raise UnsupportedModelError(
                "do_pan_and_scan is on: pan-and-scan crops (their number and prompt text depend on each image's "
                "aspect ratio) are not reproduced by the edgelvm runtime",
                where=where,
                fix='set "do_pan_and_scan": null (or false) in preprocessor_config.json; each image is then one '
                "896-px view, as by default",
            )
        if not self._checkpoint_template():
            raise UnsupportedModelError(
                "the checkpoint has no chat template: Gemma 3 prompts place images with the template's "
                "<start_of_image>, which the bundle's prompt rule rewrites",
                where=where,
                fix="save the processor with Gemma 3's chat template (chat_template.jinja of google/gemma-3-4b-it)",
            )

    def _checkpoint_template(self) -> str | None:
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.processor.tokenizer, "chat_template", None
        )
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()))
        return template or None

    # ---- structure ----------------------------------------------------------------------------------------------
    def vision_encoder(self) -> Any:
        return _Gemma3VisionEncoder.build(self.model)

    def lm_head(self) -> Any:
        return self.model.lm_head

    def input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()  # scales by sqrt(hidden_size) in forward

    def decoder_module(self) -> Any:
        return _image_block_decoder(self.language_model(), self.lm_head(), self.text_config)

    def decoder_example_inputs(self, batch: int, seq: int, dtype: Any) -> dict[str, Any]:
        """Two image blocks in the step where it is long enough (1:4 and 4:6), so the export parity check sees
        the bidirectional blocks; a one-token step is text."""
        import torch

        blocks = torch.zeros(batch, seq, dtype=torch.int64)
        if seq >= 4:
            blocks[:, 1:4] = 1
        if seq >= 6:
            blocks[:, 4:6] = 2
        return {IMAGE_BLOCKS: blocks}

    def decoder_input_dims(self) -> dict[str, dict[int, str]]:
        return {IMAGE_BLOCKS: {0: "batch", 1: "seq"}}

    def attention_kind(self) -> str:
        return "image_bidirectional"

    def kv_windows(self) -> list[int | None] | None:
        """Each layer's sliding window (None: global), from ``layer_types`` (or Gemma 3's default pattern)."""
        window = sliding_window_of(self.text_config)
        if window is None:
            return None
        text = self.text_config
        types = getattr(text, "layer_types", None) or [
            "sliding_attention" if (i + 1) % int(getattr(text, "sliding_window_pattern", 6) or 6) else "full_attention"
            for i in range(int(text.num_hidden_layers))
        ]
        return [window if kind == "sliding_attention" else None for kind in types]

    def kv_cache_spec(self, max_length: int, dtype: str) -> Any:
        """Past the sliding window, the local layers keep window-sized caches (``windows``: transformers' cache
        keeps their last ``window - 1`` positions too); within it, the window hides nothing and every layer keeps
        the whole context, as in bundles written before windows existed."""
        spec = super().kv_cache_spec(max_length, dtype)
        windows = self.kv_windows()
        if windows is not None and max_length > max(w or 0 for w in windows):
            spec.windows = windows
        return spec

    def config_parameter_counts(self) -> Any:
        """SigLIP (no head) + the projector (RMSNorm over the tower width, ``[vision, text]`` matrix) and the
        Gemma3 decoder (four norms per layer and q/k norms over ``head_dim``), from the config."""
        from edgelvm.models.param_counts import ParameterCounts, clip_like_vision_params, decoder_params

        cfg, where = self.config, self.source or None
        vc, tc = cfg.vision_config, self.text_config
        projector = vc.hidden_size * tc.hidden_size + vc.hidden_size
        return ParameterCounts(
            vision=clip_like_vision_params(vc, where=where) + projector,
            decoder=decoder_params(tc, where=where),
        )

    def tokens_per_image(self) -> int:
        return int(self.config.mm_tokens_per_image)

    def patches_per_image(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2  # SigLIP: no CLS

    def example_pixel_values(self, batch: int) -> Any:
        import torch

        vc = self.config.vision_config
        dtype = next(self.model.parameters()).dtype
        return torch.randn(batch, vc.num_channels, vc.image_size, vc.image_size, dtype=dtype)

    # ---- plain data for the bundle --------------------------------------------------------------------------------
    def image_token(self) -> tuple[str, int]:
        """The soft token (the positions the features fill); ``Gemma3Processor.image_token`` is ``<start_of_image>``,
        the placeholder the template writes."""
        tokenizer = self.processor.tokenizer
        token = getattr(tokenizer, "image_token", None) or "<image_soft_token>"
        return token, int(tokenizer.convert_tokens_to_ids(token))

    def preprocess_spec(self) -> PreprocessSpec:
        return super().preprocess_spec()  # Gemma3ImageProcessorPil without pan-and-scan: exact resize → normalize

    def tokenizer_spec(self, file: str) -> TokenizerSpec:
        spec = super().tokenizer_spec(file)
        spec.chat_template = self._bundle_template()
        # apply_chat_template encodes without special tokens when the rendered prompt starts with BOS
        bos = self.processor.tokenizer.bos_token
        sample = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        rendered = self.processor.apply_chat_template(sample, add_generation_prompt=True, tokenize=False)
        spec.add_special_tokens = not (bos and rendered.startswith(bos))
        return spec

    def _bundle_template(self) -> str:
        """The checkpoint's template with each ``<start_of_image>`` it writes replaced as ``Gemma3Processor``
        replaces it, with one soft token (the runtime expands it to the image's tokens)."""
        processor = self.processor
        boi = processor.boi_token
        one_image = processor.full_image_sequence.replace(self.image_token()[0] * self.tokens_per_image(),
                                                          self.image_token()[0])  # fmt: skip
        return (
            f"{{% filter replace({json.dumps(boi)}, {json.dumps(one_image)}) %}}"
            f"{self._checkpoint_template()}{{% endfilter %}}"
        )

    # ---- structure for the compression stages: the llava-hf layout (LlavaLayout), SigLIP's and Gemma's names ----
    def text_scale_groups(self) -> list[ScaleGroup]:
        """Per Gemma3 layer: up → down (the GeLU gate multiplies up's output elementwise) and, without GQA, v → o.
        No norm → q/k/v or norm → gate/up groups: Gemma's RMSNorm multiplies by ``1 + weight``, which dividing its
        weight by a scale does not fold exactly (as PaliGemma); those linears are quantized unscaled."""
        groups = []
        for i, layer in enumerate(self.language_model().layers):
            attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
            if attn.v_proj.out_features == attn.o_proj.in_features:
                groups.append(ScaleGroup(attn.v_proj, "linear", {p + "self_attn.o_proj": attn.o_proj}))
            groups.append(ScaleGroup(mlp.up_proj, "linear", {p + "mlp.down_proj": mlp.down_proj}))
        return groups

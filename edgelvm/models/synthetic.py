"""Random-weight LLaVA checkpoints built from a config alone: what ``edgelvm demo`` runs when the shipped teacher is
absent and what the speed / memory benchmarks measure (a test-sized shape and a realistic one).

Why here: the demo and the benchmarks need a complete checkpoint directory (config, safetensors weights, tokenizer,
image processor, chat template) exactly as a user's ``save_pretrained`` writes it, offline and in seconds. The
per-family test checkpoints live with the tests (``tests/fixtures/``) and reuse the tokenizer and configs from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

TextKind = Literal["llama", "qwen2", "mistral"]
VisionKind = Literal["clip", "siglip"]

#: A chat template in the style of llava-hf checkpoints: content is a string or a list of image/text items.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: Qwen2-VL / Qwen3-VL / Qwen3.5 special tokens by processor attribute name (test and benchmark checkpoints).
QWEN_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "im_start_token": "<|im_start|>",
    "im_end_token": "<|im_end|>",
}

#: A Qwen3-VL style chat template (ChatML turns without a default system prompt, each image as
#: ``<|vision_start|><|image_pad|><|vision_end|>``).
TINY_QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: What the tiny tokenizers are trained on: short VQA-like sentences, digits and a few non-ASCII characters.
CORPUS = [
    "What is on the table? A red cup and a blue plate.",
    "Describe the image in one sentence.",
    "How many people are in the picture? There are three people.",
    "Is there a dog? Yes, a small brown dog is sleeping near the door.",
    "The robot arm picks up the green block and places it in the box.",
    "Where is the cat? The cat is on the left, under the window.",
    "Read the sign: STOP. Turn right at the next corner.",
    "Colors: red, orange, yellow, green, blue, indigo, violet, black, white, gray.",
    "Numbers: zero one two three four five six seven eight nine ten 0123456789.",
    "Über café naïve — déjà vu! 東京 ok?",
]


def build_tiny_tokenizer(
    vocab_size: int = 384, *, named_image_token: bool = True, named_tokens: dict[str, str] | None = None
):
    """A byte-level BPE tokenizer (every string encodes; partial UTF-8 pieces occur) with LLaVA special tokens.

    ``named_image_token=False``: ``<image>`` is in the vocabulary but not the tokenizer's ``image_token`` attribute
    (``Blip2Processor`` fails on a tokenizer whose ``image_token`` is a plain string).
    ``named_tokens``: more special tokens (attribute name -> token, e.g. Qwen's ``{"image_token": "<|image_pad|>"}``)
    added to the vocabulary after the default ones and named on the tokenizer (an ``image_token`` entry replaces
    ``<image>`` as the named image token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>", *(named_tokens or {}).values()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={**({"image_token": "<image>"} if named_image_token else {}), **(named_tokens or {})}
        or None,
        padding_side="left",
    )


def tiny_llava_configs(
    text: TextKind,
    vision: VisionKind,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    vision_overrides: dict | None,
    text_overrides: dict | None,
):
    """The tiny tokenizer and the vision / text sub-configs shared by the LLaVA-style builders, with the feature
    select strategy and layer that go with the tower (CLIP: CLS dropped from layer -2; SigLIP: all of layer -1)."""
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, Qwen2Config, SiglipVisionConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tiny_tokenizer()
    vision_kwargs = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    vision_kwargs.update(vision_overrides or {})
    if vision == "clip":
        vision_config = CLIPVisionConfig(projection_dim=48, **vision_kwargs)
        strategy, feature_layer = "default", -2
    else:
        vision_config = SiglipVisionConfig(**vision_kwargs)
        strategy, feature_layer = "full", -1

    text_kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    heads = {"llama": (4, 4), "qwen2": (4, 2), "mistral": (4, 2)}[text]
    text_kwargs.update(num_attention_heads=heads[0], num_key_value_heads=heads[1])
    if text == "mistral":
        text_kwargs["sliding_window"] = None
    text_kwargs.update(text_overrides or {})
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[text]
    return tokenizer, vision_config, config_class(**text_kwargs), strategy, feature_layer


def build_tiny_llava(
    out_dir: str | Path,
    *,
    text: TextKind = "llama",
    vision: VisionKind = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a complete random-weight LLaVA checkpoint (model + processor) to ``out_dir`` and return it.

    ``text="qwen2"`` uses grouped-query attention (4 query heads, 2 KV heads) so GQA paths are exercised;
    ``vision="siglip"`` has no CLS token and uses the ``full`` feature-select strategy.
    ``vision_overrides`` / ``text_overrides`` replace config fields, e.g. to build realistic shapes for benchmarks
    (see :func:`build_realistic_llava`). ``dtype="float16"`` builds and saves the weights in half precision (in 2 GB
    shards), so a 7B shape never exists in fp32: 14 GB of memory instead of 28.
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, vision_config, text_config, strategy, feature_layer = tiny_llava_configs(
        text, vision, image_size, patch_size, hidden_size, num_layers, vision_overrides, text_overrides
    )
    if vision == "clip":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    else:
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    # Random init gives near-uniform logits; widen them so greedy decoding is not decided by float noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, max_shard_size="2GB")
    del model

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if vision == "clip" else 0,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def build_realistic_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Random-weight LLaVA of realistic shape: a CLIP ViT-B/16 tower at 224 px (196 image tokens) and a
    SmolLM2-135M-shaped Llama (576 wide, 30 layers, 9 query / 3 KV heads, 49152 vocab, tied embeddings).

    The tiny byte-level tokenizer is reused: ids beyond its vocabulary decode to nothing, which is irrelevant for
    speed and memory measurements.
    """
    return build_tiny_llava(
        out_dir,
        text="llama",
        vision="clip",
        image_size=224,
        patch_size=16,
        seed=seed,
        vision_overrides=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        text_overrides=dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            rope_theta=100000.0,
        ),
    )

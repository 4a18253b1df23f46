"""Tiny random-weight checkpoints of each supported family, built offline in seconds.

Why: no model hub is reachable in tests or CI, yet export parity must be checked on the real transformers classes
with their real processors. These builders produce complete checkpoint directories (config, safetensors weights,
tokenizer, image processor, chat template) exactly as a user's ``save_pretrained`` would.
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

_CORPUS = [
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


def build_tiny_tokenizer(vocab_size: int = 384, *, named_image_token: bool = True):
    """A byte-level BPE tokenizer (every string encodes; partial UTF-8 pieces occur) with LLaVA special tokens.

    ``named_image_token=False``: ``<image>`` is in the vocabulary but not the tokenizer's ``image_token`` attribute
    (``Blip2Processor`` fails on a tokenizer whose ``image_token`` is a plain string)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
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
        extra_special_tokens={"image_token": "<image>"} if named_image_token else None,
        padding_side="left",
    )


def _tiny_configs(
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
) -> Path:
    """Write a complete random-weight LLaVA checkpoint (model + processor) to ``out_dir`` and return it.

    ``text="qwen2"`` uses grouped-query attention (4 query heads, 2 KV heads) so GQA paths are exercised;
    ``vision="siglip"`` has no CLS token and uses the ``full`` feature-select strategy.
    ``vision_overrides`` / ``text_overrides`` replace config fields, e.g. to build realistic shapes for benchmarks
    (see :func:`build_realistic_llava`).
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
    tokenizer, vision_config, text_config, strategy, feature_layer = _tiny_configs(
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
    model = LlavaForConditionalGeneration(config).eval()
    # Random init gives near-uniform logits; widen them so greedy decoding is not decided by float noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)

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


#: Tile layouts for :func:`build_tiny_llava_next` in units of the 32-px tile: LLaVA-NeXT's default set
#: (1x2, 2x1, 2x2, 3x1, 1x3 tiles) plus 1x1, so that small, square, landscape and portrait images all tile differently.
TINY_GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def build_tiny_llava_next(
    out_dir: str | Path,
    *,
    text: TextKind = "qwen2",
    vision: VisionKind = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    grid_pinpoints: list[list[int]] | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight LLaVA-NeXT checkpoint (``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor``
    with the PIL image processor) to ``out_dir`` and return it.

    The tile is ``image_size`` pixels (32 → 16 features per tile with 8-px patches) and the grid pinpoints are
    :data:`TINY_GRID_PINPOINTS`, so images of a few dozen pixels already pick multi-tile grids and get unpadded.
    """
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, vision_config, text_config, strategy, feature_layer = _tiny_configs(
        text, vision, image_size, patch_size, hidden_size, num_layers, None, None
    )
    pinpoints = [list(p) for p in (grid_pinpoints or TINY_GRID_PINPOINTS)]
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        image_grid_pinpoints=pinpoints,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # as in build_tiny_llava: greedy tokens not decided by float noise
        model.model.image_newline.mul_(8.0)  # make the newline rows matter to the answer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
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


#: A BLIP-2 prompt template (BLIP-2 checkpoints ship none; their prompts are plain "Question: ... Answer:" strings).
#: Image items are not rendered: the BLIP-2 processor puts the query tokens before the whole prompt, BOS included.
TINY_BLIP2_CHAT_TEMPLATE = (
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


def build_tiny_blip2(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_query_tokens: int = 6,
    chat_template: str | None = TINY_BLIP2_CHAT_TEMPLATE,
    text: Literal["opt", "t5"] = "opt",
    seed: int = 0,
) -> Path:
    """Write a random-weight BLIP-2 checkpoint (``Blip2ForConditionalGeneration`` + ``Blip2Processor`` with
    ``BlipImageProcessorPil``) to ``out_dir`` and return it: a 2-layer ViT, a 2-layer Q-Former with
    ``num_query_tokens`` learned queries (cross-attention in every layer), and a tiny OPT (``text="t5"``: a tiny T5
    encoder-decoder instead, which edgelvm refuses).

    ``chat_template`` is stored on the tokenizer (``tokenizer_config.json``): ``Blip2Processor`` keeps none of its
    own. ``None`` leaves the checkpoint without a template, as the Salesforce checkpoints are.
    """
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessorPil,
        OPTConfig,
        T5Config,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(named_image_token=False)
    vision_config = Blip2VisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, initializer_range=0.02,  # default 1e-10: blind to the pixels
    )  # fmt: skip
    qformer_config = Blip2QFormerConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        cross_attention_frequency=1, vocab_size=len(tokenizer),
        initializer_range=0.2,  # with 0.02 the queries' outputs hardly depend on the image
    )  # fmt: skip
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    if text == "opt":
        text_config = OPTConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, word_embed_proj_dim=hidden_size,
            ffn_dim=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=4,
            max_position_embeddings=512, tie_word_embeddings=False, **ids,
        )  # fmt: skip
    else:
        text_config = T5Config(
            vocab_size=len(tokenizer), d_model=hidden_size, d_kv=16, d_ff=hidden_size * 2, num_layers=num_layers,
            num_heads=4, decoder_start_token_id=tokenizer.pad_token_id, **ids,
        )  # fmt: skip
    config = Blip2Config(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.language_model.get_output_embeddings().weight.mul_(8.0)  # as in build_tiny_llava
        model.query_tokens.normal_(0.0, 1.0)  # initialised to zeros: every query would be the same
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    # Blip2Processor drops a chat_template argument (its __init__ does not pass it on), so the template lives
    # with the tokenizer, where text-model checkpoints keep theirs; the adapter reads it from there.
    tokenizer.chat_template = chat_template
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    processor.save_pretrained(out)
    return out

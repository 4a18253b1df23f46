"""Tiny random-weight checkpoints of each supported family, built offline in seconds.

Why: no model hub is reachable in tests or CI, yet export parity must be checked on the real transformers classes
with their real processors. These builders produce complete checkpoint directories (config, safetensors weights,
tokenizer, image processor, chat template) exactly as a user's ``save_pretrained`` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from edgelvm.models.blip2 import QA_TEMPLATE as BLIP2_QA_TEMPLATE

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


def trim_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    """``ids`` up to and including the first EOS: what a greedy ``generate`` row means, whatever it padded after."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


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
        extra_special_tokens={**({"image_token": "<image>"} if named_image_token else {}), **(named_tokens or {})}
        or None,
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


#: BLIP-2's own "Question: ... Answer:" prompting (its checkpoints ship no template), for test checkpoints that keep
#: a template with the tokenizer (the InstructBLIP Llama one by default).
TINY_BLIP2_CHAT_TEMPLATE = BLIP2_QA_TEMPLATE


def build_tiny_blip2(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_query_tokens: int = 6,
    chat_template: str | None = None,
    text: Literal["opt", "t5"] = "opt",
    seed: int = 0,
) -> Path:
    """Write a random-weight BLIP-2 checkpoint (``Blip2ForConditionalGeneration`` + ``Blip2Processor`` with
    ``BlipImageProcessorPil``) to ``out_dir`` and return it: a 2-layer ViT, a 2-layer Q-Former with
    ``num_query_tokens`` learned queries (cross-attention in every layer), and a tiny OPT (``text="t5"``: a tiny T5
    encoder-decoder instead, which edgelvm refuses).

    By default the checkpoint has no chat template, as the published Salesforce checkpoints; a ``chat_template``
    (e.g. :data:`TINY_BLIP2_CHAT_TEMPLATE`) is stored on the tokenizer (``tokenizer_config.json``):
    ``Blip2Processor`` keeps none of its own.
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


#: Qwen2-VL's special tokens, named as :func:`build_tiny_tokenizer` puts them on the tokenizer.
QWEN_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "im_start_token": "<|im_start|>",
    "im_end_token": "<|im_end|>",
}

#: A Qwen2-VL style chat template (ChatML turns, a default system prompt, each image as
#: ``<|vision_start|><|image_pad|><|vision_end|>``).
TINY_QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_vl(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    patch_size: int = 4,
    merge_size: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 48 * 48,
    variant: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl",
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen2-VL checkpoint (``Qwen2VLForConditionalGeneration``, ``Qwen2VLImageProcessorPil``,
    a tokenizer with Qwen's special tokens and a Qwen-style chat template) to ``out_dir`` and return it.

    The files are what a real Qwen2-VL checkpoint holds (``preprocessor_config.json``, tokenizer files, the chat
    template): the full ``Qwen2VLProcessor`` also wants a video processor, which needs torchvision.
    ``min_pixels`` / ``max_pixels`` are small (16² … 48² pixels, 4-px patches merged 2×2), so images of a few dozen
    pixels get different patch grids (a 40×50 image: 10×12 patches, 30 image tokens; a 70×33 one: 18×8, 36 tokens).
    ``variant="qwen2_5_vl"``: a Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) instead — RMSNorm / SwiGLU
    vision blocks, block 0 attending within 16-px windows (2×2 merged patches) and block 1 over the whole image.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(named_tokens=QWEN_VL_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_VL_TOKENS.items()}
    heads = 4
    half = hidden_size // heads // 2  # rotary frequencies per head, split over (t, h, w)
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # 16-dim heads: [2, 3, 3]
    vision = dict(num_heads=4, patch_size=patch_size, spatial_merge_size=merge_size, temporal_patch_size=2,
                  in_channels=3)  # fmt: skip
    if variant == "qwen2_5_vl":
        vision.update(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size, hidden_act="silu",
                      window_size=2 * patch_size * merge_size, fullatt_block_indexes=[1])  # fmt: skip
    else:
        vision.update(depth=2, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
    config_class, model_class = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[variant]
    config = config_class(
        vision_config=vision,
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": section},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # as in build_tiny_llava: greedy tokens not decided by float noise
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [ids["im_end_token"], tokenizer.eos_token_id]
    model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size,
        temporal_patch_size=2,
    )  # fmt: skip
    image_processor.save_pretrained(out)
    tokenizer.chat_template = TINY_QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


#: Tile layouts for :func:`build_tiny_llava_onevision`: every grid of 1-3 x 1-3 tiles of 32 px, as llava-onevision's
#: pinpoints are every grid of 1-6 x 1-6 tiles of 384 px.
TINY_ONEVISION_PINPOINTS = [[h, w] for h in (32, 64, 96) for w in (32, 64, 96)]


def build_tiny_llava_onevision(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_num_patches: int = 2,
    grid_pinpoints: list[list[int]] | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight LLaVA-OneVision checkpoint (``LlavaOnevisionForConditionalGeneration``: SigLIP tower,
    all features of its last layer, Qwen2 LLM; the processor with ``LlavaOnevisionImageProcessorPil``) to ``out_dir``
    and return it.

    32-px tiles of 4 x 4 features, :data:`TINY_ONEVISION_PINPOINTS` and ``vision_aspect_ratio = "anyres_max_2"``: an
    unpadded grid of more than ~2 tiles' features (a 2 x 2 grid of a landscape image already) is downscaled, as
    anyres_max_9 does for large images at 384 px. The processor is saved without a video processor (transformers
    builds none without torchvision) as ``LlavaOnevisionProcessor`` (see
    :func:`edgelvm.models.processors.image_only_class`).
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    from edgelvm.models.processors import image_only_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, vision_config, text_config, strategy, feature_layer = _tiny_configs(
        "qwen2", "siglip", image_size, patch_size, hidden_size, num_layers, {"vision_use_head": False}, None
    )
    pinpoints = [list(p) for p in (grid_pinpoints or TINY_ONEVISION_PINPOINTS)]
    aspect = f"anyres_max_{max_num_patches}"
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=aspect,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # as in build_tiny_llava: greedy tokens not decided by float noise
        model.model.image_newline.mul_(8.0)  # make the newline rows matter to the answer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
    )
    processor = image_only_class(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy=strategy,
        vision_aspect_ratio=aspect,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def build_tiny_qformer_tokenizer():
    """A BERT-style WordPiece tokenizer (``[CLS] text [SEP]``, right padding) for InstructBLIP's Q-Former."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=special, show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", padding_side="right",
    )  # fmt: skip


def build_tiny_instructblip(
    out_dir: str | Path,
    *,
    text: Literal["llama", "opt"] = "llama",
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_query_tokens: int = 6,
    chat_template: str | Literal["default"] | None = "default",
    seed: int = 0,
) -> Path:
    """Write a random-weight InstructBLIP checkpoint (``InstructBlipForConditionalGeneration`` +
    ``InstructBlipProcessor``) to ``out_dir`` and return it: BLIP-2's ViT → Q-Former → projection, where the
    Q-Former also reads the prompt (its own WordPiece tokenizer, :func:`build_tiny_qformer_tokenizer`), and a tiny
    Llama (Vicuna-style) or OPT language model. ``chat_template`` as for :func:`build_tiny_blip2`; ``"default"``:
    none for OPT (as the published BLIP-family OPT checkpoints), :data:`TINY_BLIP2_CHAT_TEMPLATE` kept with the
    tokenizer for Llama (so that the template path stays covered)."""
    import torch
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
        OPTConfig,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(named_image_token=False)
    qformer_tokenizer = build_tiny_qformer_tokenizer()
    vision_config = InstructBlipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, initializer_range=0.02,
    )  # fmt: skip
    qformer_config = InstructBlipQFormerConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        cross_attention_frequency=1, vocab_size=len(qformer_tokenizer), pad_token_id=qformer_tokenizer.pad_token_id,
        initializer_range=0.2,  # as in build_tiny_blip2: the queries' outputs must depend on the image and prompt
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
        text_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=512, tie_word_embeddings=False, **ids,
        )  # fmt: skip
    config = InstructBlipConfig(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.language_model.get_output_embeddings().weight.mul_(8.0)  # as in build_tiny_llava
        model.query_tokens.normal_(0.0, 1.0)  # initialised to zeros: every query would be the same
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    if chat_template == "default":
        chat_template = None if text == "opt" else TINY_BLIP2_CHAT_TEMPLATE
    tokenizer.chat_template = chat_template  # kept with the tokenizer, as for BLIP-2
    processor = InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )
    processor.save_pretrained(out)
    return out


def build_tiny_paligemma(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    text: Literal["gemma", "gemma2"] = "gemma",
    seed: int = 0,
) -> Path:
    """Write a random-weight PaliGemma checkpoint (``PaliGemmaForConditionalGeneration`` + ``PaliGemmaProcessor``
    with ``SiglipImageProcessorPil``) to ``out_dir`` and return it: a 2-layer SigLIP tower (no head), the linear
    projector and a tiny Gemma (``text="gemma2"``: Gemma2, as PaliGemma 2) with one KV head, as the real ones, and
    an untied LM head.

    Like the google checkpoints it has no chat template; the processor adds PaliGemma's ``<loc####>`` /
    ``<seg###>`` tokens to the tokenizer (the language model's vocabulary covers them)."""
    import torch
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}, resample=3, image_seq_length=tokens
    )  # bicubic, mean/std 0.5, as google/paligemma-3b-pt-224
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer())
    tokenizer = processor.tokenizer
    vision_config = SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, vision_use_head=False,
    )  # fmt: skip
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=False,
        initializer_range=0.08,  # with 0.02 the blocks barely move the residual: answers ignore prompt and attention
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if text == "gemma":
        text_config = GemmaConfig(**common)
    else:
        text_config = Gemma2Config(**common, sliding_window=4096, query_pre_attn_scalar=16)
    config = PaliGemmaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=hidden_size,
        hidden_size=hidden_size,
        vocab_size=len(tokenizer),
        # Untied (the google checkpoints tie them): with a tied head the scaled embedding of the last token wins
        # every step and a random model repeats it.
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # as in build_tiny_llava: greedy tokens not decided by float noise
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


#: InternVL's special tokens, named as :func:`build_tiny_tokenizer` puts them on the tokenizer (``InternVLProcessor``
#: reads ``start_image_token`` / ``end_image_token`` / ``context_image_token`` / ``video_token`` from it).
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
    "im_start_token": "<|im_start|>",
    "im_end_token": "<|im_end|>",
}

#: An InternVL2.5/3-hf style chat template: ChatML turns, a default system prompt, each image as ``<IMG_CONTEXT>\n``.
TINY_INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_internvl(
    out_dir: str | Path,
    *,
    text: TextKind = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 4,
    max_patches: int = 6,
    seed: int = 0,
) -> Path:
    """Write a random-weight InternVL checkpoint (``InternVLForConditionalGeneration`` with an
    ``InternVLVisionModel`` tower and a Qwen2 / Llama text model, ``GotOcr2ImageProcessorPil``, a tokenizer with
    ``<img>`` / ``</img>`` / ``<IMG_CONTEXT>`` and an InternVL-style chat template) to ``out_dir`` and return it.

    The files are what an InternVL "-hf" checkpoint holds, less the video processor's (which needs torchvision):
    ``processor_config.json`` (``image_seq_length``, the image processor's settings), tokenizer files, the chat
    template. Tiles are ``image_size`` pixels (32 px, 4-px patches: an 8 x 8 grid, pixel-shuffled to 16 tokens a
    tile) and at most ``max_patches`` of them, so images of a few dozen pixels get different grids (a 30 x 64 image:
    2 x 1 tiles + thumbnail; a 48 x 48 one: 2 x 2 + thumbnail; a 20 x 20 one: a single tile).
    """
    import torch
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        LlamaConfig,
        Qwen2Config,
    )
    from transformers.utils import logging as hf_logging

    from edgelvm.models.processors import image_only_class

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(named_tokens=INTERNVL_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in INTERNVL_TOKENS.items()}
    tokens_per_tile = (image_size // patch_size // 2) ** 2
    vision_config = InternVLVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=patch_size, use_mean_pooling=True,
    )  # fmt: skip
    heads = {"llama": (4, 4), "qwen2": (4, 2)}[text]
    text_config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text](
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=heads[0], num_key_value_heads=heads[1],
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=ids["context_image_token"],
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # as in build_tiny_llava: greedy tokens not decided by float noise
        embeddings = model.model.vision_tower.embeddings
        embeddings.position_embeddings.normal_(0.0, 0.5)  # initialised to zeros: make patch positions matter
        embeddings.cls_token.normal_(0.0, 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [ids["im_end_token"], tokenizer.eos_token_id]
    model.save_pretrained(out)

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=False, min_patches=1, max_patches=max_patches
    )  # crop_to_patches as the InternVL-hf checkpoints store it: InternVLProcessor turns it on

    # InternVLProcessor less its video processor (which needs torchvision); it saves as InternVLProcessor
    processor = image_only_class(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens_per_tile,
        chat_template=TINY_INTERNVL_CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(out)
    return out


#: Idefics3 / SmolVLM special tokens, named as ``SmolVLMProcessor`` reads them from the tokenizer.
IDEFICS3_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
#: The tile markers real Idefics3 / SmolVLM tokenizers hold (``<row_i_col_j>`` up to 6 x 6).
IDEFICS3_ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]

#: SmolVLM's chat template (``processing_smolvlm.DEFAULT_CHAT_TEMPLATE``) without its leading ``<|im_start|>``.
TINY_IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_idefics3(
    out_dir: str | Path,
    *,
    model_type: Literal["idefics3", "smolvlm"] = "idefics3",
    tile: int = 32,
    patch_size: int = 4,
    scale_factor: int = 2,
    longest_edge: int = 96,
    do_image_splitting: bool = True,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-weight Idefics3 (or, ``model_type="smolvlm"``, SmolVLM) checkpoint to ``out_dir`` and return
    it: a 2-layer SigLIP-style tower on ``tile``-px images (8 x 8 patches of 4 px, pixel-shuffled 2 x 2 into 16 image
    tokens per view), a tiny Llama (GQA), the PIL image processor with ``max_image_size = tile`` and ``size =
    longest_edge`` (96 px: images of a few dozen pixels split into 1 x 3, 2 x 3, 3 x 2, 3 x 3 ... grids), a
    tokenizer with the family's special tokens and the ``<row_i_col_j>`` markers, and SmolVLM's chat template.

    SmolVLM's processor wants a video processor, which needs torchvision: the checkpoint is written with
    ``SmolVLMProcessor`` less its video processor (:func:`edgelvm.models.processors.image_only_class`; the files a
    real checkpoint holds, less the video processor's)."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMProcessor,
    )
    from transformers.utils import logging as hf_logging

    from edgelvm.models.processors import image_only_class

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(named_tokens=IDEFICS3_TOKENS)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in IDEFICS3_ROW_COL_TOKENS],
                         special_tokens=True)  # fmt: skip
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  image_size=tile, patch_size=patch_size)  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    smol = model_type == "smolvlm"
    config_cls, model_cls = (SmolVLMConfig, SmolVLMForConditionalGeneration) if smol else (
        Idefics3Config, Idefics3ForConditionalGeneration)  # fmt: skip
    config = config_cls(
        vision_config=vision,
        text_config=text.to_dict(),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # as in build_tiny_llava: greedy tokens not decided by float noise
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    eou = tokenizer.convert_tokens_to_ids(IDEFICS3_TOKENS["end_of_utterance_token"])
    model.generation_config.eos_token_id = [eou, tokenizer.eos_token_id]
    model.save_pretrained(out)

    image_processor_cls = SmolVLMImageProcessorPil if smol else Idefics3ImageProcessorPil
    image_processor = image_processor_cls(
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile},
        do_image_splitting=do_image_splitting,
    )
    seq = (tile // patch_size) ** 2 // scale_factor**2
    processor_cls = image_only_class(SmolVLMProcessor) if smol else Idefics3Processor
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq,
        chat_template=TINY_IDEFICS3_CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(out)
    return out


def build_tiny_smolvlm(out_dir: str | Path, **kwargs) -> Path:
    """:func:`build_tiny_idefics3` with ``model_type="smolvlm"`` (``SmolVLMForConditionalGeneration``)."""
    return build_tiny_idefics3(out_dir, model_type="smolvlm", **kwargs)


def build_tiny_idefics(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    cross_layer_interval: int = 1,
    use_resampler: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random-weight Idefics (v1) checkpoint (``IdeficsForVisionText2Text`` + ``IdeficsProcessor`` with
    ``IdeficsImageProcessorPil``) to ``out_dir`` and return it: a 2-layer CLIP-like tower, a 1-layer perceiver
    resampler (4 latents; ``use_resampler=False``: the tower's states as they are), a tiny Llama-style decoder with a
    gated cross-attention block before every ``cross_layer_interval``-th layer.

    As the real checkpoints, ``<fake_token_around_image>`` is an added token past ``vocab_size``: the decoupled
    embedding / LM head's ``additional_vocab_size`` rows serve it. The gates (``alpha_*``) are set to 1 (the
    "zeros" init would make the answers ignore the image) and the LM head is scaled as in the other builders."""
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    base_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>"]})
    image_processor = IdeficsImageProcessorPil(image_size=image_size)
    processor = IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size)
    vision = dict(
        embed_dim=48, image_size=image_size, patch_size=patch_size, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    perceiver = dict(
        use_resampler=use_resampler, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
        resampler_head_dim=16,
    )  # fmt: skip
    config = IdeficsConfig(
        vocab_size=base_vocab, additional_vocab_size=len(tokenizer) - base_vocab, hidden_size=hidden_size,
        intermediate_size=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=4,
        cross_layer_interval=cross_layer_interval, use_resampler=use_resampler, vision_config=vision,
        perceiver_config=perceiver, max_position_embeddings=512, initializer_range=0.2,
        alpha_initializer="ones", alpha_type="float", tie_word_embeddings=False,
        # 0.2: with 0.08 (the other builders) the greedy answers barely depend on the image
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # as in build_tiny_llava: greedy tokens not decided by float noise
        model.lm_head.additional_fc.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out

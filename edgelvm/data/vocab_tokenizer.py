"""A tiny tokenizer for the shapes task, with chat special tokens and a LLaVA-style chat template.

Why BPE over a printable-ASCII alphabet (and not WordLevel): WordLevel maps any word outside the task to
``<unk>`` and its decoder re-inserts spaces around punctuation ("circle , a"), so it is lossless only on
hand-picked strings. A character-level BPE whose merges are trained on the task's complete text
(:func:`edgelvm.data.shapes.task_texts`) makes every task word a single token (short sequences, ~250 tokens in
all) *and* still round-trips any printable ASCII text, e.g. a user's own question at runtime.

Pre-tokenization is SentencePiece-style (``Metaspace``: a space becomes ``▁`` glued to the next word) followed by
isolating punctuation, so ``decode(encode(x)) == x`` exactly: no spaces are invented or lost. ``prepend_scheme=
"always"`` means text after a special token (e.g. the answer after ``<|assistant|>``) tokenizes the same as on its
own, so an answer's token ids do not depend on the prompt before it.

The base (torch-free) part, :func:`build_shapes_tokenizer_object`, only needs ``tokenizers``; the runtime can use
it. :func:`build_shapes_tokenizer` wraps it for transformers.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IMAGE_TOKEN = "<image>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
#: Fixed order = fixed ids 0..8, so models built against this tokenizer can hard-wire e.g. the image token id.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE_TOKEN, SYSTEM, USER, ASSISTANT, END)
MAX_VOCAB = 512  # a cap; training stops earlier, when every task word is one token

# Turns: "<|role|>content<|end|>"; assistant turns end with the eos token "</s>" instead, so a model stops
# generating at the ordinary eos id (no extra stop-token configuration in generate or in the edgelvm runtime).
# Content is a string, or a list of {"type": "image"} / {"type": "text", "text": ...} items (HF LLaVA style).
SHAPES_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _alphabet() -> list[str]:
    """Printable ASCII without the space (Metaspace turns it into ``▁``), plus ``▁``, newline and tab."""
    return sorted(set(string.printable) - {" ", "\r", "\x0b", "\x0c"} | {"▁"})


TASKS: tuple[str, ...] = ("shapes", "scenes")


def build_shapes_tokenizer_object(task: str = "shapes") -> Tokenizer:
    """The raw ``tokenizers.Tokenizer`` of ``task`` (deterministic: same corpus, same merges, same ids).

    The scenes task also splits numbers into single digits (as Llama and Qwen tokenizers do): a sign's number is
    then read digit by digit, and the 1000 possible numbers do not each need a merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if task == "shapes":
        from edgelvm.data.shapes import task_texts
    elif task == "scenes":
        from edgelvm.data.scenes import task_texts
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    tok = Tokenizer(models.BPE(unk_token=UNK))
    steps = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation("isolated")]
    if task == "scenes":
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_alphabet(),
        limit_alphabet=len(_alphabet()),
        show_progress=False,
    )
    tok.train_from_iterator(task_texts(), trainer=trainer)
    return tok


def build_shapes_tokenizer(task: str = "shapes") -> PreTrainedTokenizerFast:
    """The task tokenizer for transformers: bos/eos/pad/unk set, ``<image>`` special, chat template attached.

    The chat template writes ``bos`` itself, so the tokenizer adds no special tokens on its own (no
    post-processor): ``tokenizer(apply_chat_template(...))`` has exactly one ``<s>``.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_shapes_tokenizer_object(task),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=SHAPES_CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
    )
    tok.add_special_tokens({"additional_special_tokens": [SYSTEM, USER, ASSISTANT, END]})
    return tok

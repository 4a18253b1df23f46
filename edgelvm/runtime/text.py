"""Tokenizer, chat template and streaming detokenisation — the ``tokenizers`` library and jinja2, no transformers.

The chat template is rendered the way transformers renders it (sandboxed jinja2 with ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, the special tokens as variables), and the rendered prompt is encoded with
the tokenizer's post-processor (BOS etc.), exactly as ``processor(text=prompt)`` does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BundleError, EdgeLVMError
from edgelvm.manifest import TokenizerSpec

Message = dict[str, Any]


class ChatTokenizer:
    """Renders chat messages to a prompt string, encodes it, and decodes generated ids."""

    def __init__(self, spec: TokenizerSpec, bundle_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        path = Path(bundle_dir) / spec.file
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise BundleError(
                f"tokenizer file cannot be read ({err})", where=path, fix="re-export the bundle"
            ) from None

    # ---- chat template -----------------------------------------------------------------------------------------
    @cached_property
    def _template(self) -> Any:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise EdgeLVMError(f"chat template refused the conversation: {message}", fix="check the message roles")

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.spec.chat_template)
        except jinja2.TemplateError as err:
            raise BundleError(
                f"chat template does not compile ({err})",
                where="edgelvm.json: tokenizer.chat_template",
                fix="fix the template in the source checkpoint and re-export",
            ) from None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The prompt string for ``messages`` (OpenAI/HF style: content is a string or a list of typed items),
        inside the processor's ``prompt_prefix`` / ``prompt_suffix`` where the bundle has them."""
        return self.spec.prompt_prefix + self._render(messages, add_generation_prompt) + self.spec.prompt_suffix

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not self.spec.chat_template:
            # No template: plain concatenation of text with image placeholders, as a base model expects.
            parts = []
            for message in messages:
                for item in _content_items(message):
                    parts.append(self.image_placeholder if item["type"] == "image" else item.get("text", ""))
            return "\n".join(parts)
        specials = {
            **self.spec.special_tokens,
            "bos_token": self.spec.bos_token or "",
            "eos_token": self.spec.eos_token or "",
            "pad_token": self.spec.pad_token or "",
        }
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)

    @property
    def image_placeholder(self) -> str:
        return self.spec.special_tokens.get("image_token", "<image>")

    # ---- ids ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.spec.add_special_tokens).ids

    def decode(self, ids: list[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def vocab(self) -> dict[str, int]:
        """Token → id, special tokens included (to check that two models share a tokenizer)."""
        return self._tok.get_vocab(with_added_tokens=True)


def _content_items(message: Message) -> list[dict[str, Any]]:
    content = message.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def without_images(messages: list[Message]) -> list[Message]:
    """``messages`` with their image items removed (for models whose image tokens are not part of the text)."""
    out = []
    for message in messages:
        content = message.get("content", "")
        if not isinstance(content, str):
            content = [item for item in content if item.get("type") != "image"]
        out.append({**message, "content": content})
    return out


def user_message(prompt: str, num_images: int) -> Message:
    """One user turn: the images first, then the text (the llava-hf convention)."""
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]}


class StreamDecoder:
    """Turns a growing id sequence into text pieces; holds back bytes of an incomplete UTF-8 character."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece = text[len(self.text) :] if text.startswith(self.text) else text
        self.text = text
        return piece

    def flush(self) -> str:
        """At the end of generation: the text including any incomplete trailing character (as U+FFFD)."""
        self.text = self.tokenizer.decode(self.ids)
        return self.text


class StopText:
    """One row's streamed text: emits decoded text, holding back any tail that could begin a stop string."""

    def __init__(self, tokenizer: ChatTokenizer, stop: tuple[str, ...]) -> None:
        self.decoder, self.stop = StreamDecoder(tokenizer), tuple(s for s in stop if s)
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.decoder.push(token)
        text = self.decoder.text
        if not self.stop:
            return self._emit_to(len(text))
        window = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
        hits = [i for s in self.stop if (i := text.find(s, window)) != -1]
        if hits:
            self.stopped = True
            return self._emit_to(min(hits))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit_to(len(text) - hold)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._emit_to(len(self.decoder.flush()))

    def _emit_to(self, end: int) -> str:
        piece = self.decoder.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

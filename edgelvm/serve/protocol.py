"""OpenAI chat-completions requests → the runtime's chat messages, images and generation options.

Everything here is synchronous and framework-free (the app runs it in a worker thread), so it can be tested and
reasoned about without a server. Every rejection is an :class:`APIError` carrying the HTTP status and OpenAI's error
shape; the cheap checks (JSON, model, fields) come before the expensive one (image decoding), and an image's pixel
count and aspect ratio are checked from its header before its pixels are decoded.

Validation is strict: JSON without NaN / Infinity / overflowing numbers, at most :data:`MAX_JSON_DEPTH` levels deep,
text that is valid Unicode (no lone surrogates), typed fields in range, and the messages' text no longer than
``ServeConfig.max_prompt_chars`` (derived from the bundle's context) — checked before anything is tokenized.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from edgelvm.errors import ImageError
from edgelvm.runtime.images import check_image_size

#: Formats accepted from clients. Deliberately short: PIL can open formats (EPS via Ghostscript, ...) that no
#: camera produces and whose decoders are a larger attack surface.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: Deepest nesting accepted in a request body (a chat request needs 6: body → messages → message → content → part →
#: image_url); deeper is refused with 400 instead of exhausting the recursion limit.
MAX_JSON_DEPTH = 32
#: Host names every server accepts (its own loopback names); the bound host and ``--allowed-host`` are added.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass(frozen=True)
class ServeConfig:
    """What one server serves and the limits that keep it bounded (memory and work per request)."""

    model_id: str
    allow_local_files: bool = False  # image_url may name a file on the server (file:// or a plain path)
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096  # width × height, checked from the header before decoding
    max_images: int = 8  # per request; the worst-case memory of one queued request is this × pixels × 3 bytes
    default_max_tokens: int = 256  # when the client gives none (capped by the room left in the context)
    request_timeout: float | None = None  # seconds, from arrival (body, decoding, queue, generation); None = none
    max_parsing: int = 2  # requests parsing JSON / decoding images at once
    max_reading: int = 8  # request bodies being read at once (memory: this × max_body_bytes)
    body_timeout: float = 30.0  # seconds to receive a whole body (after the headers); slower gets 408
    max_prompt_chars: int | None = None  # characters of message text; None = the bundle's (create_app sets it)
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS  # Host header values accepted ("*" = any); ports are ignored
    allowed_origins: tuple[str, ...] = ()  # browser Origins accepted besides http(s)://<allowed host>[:port]
    api_key: str | None = field(default=None, repr=False)  # when set, /v1/* needs "Authorization: Bearer <key>"
    retry_after_s: int = 1


class APIError(Exception):
    """A request the server refuses, as an HTTP status plus OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated request in the runtime's terms: ``Engine.submit(images, messages=messages, **options)``."""

    messages: list[dict[str, Any]]
    images: list[Any]  # decoded PIL images, in the order of the {"type": "image"} items
    options: dict[str, Any] = field(default_factory=dict)  # GenerationConfig fields, max_new_tokens included if given
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: bytes, config: ServeConfig) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body and decode its images; raises :class:`APIError`."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model", code="invalid_type")
    if model is not None and model != config.model_id:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {config.model_id!r}",
            param="model",
            code="model_not_found",
        )
    _reject_unsupported(payload)
    options = _generation_options(payload)
    stream = _optional(payload, "stream", bool, False)
    stream_options = _optional(payload, "stream_options", dict, {}) or {}
    messages, urls = _convert_messages(payload.get("messages"), config)
    images = [decode_image_url(url, config, param=param) for param, url in urls]
    return ChatRequest(
        messages, images, options, stream=stream, include_usage=bool(stream and stream_options.get("include_usage"))
    )


# ---- JSON -------------------------------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} overflows a double")
    return value


def parse_json(body: bytes) -> Any:
    """Strict JSON: no NaN / Infinity, no number that overflows, valid UTF-8 and Unicode (no lone surrogates), at
    most :data:`MAX_JSON_DEPTH` levels. Raises :class:`APIError` (400 ``invalid_json``)."""
    try:
        payload = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, the hooks', int digits over the limit
        raise APIError(400, f"the request body is not valid JSON ({str(err)[:200]})", code="invalid_json") from None
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return payload


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, "the request contains a string that is not valid Unicode (a lone surrogate)", code="invalid_json"
        ) from None


# ---- fields -----------------------------------------------------------------------------------------------------
def _optional(payload: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = payload.get(name)
    if value is None:
        return default
    # bool is an int subclass: a JSON true is not a token count
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise APIError(400, f"'{name}' must be of type {expected}", param=name, code="invalid_type")
    return value


def _in_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise APIError(
            400, f"'{name}' must be in {bracket}{low}, {high}], got {value}", param=name, code="invalid_value"
        )


def _generation_options(payload: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields → :class:`~edgelvm.runtime.GenerationConfig` keyword arguments."""
    options: dict[str, Any] = {}
    name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional(payload, name, int, None)
    if max_tokens is not None:
        _in_range(name, max_tokens, 1, 2**31)
        options["max_new_tokens"] = max_tokens
    min_tokens = _optional(payload, "min_tokens", int, None)  # vLLM's extension; useful for fixed-length tests
    if min_tokens is not None:
        _in_range("min_tokens", min_tokens, 0, max_tokens if max_tokens is not None else 2**31)
        options["min_new_tokens"] = min_tokens
    temperature = _optional(payload, "temperature", (int, float), None)
    if temperature is not None:
        _in_range("temperature", temperature, 0, 2)
        options["temperature"] = float(temperature)
    top_p = _optional(payload, "top_p", (int, float), None)
    if top_p is not None:
        _in_range("top_p", top_p, 0, 1, low_open=True)
        options["top_p"] = float(top_p)
    top_k = _optional(payload, "top_k", int, None)  # vLLM's extension
    if top_k is not None:
        _in_range("top_k", top_k, 0, 2**31)
        options["top_k"] = top_k
    seed = _optional(payload, "seed", int, None)
    if seed is not None:
        _in_range("seed", seed, 0, 2**63 - 1)
        options["seed"] = seed
    stop = payload.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise APIError(
                400, "'stop' must be a non-empty string or a list of up to 4", param="stop", code="invalid_value"
            )
        options["stop"] = tuple(stops)
    return options


def _reject_unsupported(payload: dict[str, Any]) -> None:
    """Fields whose silent omission would give a wrong answer (unknown harmless fields are ignored)."""
    if payload.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if payload.get("logprobs"):
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
    if payload.get("tools") or payload.get("functions"):
        raise APIError(400, "tools / function calling are not supported", param="tools", code="unsupported_value")
    response_format = payload.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format type 'text' is supported", param="response_format")


# ---- messages ---------------------------------------------------------------------------------------------------
def _convert_messages(raw: Any, config: ServeConfig) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages → runtime messages; image parts become ``{"type": "image"}`` and their URLs are returned in
    order (with the JSON path of each, for error messages)."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", param="messages", code="missing_messages")
    messages: list[dict[str, Any]] = []
    urls: list[tuple[str, str]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = _ROLES.get(message["role"]) if isinstance(message.get("role"), str) else None
        if role is None:
            raise APIError(
                400,
                f"{where}.role {message.get('role')!r} is not supported (system, developer, user, assistant)",
                param=f"{where}.role",
            )
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and role == "user":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str) or not url:
                    raise APIError(400, f"{param}.image_url.url must be a non-empty string", param=param)
                parts.append({"type": "image"})
                urls.append((param, url))
            else:
                raise APIError(
                    400,
                    f"{param}: unsupported content part {kind!r} (text parts, and image_url parts in user messages)",
                    param=param,
                )
        messages.append({"role": role, "content": parts})
    chars = sum(
        len(m["content"]) if isinstance(m["content"], str) else sum(len(p.get("text", "")) for p in m["content"])
        for m in messages
    )
    if config.max_prompt_chars is not None and chars > config.max_prompt_chars:
        raise APIError(
            400,
            f"the messages' text has {chars} characters; this model's context takes at most {config.max_prompt_chars}",
            param="messages",
            code="context_length_exceeded",
        )
    if len(urls) > config.max_images:
        raise APIError(
            400,
            f"{len(urls)} images in one request; this server takes at most {config.max_images}",
            param="messages",
            code="too_many_images",
        )
    return messages, urls


# ---- images -----------------------------------------------------------------------------------------------------
def decode_image_url(url: str, config: ServeConfig, *, param: str = "image_url") -> Any:
    """A ``data:`` URL (or, if allowed, a local path) → an RGB-able PIL image, within the pixel limit."""
    if url.startswith("data:"):
        header, comma, encoded = url[5:].partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise APIError(
                400,
                f"{param}: a data URL must be base64 ('data:image/png;base64,...')",
                param=param,
                code="invalid_image_url",
            )
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(
                400, f"{param}: the base64 image data is malformed", param=param, code="invalid_base64"
            ) from None
        return _open_image(io.BytesIO(data), config, param)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise APIError(
            400,
            f"{param}: remote image URLs are not fetched; send the image as a base64 data URL",
            param=param,
            code="unsupported_image_url",
        )
    if not config.allow_local_files:
        raise APIError(
            400,
            f"{param}: local image files are disabled; send a base64 data URL, or start the server with "
            "--allow-local-files",
            param=param,
            code="local_files_disabled",
        )
    path = Path(unquote(urlparse(url).path)) if scheme == "file" else Path(url)
    if not path.is_file():
        raise APIError(400, f"{param}: no such image file on the server: {path}", param=param, code="image_not_found")
    with path.open("rb") as handle:
        return _open_image(handle, config, param)


def _open_image(handle: Any, config: ServeConfig, param: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(handle, formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise _too_large(param, None, config) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(
            400,
            f"{param}: not an image this server reads ({', '.join(IMAGE_FORMATS)})",
            param=param,
            code="invalid_image",
        ) from None
    width, height = image.size
    if width * height > config.max_image_pixels:
        raise _too_large(param, (width, height), config)
    try:
        check_image_size(width, height, where=param)  # empty, or so elongated that resizing it explodes
    except ImageError as err:
        raise APIError(400, str(err), param=param, code="invalid_image") from None
    try:
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on corrupt data
        raise APIError(
            400, f"{param}: the image is truncated or corrupt ({err})", param=param, code="invalid_image"
        ) from None
    return image


def _too_large(param: str, size: tuple[int, int] | None, config: ServeConfig) -> APIError:
    shown = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return APIError(
        413,
        f"{param}: the image has {shown}; this server takes at most {config.max_image_pixels} pixels "
        "(width × height) — downscale it first",
        param=param,
        code="image_too_large",
    )

"""The OpenAI-compatible HTTP app over one bundle (Starlette; run it with uvicorn).

Concurrency model: one :class:`~edgelvm.runtime.engine.Engine` — a single worker thread generating one request at a
time behind a bounded queue — and an event loop that never runs model code. Bodies are read by at most
``ServeConfig.max_reading`` requests at once, each within ``body_timeout`` (408 after), so slow senders never hold
the parsing slots; JSON is parsed and images decoded by at most ``ServeConfig.max_parsing`` requests at once (in
threads); a request that finds the queue full gets 429 with ``Retry-After`` at once. Waiting for tokens happens in
threads too, so a slow generation never stalls ``/health``.
A client that disconnects — mid-stream or while waiting for a whole answer — cancels its job, which frees the model
within one token (or before it starts, if it was still queued).

Memory is bounded by the queue: at most ``max_queue + 1`` requests hold decoded images, plus ``max_reading`` bodies
being read and ``max_parsing`` being decoded (each at most ``max_body_bytes``).

Before any handler, :class:`_RequestGuard` refuses what a browser page or a DNS-rebinding attack could send: a Host
not in ``allowed_hosts`` (400), a cross-origin ``Origin`` (403), a missing or wrong API key when one is set (401),
a POST whose Content-Type is not JSON (415).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgelvm.errors import ConfigError, EdgeLVMError, ImageError, PromptTooLongError
from edgelvm.runtime.engine import BusyError, Engine, Job, release_free_memory
from edgelvm.runtime.vlm import Request
from edgelvm.serve.protocol import APIError, ChatRequest, ServeConfig, parse_chat_request

log = logging.getLogger(__name__)

_END = object()
#: How often a waiting non-streaming request checks whether its client is still there (seconds).
_DISCONNECT_POLL_S = 0.25


def create_app(engine: Engine, config: ServeConfig) -> Starlette:
    """The app serving ``engine`` as model ``config.model_id``. The caller owns the engine (and closes it).

    ``config.max_prompt_chars`` left as None becomes the bundle's (``VLM.max_prompt_chars``)."""
    vlm_limit = getattr(getattr(engine, "vlm", None), "max_prompt_chars", None)
    if config.max_prompt_chars is None and isinstance(vlm_limit, int):
        config = dataclasses.replace(config, max_prompt_chars=vlm_limit)
    state = _ServerState(engine, config)
    routes = [
        Route("/v1/chat/completions", state.chat_completions, methods=["POST"]),
        Route("/v1/models", state.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", state.get_model, methods=["GET"]),
        Route("/health", state.health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_RequestGuard, config=config, counts=state.counts)],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.serve = state
    return app


class _ServerState:
    """The handlers and what they share: the engine, the limits, the admission limiter and the counters."""

    def __init__(self, engine: Engine, config: ServeConfig) -> None:
        self.engine = engine
        self.config = config
        self.created = int(time.time())
        self.parsing = anyio.CapacityLimiter(config.max_parsing)
        self.reading = anyio.CapacityLimiter(config.max_reading)
        self.counts: Counter[str] = Counter()  # finish reasons and rejections, for /health
        self.stopping = False  # set when the server shuts down: cancelled jobs then answer 503

    # ---- routes -----------------------------------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse(
            {"status": "ok", "model": self.config.model_id, "queued": self.engine.queued, "counts": dict(self.counts)}
        )

    async def list_models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: HTTPRequest) -> Response:
        if request.path_params["model_id"] != self.config.model_id:
            raise APIError(404, f"the model {request.path_params['model_id']!r} does not exist", code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: HTTPRequest) -> Response:
        arrived = time.monotonic()  # --request-timeout counts from here: body, decoding, queue and generation
        self.counts["requests"] += 1
        large = False
        try:
            body = await self._receive(request)
            large = len(body) > 2**20
            async with self.parsing:
                self._time_left(arrived)
                chat = await anyio.to_thread.run_sync(parse_chat_request, body, self.config)
                del body
                job = await anyio.to_thread.run_sync(self._submit, chat, arrived)
        except APIError as err:
            self.counts[f"http_{err.status}"] += 1
            raise
        finally:
            if large:  # a refused or parsed large body is garbage now: give its memory back (rate-limited)
                await anyio.to_thread.run_sync(release_free_memory)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            events = self._stream(job, completion_id, chat.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._complete(job, completion_id, request)

    async def _receive(self, request: HTTPRequest) -> bytes:
        """The body: refused from Content-Length when too large, read by at most ``max_reading`` requests at once
        (a request that waits ``body_timeout`` for a turn gets 429) within ``body_timeout`` (slower: 408)."""
        limit, timeout = self.config.max_body_bytes, self.config.body_timeout
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _body_too_large(int(declared), limit)
        with anyio.move_on_after(timeout) as waited:
            await self.reading.acquire()
        if waited.cancelled_caught:
            raise self._busy("too many request bodies are being received")
        try:
            with anyio.fail_after(timeout):
                return await _read_body(request, limit)
        except TimeoutError:
            raise APIError(
                408,
                f"the request body was not received within {timeout:g} s",
                type="timeout",
                code="request_timeout",
                headers={"Connection": "close"},
            ) from None
        finally:
            self.reading.release()

    def _time_left(self, arrived: float) -> float | None:
        """Seconds left of ``--request-timeout`` (None: no deadline); 504 when none are."""
        if self.config.request_timeout is None:
            return None
        left = self.config.request_timeout - (time.monotonic() - arrived)
        if left <= 0:
            raise _job_error_for("timeout")
        return left

    def _busy(self, why: str) -> APIError:
        return APIError(
            429,
            f"the server is busy ({why}); retry in {self.config.retry_after_s} s",
            type="server_busy",
            code="queue_full",
            headers={"Retry-After": str(self.config.retry_after_s)},
        )

    # ---- generation -------------------------------------------------------------------------------------------------
    def _submit(self, chat: ChatRequest, arrived: float) -> Job:
        """Queue the request (in a worker thread: tokenising is synchronous); runtime errors → :class:`APIError`."""
        options = dict(chat.options)
        try:
            if "max_new_tokens" not in options:
                options["max_new_tokens"] = self._default_max_tokens(chat)
            return self.engine.submit(chat.images, messages=chat.messages, timeout=self._time_left(arrived), **options)
        except BusyError as err:
            raise self._busy(err.problem) from None
        except PromptTooLongError as err:
            raise APIError(400, str(err), param="messages", code="context_length_exceeded") from None
        except ConfigError as err:
            raise APIError(400, str(err), param=err.where, code="invalid_value") from None
        except ImageError as err:
            raise APIError(400, str(err), param="messages", code="invalid_image") from None
        except EdgeLVMError as err:  # e.g. a literal image placeholder in the text: the request's fault
            raise APIError(400, str(err), param="messages") from None

    def _default_max_tokens(self, chat: ChatRequest) -> int:
        """OpenAI's default is "as much as fits": ``default_max_tokens`` capped by the room left in the context."""
        vlm = self.engine.vlm
        prompt = len(vlm.prompt_ids(Request(images=chat.images, messages=chat.messages)))
        return max(1, min(self.config.default_max_tokens, vlm.max_length - prompt))

    async def _complete(self, job: Job, completion_id: str, request: HTTPRequest) -> Response:
        try:
            while not job.done:
                await anyio.to_thread.run_sync(_wait, job, _DISCONNECT_POLL_S, abandon_on_cancel=True)
                if not job.done and await request.is_disconnected():
                    log.info("%s: client disconnected; cancelling", completion_id)
                    job.cancel()
                    self.counts["disconnected"] += 1
                    return Response(status_code=499)  # nobody reads it; uvicorn drops it
        finally:
            if not job.done:
                job.cancel()
        self.counts[job.finish_reason or "error"] += 1
        if job.finish_reason not in ("stop", "length"):
            raise _job_error(job, self.stopping)
        message = {"role": "assistant", "content": job.result()}
        choice = {"index": 0, "message": message, "finish_reason": job.finish_reason, "logprobs": None}
        return JSONResponse(
            {**self._envelope(completion_id, "chat.completion"), "choices": [choice], "usage": _usage(job)}
        )

    async def _stream(self, job: Job, completion_id: str, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format. Cancelled (by Starlette, on disconnect) → the job is too."""
        envelope = self._envelope(completion_id, "chat.completion.chunk")

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _sse({**envelope, "choices": [choice]})

        pieces = iter(job)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    piece = await anyio.to_thread.run_sync(next, pieces, _END, abandon_on_cancel=True)
                except Exception:  # the generation failed; job.error says why
                    break
                if piece is _END:
                    break
                yield chunk({"content": piece})
            self.counts[job.finish_reason or "error"] += 1
            if job.finish_reason in ("stop", "length"):
                yield chunk({}, job.finish_reason)
                if include_usage:
                    yield _sse({**envelope, "choices": [], "usage": _usage(job)})
            else:
                yield _sse(_job_error(job, self.stopping).body())
            yield "data: [DONE]\n\n"
        finally:
            if not job.done:
                log.info("%s: client disconnected mid-stream; cancelling", completion_id)
                job.cancel()
                self.counts["disconnected"] += 1

    # ---- helpers ----------------------------------------------------------------------------------------------------
    def _envelope(self, completion_id: str, kind: str) -> dict[str, Any]:
        return {"id": completion_id, "object": kind, "created": int(time.time()), "model": self.config.model_id}

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "edgelvm"}


async def _read_body(request: HTTPRequest, limit: int) -> bytes:
    """The body, refusing (413) as soon as it exceeds ``limit`` while reading."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body ({size} bytes or more) exceeds this server's limit of {limit} bytes; downscale the "
        "images or start the server with a larger --max-body-mb",
        code="request_too_large",
    )


def _wait(job: Job, seconds: float) -> None:
    """Block up to ``seconds`` for the job to finish (its outcome is read from the job afterwards)."""
    with contextlib.suppress(BaseException):
        job.result(timeout=seconds)


def _job_error(job: Job, stopping: bool = False) -> APIError:
    if job.finish_reason == "cancelled" and stopping:
        return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if job.finish_reason in ("timeout", "cancelled"):
        return _job_error_for(job.finish_reason)
    log.error("generation failed", exc_info=job.error)
    return APIError(500, f"generation failed: {job.error}", type="server_error", code="generation_failed")


def _job_error_for(reason: str) -> APIError:
    if reason == "timeout":
        return APIError(504, "the request ran past the server's --request-timeout", type="timeout", code="timeout")
    return APIError(499, "the request was cancelled", type="cancelled", code="cancelled")


class _RequestGuard:
    """ASGI middleware: what a web page (or a DNS-rebinding attack) could send to a local server is refused before
    any handler runs — a Host header not allowed (400 ``host_not_allowed``), a browser request from another origin
    (403 ``origin_not_allowed``), without the API key when one is set (401 ``invalid_api_key``; /health stays open
    for probes), a POST whose Content-Type is not JSON (415 ``unsupported_media_type``: HTML forms and "simple"
    cross-site requests can only send text/plain, urlencoded or multipart)."""

    def __init__(self, app: Any, config: ServeConfig, counts: Counter[str]) -> None:
        self.app, self.config, self.counts = app, config, counts
        self.hosts = {h.lower().strip("[]") for h in config.allowed_hosts}
        self.origins = {o.lower().rstrip("/") for o in config.allowed_origins}
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                self.counts[f"http_{error.status}"] += 1
                await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Any) -> APIError | None:
        headers = Headers(scope=scope)
        if "*" not in self.hosts and _host_name(headers.get("host", "")) not in self.hosts:
            return APIError(
                400,
                f"the Host header {headers.get('host', '')[:100]!r} is not one this server answers to; start it with "
                "--allowed-host NAME to accept it",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin):
            return APIError(
                403,
                f"requests from the web origin {origin[:100]!r} are not allowed; start the server with "
                "--allowed-origin ORIGIN to accept them",
                code="origin_not_allowed",
            )
        if self.key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                return APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                return APIError(
                    415,
                    f"the request body must be JSON (Content-Type: application/json), not {media or 'unspecified'!r}",
                    code="unsupported_media_type",
                )
        return None

    def _origin_allowed(self, origin: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if "*" in self.origins or origin in self.origins:
            return True
        parsed = urlparse(origin)
        return parsed.scheme in ("http", "https") and (parsed.hostname or "") in self.hosts


def _host_name(host: str) -> str:
    """The name part of a Host header (port dropped, IPv6 brackets removed), lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


def _usage(job: Job) -> dict[str, int]:
    prompt = job.stats.prompt_tokens if job.stats else 0
    completion = job.stats.new_tokens if job.stats else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _api_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    if exc.status >= 500:
        log.warning("%s %s → %d: %s", request.method, request.url.path, exc.status, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: HTTPRequest, exc: Exception) -> Response:
    """Starlette's own 404 / 405 in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=str(exc.status_code))
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: HTTPRequest, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    error = APIError(500, f"internal server error ({type(exc).__name__})", type="server_error", code="internal_error")
    return JSONResponse(error.body(), status_code=500)

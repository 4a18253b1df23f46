"""The OpenAI-compatible HTTP app over one bundle (Starlette; run it with uvicorn).

Concurrency model: one :class:`~edgelvm.runtime.engine.Engine` — a single worker thread generating one request at a
time behind a bounded queue — and an event loop that never runs model code. Bodies are read and images decoded by
at most ``ServeConfig.max_parsing`` requests at once (in threads); a request that finds the queue full gets 429 with
``Retry-After`` at once. Waiting for tokens happens in threads too, so a slow generation never stalls ``/health``.
A client that disconnects — mid-stream or while waiting for a whole answer — cancels its job, which frees the model
within one token (or before it starts, if it was still queued).

Memory is bounded by the queue: at most ``max_queue + 1`` requests hold decoded images, plus ``max_parsing`` being
read (each at most ``max_body_bytes``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgelvm.errors import ConfigError, EdgeLVMError, ImageError, PromptTooLongError
from edgelvm.runtime.engine import BusyError, Engine, Job
from edgelvm.runtime.vlm import Request
from edgelvm.serve.protocol import APIError, ChatRequest, ServeConfig, parse_chat_request

log = logging.getLogger(__name__)

_END = object()
#: How often a waiting non-streaming request checks whether its client is still there (seconds).
_DISCONNECT_POLL_S = 0.25


def create_app(engine: Engine, config: ServeConfig) -> Starlette:
    """The app serving ``engine`` as model ``config.model_id``. The caller owns the engine (and closes it)."""
    state = _ServerState(engine, config)
    routes = [
        Route("/v1/chat/completions", state.chat_completions, methods=["POST"]),
        Route("/v1/models", state.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", state.get_model, methods=["GET"]),
        Route("/health", state.health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
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
        self.counts: Counter[str] = Counter()  # finish reasons and rejections, for /health

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
        self.counts["requests"] += 1
        try:
            async with self.parsing:
                body = await _read_body(request, self.config.max_body_bytes)
                chat = await anyio.to_thread.run_sync(parse_chat_request, body, self.config)
                job = await anyio.to_thread.run_sync(self._submit, chat)
        except APIError as err:
            self.counts[f"http_{err.status}"] += 1
            raise
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            events = self._stream(job, completion_id, chat.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._complete(job, completion_id, request)

    # ---- generation -------------------------------------------------------------------------------------------------
    def _submit(self, chat: ChatRequest) -> Job:
        """Queue the request (in a worker thread: tokenising is synchronous); runtime errors → :class:`APIError`."""
        options = dict(chat.options)
        try:
            if "max_new_tokens" not in options:
                options["max_new_tokens"] = self._default_max_tokens(chat)
            return self.engine.submit(
                chat.images, messages=chat.messages, timeout=self.config.request_timeout, **options
            )
        except BusyError as err:
            raise APIError(
                429,
                f"the server is busy ({err.problem}); retry in {self.config.retry_after_s} s",
                type="server_busy",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from None
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
            raise _job_error(job)
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
                yield _sse(_job_error(job).body())
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
    """The body, refusing (413) as soon as it is known to exceed ``limit`` — from Content-Length, or while reading."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(int(declared), limit)
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


def _job_error(job: Job) -> APIError:
    if job.finish_reason == "timeout":
        return APIError(504, "the request ran past the server's --request-timeout", type="timeout", code="timeout")
    if job.finish_reason == "cancelled":
        return APIError(499, "the request was cancelled", type="cancelled", code="cancelled")
    log.error("generation failed", exc_info=job.error)
    return APIError(500, f"generation failed: {job.error}", type="server_error", code="generation_failed")


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

"""``edgelvm serve BUNDLE``: the OpenAI-compatible server from the command line.

Registered in :mod:`edgelvm.cli` with ``app.command()(serve)``. Starlette and uvicorn are imported only when the
command runs, so the rest of the CLI works without the ``serve`` extra and this command says how to get it.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgelvm.errors import EdgeLVMError

log = logging.getLogger(__name__)


def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `edgelvm export`.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default; 0.0.0.0 exposes it).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port; the chosen one is printed).")] = 8000,
    model_id: Annotated[str | None, typer.Option(help="Model name clients send (default: the bundle's name).")] = None,
    allow_local_files: Annotated[
        bool, typer.Option(help="Let image_url name files on this machine (file:// or a path). Trusted clients only.")
    ] = False,
    max_queue: Annotated[int, typer.Option(help="Requests waiting behind the running one; more get HTTP 429.")] = 8,
    draft: Annotated[
        Path | None, typer.Option(help="A draft bundle (same tokenizer): speculative decoding, the same greedy text.")
    ] = None,
    draft_tokens: Annotated[int, typer.Option(help="Tokens the draft proposes per target step.")] = 4,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (MiB); larger gets HTTP 413.")] = 20.0,
    max_image_pixels: Annotated[int, typer.Option(help="Largest image (width × height); larger gets 413.")] = (
        4096 * 4096
    ),
    max_images: Annotated[int, typer.Option(help="Images per request.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Answer budget when a request sets no max_tokens.")] = 256,
    request_timeout: Annotated[
        float | None, typer.Option(help="Seconds a request may take, queue wait included (HTTP 504 after).")
    ] = None,
    max_connections: Annotated[int, typer.Option(help="Open connections before uvicorn answers 503.")] = 256,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a connection may take to send a request's headers (then closed).")
    ] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds to receive a request body (HTTP 408 after).")] = 30.0,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Host header value to accept besides localhost and --host (repeatable; '*' = any)."),
    ] = None,
    allowed_origin: Annotated[
        list[str] | None,
        typer.Option(help="Browser Origin to accept, e.g. https://ui.example (repeatable; '*' = any)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="EDGELVM_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1/* (prefer the env var: options show in `ps`).",
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="auto | onnxruntime-cpu | onnxruntime-cuda | onnxruntime-tensorrt")] = (
        "auto"
    ),
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: onnxruntime's choice).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: warning, info, debug.")] = "info",
) -> None:
    """Serve a bundle over HTTP with OpenAI's chat-completions API (/v1/chat/completions, /v1/models, /health).

    Example:  edgelvm serve bundles/llava --port 8000
    """
    _uvicorn, create_app = _import_extra()
    from edgelvm.runtime import VLM
    from edgelvm.runtime.engine import Engine
    from edgelvm.serve.protocol import ServeConfig

    if max_queue < 1 or max_body_mb <= 0 or max_image_pixels < 1 or max_images < 0 or max_tokens < 1:
        raise EdgeLVMError(
            "--max-queue, --max-body-mb, --max-image-pixels and --max-tokens must be positive",
            where="edgelvm serve",
            fix="pass positive limits",
        )
    if max_connections < 1 or not header_timeout > 0 or not body_timeout > 0:
        raise EdgeLVMError(
            "--max-connections, --header-timeout and --body-timeout must be positive",
            where="edgelvm serve",
            fix="pass positive limits",
        )
    if request_timeout is not None and not request_timeout > 0:
        raise EdgeLVMError("--request-timeout must be positive", where="edgelvm serve", fix="e.g. --request-timeout 30")
    if not 0 <= port <= 65535:
        raise EdgeLVMError(
            f"--port {port} is not a TCP port", where="edgelvm serve", fix="use 1-65535 (or 0 for any free port)"
        )
    config = ServeConfig(
        model_id=model_id or Path(bundle).resolve().name,
        allow_local_files=allow_local_files,
        max_body_bytes=int(max_body_mb * 2**20),
        max_image_pixels=max_image_pixels,
        max_images=max_images,
        default_max_tokens=max_tokens,
        request_timeout=request_timeout,
        body_timeout=body_timeout,
        allowed_hosts=_allowed_hosts(host, allowed_host or []),
        allowed_origins=tuple(allowed_origin or ()),
        api_key=api_key or None,
    )
    vlm = VLM.load(bundle, backend=backend, threads=threads, draft=draft, draft_tokens=draft_tokens)
    engine = Engine(vlm, max_queue=max_queue)
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    if allow_local_files:
        log.warning("--allow-local-files: clients can make this server read any image file it can open")
    # One line a supervisor (or a test) can wait for; the port is the real one when --port 0 was given.
    if host in _WILDCARDS and not allowed_host:
        log.warning(
            "--host %s: requests must name this machine as localhost or %s; pass --allowed-host with the address or "
            "name clients use",
            host,
            socket.gethostname(),
        )
    typer.echo(f"edgelvm serve: model {config.model_id!r} on http://{_url_host(host)}:{bound_port}", err=True)
    from edgelvm.serve.server import make_server

    server = make_server(
        create_app(engine, config),
        engine=engine,
        max_connections=max_connections,
        header_timeout=header_timeout,
        log_level=log_level,
    )
    try:
        server.run(sockets=[sock])
    finally:
        engine.close(wait=True, cancel=True)  # SIGTERM / Ctrl-C: in-flight and queued requests are cancelled
        sock.close()


def _import_extra() -> tuple[Any, Any]:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise EdgeLVMError(
            f"the HTTP server needs the 'serve' extra ({err.name} is not installed)",
            where="edgelvm serve",
            fix="pip install 'edgelvm[serve]'",
        ) from None
    from edgelvm.serve.app import create_app

    return uvicorn, create_app


_WILDCARDS = ("0.0.0.0", "::", "")


def _allowed_hosts(host: str, extra: list[str]) -> tuple[str, ...]:
    """The Host header names accepted: the loopback names, the bound address (or, bound to all interfaces, this
    machine's name) and ``--allowed-host``."""
    from edgelvm.serve.protocol import LOCAL_HOSTS

    own = [socket.gethostname()] if host in _WILDCARDS else [host]
    return tuple(dict.fromkeys([*LOCAL_HOSTS, *own, *extra]))


def _bind(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn so that the real port of ``--port 0`` is known and printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as err:
        sock.close()
        raise EdgeLVMError(
            f"cannot listen on {host}:{port} ({getattr(err, 'strerror', None) or err})",
            where="edgelvm serve",
            fix="pick another --port (or --port 0 for any free one), or stop the process using it",
        ) from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main() -> None:
    """Run ``serve`` alone (``python -c 'from edgelvm.serve.cli import main; main()' BUNDLE ...``)."""
    try:
        typer.run(serve)
    except EdgeLVMError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

"""Issue 18, the server and image/prompt side: geometry bombs, prompt size, slow clients, cross-site requests, strict
request validation, deadlines, shutdown and concurrent chat sessions — each finding reproduced by a test — plus
property-based tests (hypothesis) of image preprocessing and the request schema, and the official ``openai`` client
against a real uvicorn on loopback."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelvm.errors import ConfigError, EdgeLVMError, ImageError, PromptTooLongError

HOST = "127.0.0.1"
MODEL = "tiny"
FAST = settings(max_examples=40, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Any) -> str:
    raw = image if isinstance(image, bytes) else _encode(image)
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _encode(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def chat(prompt: str, url: str | None = None, **fields: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    content.append({"type": "text", "text": prompt})
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def clip_spec(**changes: Any) -> Any:
    from edgelvm.manifest import PreprocessSpec

    fields = dict(
        resize_mode="shortest_edge",
        size={"shortest_edge": 96},
        resample="bicubic",
        center_crop={"height": 96, "width": 96},
        rescale_factor=1 / 255,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        convert_rgb=True,
        image_token="<image>",
        image_token_id=5,
        tokens_per_image=4,
    )
    return PreprocessSpec(**{**fields, **changes})


# ---- 1. image geometry -----------------------------------------------------------------------------------------------
def test_thin_image_is_refused_before_any_resize():
    """A 1x40000 strip (238 bytes as PNG) used to be resized to 96 x 3.84M pixels (~5 GB); now refused at once."""
    from PIL import Image

    from edgelvm.runtime.images.preprocess import ImagePreprocessor

    strip = Image.new("RGB", (40000, 1))
    pre = ImagePreprocessor(clip_spec())
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(ImageError, match="aspect ratio"):
        pre.one(strip)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.monotonic() - started < 0.5 and peak < 10 * 2**20


def test_resize_output_is_bounded_before_allocation():
    """Within the aspect limit, a resize whose output is over the pixel limit is refused from the geometry."""
    from PIL import Image

    from edgelvm.runtime.images.preprocess import ImagePreprocessor

    pre = ImagePreprocessor(clip_spec(size={"shortest_edge": 256}, center_crop=None))
    pre.max_resized_pixels = 256 * 1024
    image = Image.new("RGB", (1500, 10))  # aspect 150: 256 x 38400 after the shortest-edge resize
    with pytest.raises(ImageError, match="would be resized to 38400x256"):
        pre.check_geometry(image.height, image.width)
    with pytest.raises(ImageError):
        pre.one(image)
    assert pre.one(Image.new("RGB", (30, 20))).shape == (3, 256, 384)


def test_tiling_rules_plan_their_sizes():
    """Each tiling rule names the sizes it will allocate, so the preprocessor checks them before resizing."""
    from edgelvm.runtime.images.dynamic_tiles import DynamicTilesRule
    from edgelvm.runtime.images.native_resolution import NativeResolutionRule

    tiles = DynamicTilesRule.load({"tile_size": [32, 32], "min_tiles": 1, "max_tiles": 6, "tokens_per_view": 4}, None)
    for h, w in tiles.planned_sizes(10, 1900):
        assert h * w <= 6 * 32 * 32
    native = NativeResolutionRule.load(
        {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 200_000},
        None,
    )
    (h, w), *_ = native.planned_sizes(4000, 4000)
    assert h * w <= 200_000


def test_empty_and_bomb_images_are_image_errors(tmp_path, monkeypatch):
    from PIL import Image

    from edgelvm.runtime.images import load_image
    from edgelvm.runtime.images.preprocess import ImagePreprocessor

    with pytest.raises(ImageError, match="empty image"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="empty image"):
        ImagePreprocessor(clip_spec()).one(Image.new("RGB", (0, 0)))  # was a ZeroDivisionError
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises a DecompressionBombError over 2x this
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(path)


def test_cli_prints_a_clean_error_for_a_decompression_bomb(tmp_path):
    """`edgelvm` given a bomb as a path prints an EdgeLVMError, not PIL's traceback."""
    code = (
        "import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 1000\n"
        "from edgelvm.errors import EdgeLVMError\nfrom edgelvm.runtime.images import load_image\n"
        "try:\n    load_image(sys.argv[1])\nexcept EdgeLVMError as err:\n    print('error:', err); sys.exit(2)\n"
    )
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(300, 300))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "too many pixels" in out.stdout and "Traceback" not in out.stderr


@FAST
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    mode=st.sampled_from(["RGB", "RGBA", "L", "P", "LA", "I;16", "1"]),
    resize=st.sampled_from(["shortest_edge", "exact", "none"]),
    crop=st.booleans(),
)
def test_preprocessing_any_image_gives_the_planned_view_or_an_image_error(width, height, mode, resize, crop):
    from PIL import Image

    from edgelvm.runtime.images.preprocess import ImagePreprocessor

    size = {"shortest_edge": 24} if resize == "shortest_edge" else {"height": 24, "width": 20}
    spec = clip_spec(resize_mode=resize, size=size, center_crop={"height": 16, "width": 16} if crop else None)
    pre = ImagePreprocessor(spec)
    pre.max_resized_pixels = 24 * 24 * 200
    image = Image.new(mode, (width, height))
    try:
        pre.check_geometry(height, width)
    except ImageError:
        with pytest.raises(ImageError):
            pre.one(image)
        return
    out = pre.one(image)
    new_h, new_w = pre.output_size(height, width)
    assert out.shape == ((3, 16, 16) if crop else (3, new_h, new_w))
    assert out.dtype == np.float32 and np.isfinite(out).all()


@FAST
@given(data=st.binary(max_size=300))
def test_decoding_arbitrary_bytes_is_an_image_or_a_4xx(data):
    from edgelvm.serve.protocol import APIError, ServeConfig, decode_image_url

    config = ServeConfig(model_id=MODEL, max_image_pixels=64 * 64)
    for raw in (data, png_bytes(3, 3)[:16] + data):
        try:
            image = decode_image_url(data_url(raw), config)
        except APIError as err:
            assert 400 <= err.status < 500
        else:
            assert image.width * image.height <= 64 * 64


# ---- 7. strict request validation ------------------------------------------------------------------------------------
def _parse(payload: Any, **config: Any) -> Any:
    from edgelvm.serve.protocol import ServeConfig, parse_chat_request

    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_chat_request(body, ServeConfig(model_id=MODEL, **config))


STRICT_CASES = {
    "temperature NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "invalid_json"),
    "top_p NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', "invalid_json"),
    "temperature Infinity": (b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', None),
    "overflowing float": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', "invalid_json"),
    "huge integer": (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", None),
    "seed -1": (chat("hi", seed=-1), "invalid_value"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "invalid_json"),
    "surrogate in stop": (b'{"messages": [{"role": "user", "content": "a"}], "stop": "\\udfff"}', "invalid_json"),
    "deep nesting": (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
    "moderate nesting": (json.dumps({**chat("hi"), "extra": json.loads("[" * 40 + "]" * 40)}).encode(), "invalid_json"),
    "thin image": (chat("?", data_url(png_bytes(40000, 1))), "invalid_image"),
    "text None": ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, None),
    "unhashable role": ({"messages": [{"role": ["user"], "content": "hi"}]}, None),
}


@pytest.mark.parametrize("case", sorted(STRICT_CASES))
def test_strict_schema_refuses_with_400(case):
    from edgelvm.serve.protocol import APIError

    payload, code = STRICT_CASES[case]
    with pytest.raises(APIError) as caught:
        _parse(payload)
    assert caught.value.status == 400, caught.value.message
    if code is not None:
        assert caught.value.code == code


def test_prompt_size_is_refused_before_tokenizing():
    from edgelvm.serve.protocol import APIError

    started = time.monotonic()
    with pytest.raises(APIError) as caught:
        _parse(chat("x" * 5_000_000), max_prompt_chars=8192)
    assert caught.value.code == "context_length_exceeded" and time.monotonic() - started < 2


def test_tiny_temperature_is_greedy_not_nan():
    from edgelvm.runtime.sampling import Sampler, SamplingConfig

    logits = np.array([[0.5, 3.0, -1.0, 2.9]], dtype=np.float32)
    assert Sampler(SamplingConfig(temperature=1e-320, seed=0))(logits).tolist() == [1]
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=float("nan"))
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=1.0, seed=-1)


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_field_values = st.fixed_dictionaries(
    {},
    optional={
        k: _json_leaf | _json
        for k in ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n", "min_tokens")
    },
)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _json_leaf}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": _json}),
    _json,
)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", 3, ["user"], {"a": 1}]),
        "content": st.one_of(_json_leaf, st.lists(_part, max_size=3)),
    }
)


@FAST
@given(fields=_field_values, messages=st.one_of(_json, st.lists(_message, max_size=3)))
def test_any_request_body_is_a_chat_request_or_a_4xx(fields, messages):
    """Whatever the JSON (NaN included: Python's json writes it), parsing answers a ChatRequest or a 4xx APIError —
    never another exception (which the server would turn into a 500)."""
    from edgelvm.serve.protocol import APIError, ChatRequest

    body = json.dumps({**fields, "messages": messages}).encode()
    try:
        parsed = _parse(body, max_prompt_chars=10_000)
    except APIError as err:
        assert 400 <= err.status < 500
    else:
        assert isinstance(parsed, ChatRequest)
        from edgelvm.runtime.vlm import make_config

        # the runtime takes what the protocol passed, or refuses it as a ConfigError (which the app maps to 400)
        with contextlib.suppress(ConfigError):
            make_config(dict(parsed.options))


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_are_a_chat_request_or_a_4xx(body):
    from edgelvm.serve.protocol import APIError

    try:
        _parse(body)
    except APIError as err:
        assert 400 <= err.status < 500


# ---- runtime: prompts, context, deadlines, chat sessions, engine shutdown --------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["llama-clip"]


@pytest.fixture(scope="module")
def vlm(bundle):
    from edgelvm.runtime import VLM

    return VLM.load(bundle, threads=1)


def test_prompt_type_and_size_are_checked_before_tokenizing(vlm):
    for bad in (None, b"What is this?"):
        with pytest.raises(ConfigError, match="must be a str"):
            vlm.generate(None, bad, max_new_tokens=2)
    started = time.monotonic()
    with pytest.raises(PromptTooLongError, match="characters"):
        vlm.generate(None, "word " * 4_000_000, max_new_tokens=2)  # 20 MB
    assert time.monotonic() - started < 2
    assert vlm.max_prompt_chars == vlm.max_length * 32
    with pytest.raises(ConfigError):
        vlm.chat().ask(b"hi")


def test_huge_max_length_is_refused_at_load(bundle, copy_bundle):
    from edgelvm.runtime import VLM

    copy = copy_bundle(bundle)
    manifest = json.loads((copy / "edgelvm.json").read_text())
    manifest["kv_cache"]["max_length"] = 10**9
    (copy / "edgelvm.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeLVMError, match="max_length"):
        VLM.load(copy, threads=1, verify=False)


def test_deadline_is_checked_between_stages(vlm, test_images):
    from edgelvm.runtime.vlm import Control, Request, make_config

    request = Request(prompt="What?", images=[test_images[0]])
    pieces = list(vlm.stream_requests([request], make_config({"max_new_tokens": 5}), Control(deadline=0.0)))
    assert pieces == [] and vlm.last_stats.finish_reasons == ["timeout"] and vlm.last_stats.prefill_ms == 0


def test_chat_session_refuses_concurrent_turns_instead_of_losing_them(vlm):
    session = vlm.chat()
    stream = session.ask("First?", stream=True, max_new_tokens=4, min_new_tokens=4)
    next(stream)  # the first turn is running
    with pytest.raises(ConfigError, match="already answering"):
        session.ask("Second?", max_new_tokens=2)
    "".join(stream)
    assert [m["role"] for m in session.messages] == ["user", "assistant"]

    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def turn(i: int) -> None:
        barrier.wait()
        try:
            session.ask(f"Q{i}?", max_new_tokens=3)
            outcomes.append("ok")
        except ConfigError:
            outcomes.append("refused")

    threads = [threading.Thread(target=turn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 8
    assert len(session.messages) == 2 + 2 * outcomes.count("ok"), "a turn was lost silently"


class _SlowVLM:
    """Stands in for a VLM: each request streams a piece every 10 ms for up to 20 s unless its control stops it."""

    max_length = 256

    def prompt_ids(self, request):
        return [1]

    def _check_length(self, *_):
        pass

    def stream_requests(self, requests, config, control):
        for _ in range(2000):
            if control.reason():
                self.last_stats = type("S", (), {"finish_reasons": [control.reason()]})()
                return
            yield 0, "x"
            time.sleep(0.01)


def test_engine_close_with_cancel_stops_running_and_queued_jobs():
    from edgelvm.runtime.engine import Engine

    engine = Engine(_SlowVLM(), max_queue=4)
    jobs = [engine.submit(None, "q") for _ in range(3)]
    time.sleep(0.1)
    started = time.monotonic()
    engine.close(wait=True, cancel=True)
    assert time.monotonic() - started < 1.0
    assert [j.finish_reason for j in jobs] == ["cancelled"] * 3


# ---- the server: real uvicorn on loopback ----------------------------------------------------------------------------
@contextmanager
def serving(engine: Any, **config: Any) -> Iterator[int]:
    """``make_server`` (the CLI's settings) over ``engine`` in a thread, on an ephemeral loopback port."""
    from edgelvm.serve import ServeConfig, create_app
    from edgelvm.serve.server import make_server

    server_options = {k: config.pop(k) for k in ("header_timeout", "max_connections") if k in config}
    app = create_app(engine, ServeConfig(model_id=MODEL, **config))
    server = make_server(app, engine=engine, log_level="warning", **server_options)
    sock = socket.socket()
    sock.bind((HOST, 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def http(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout=30.0):
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def engine(vlm):
    from edgelvm.runtime.engine import Engine

    engine = Engine(vlm, max_queue=4)
    yield engine
    engine.close()


def test_slow_clients_do_not_block_health_or_chat(engine, test_images):
    """64 connections that send a request line and nothing else, and 3 that announce a 1 MB body and send 10 bytes:
    /health and a real chat request still answer within 1 s; the slow body gets 408 at the body deadline and the
    slow headers are dropped at the header deadline."""
    url = data_url(test_images[0])
    with serving(engine, body_timeout=2.0, header_timeout=3.0) as port:
        http(port, "POST", "/v1/chat/completions", chat("Warm up?", url, max_tokens=2))
        slow = []
        for _ in range(64):
            s = socket.create_connection((HOST, port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            slow.append(s)
        bodies = []
        for _ in range(3):
            s = socket.create_connection((HOST, port))
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1048576\r\n\r\n{"model":'
            )
            bodies.append(s)
        time.sleep(0.3)
        try:
            started = time.monotonic()
            status, _, raw = http(port, "GET", "/health", timeout=5)
            health_s = time.monotonic() - started
            assert status == 200 and health_s < 1.0, (status, raw, health_s)
            started = time.monotonic()
            status, _, raw = http(port, "POST", "/v1/chat/completions", chat("What?", url, max_tokens=4), timeout=5)
            chat_s = time.monotonic() - started
            assert status == 200 and chat_s < 1.0, (status, raw[:200], chat_s)
            bodies[0].settimeout(5)
            answer = bodies[0].recv(65536)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            slow[0].settimeout(5)
            assert slow[0].recv(100) == b"", "the connection that never finished its headers was not closed"
        finally:
            for s in slow + bodies:
                s.close()
        print(f"\n64 slow connections + 3 slow bodies: /health {health_s * 1e3:.0f} ms, chat {chat_s * 1e3:.0f} ms")


def test_cross_site_and_auth_guards(engine):
    body = chat("Hi?", max_tokens=2)
    with serving(engine, api_key="s3cret", allowed_hosts=("localhost", "127.0.0.1", "robot.lan")) as port:
        auth = {"Authorization": "Bearer s3cret"}
        assert http(port, "POST", "/v1/chat/completions", body, auth)[0] == 200
        assert http(port, "POST", "/v1/chat/completions", body, {**auth, "Host": "robot.lan:8000"})[0] == 200
        cases = {
            "no key": ({}, 401, "invalid_api_key"),
            "wrong key": ({"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
            "rebinding host": ({**auth, "Host": "attacker.example:8000"}, 400, "host_not_allowed"),
            "foreign origin": ({**auth, "Origin": "https://evil.example"}, 403, "origin_not_allowed"),
            "null origin": ({**auth, "Origin": "null"}, 403, "origin_not_allowed"),
            "form post": ({**auth, "Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            "urlencoded": ({**auth, "Content-Type": "application/x-www-form-urlencoded"}, 415, None),
        }
        for name, (headers, status, code) in cases.items():
            got, _, raw = http(port, "POST", "/v1/chat/completions", body, headers)
            assert got == status, (name, raw)
            assert code is None or json.loads(raw)["error"]["code"] == code, name
        assert http(port, "POST", "/v1/chat/completions", body, {**auth, "Origin": "http://localhost:3000"})[0] == 200
        assert http(port, "GET", "/v1/models")[0] == 401
        assert http(port, "GET", "/health")[0] == 200  # open for probes


def test_request_timeout_counts_from_arrival(engine, test_images):
    """The deadline covers reading and decoding too: a request whose time ran out there is not queued at all."""
    url = data_url(test_images[0])
    with serving(engine, request_timeout=0.001) as port:
        status, _, raw = http(port, "POST", "/v1/chat/completions", chat("Hi?", url, max_tokens=4))
        assert status == 504 and json.loads(raw)["error"]["code"] == "timeout"
    with serving(engine, request_timeout=0.5) as port:
        started = time.monotonic()
        status, _, raw = http(port, "POST", "/v1/chat/completions", chat("Hi?", url, max_tokens=100, min_tokens=100))
        elapsed = time.monotonic() - started
    assert status in (200, 504) and elapsed < 1.5, (status, raw[:200], elapsed)


def test_shutdown_cancels_in_flight_requests():
    """SIGTERM / should_exit: the running job is cancelled at once (not run to completion); the stream ends with an
    error event, and the server stops well before its graceful timeout."""
    from edgelvm.runtime.engine import Engine

    engine = Engine(_SlowVLM(), max_queue=4)
    from edgelvm.serve import ServeConfig, create_app
    from edgelvm.serve.server import make_server

    server = make_server(create_app(engine, ServeConfig(model_id=MODEL)), engine=engine, log_level="warning")
    sock = socket.socket()
    sock.bind((HOST, 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = sock.getsockname()[1]
    conn = socket.create_connection((HOST, port), timeout=10)
    payload = json.dumps({"messages": [{"role": "user", "content": "go"}], "stream": True}).encode()
    conn.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = conn.recv(4096)
    assert b"200" in received.split(b"\r\n")[0]
    started = time.monotonic()
    server.should_exit = True
    while chunk := conn.recv(65536):
        received += chunk
    thread.join(10)
    elapsed = time.monotonic() - started
    conn.close()
    sock.close()
    engine.close(cancel=True)
    assert b'"error"' in received and b"shutting_down" in received and b"[DONE]" in received
    assert not thread.is_alive() and elapsed < 3.0, elapsed


def test_port_out_of_range_is_a_clean_error(tmp_path):
    code = "from edgelvm.serve.cli import main; main()"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "--port", "99999"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "not a TCP port" in out.stderr and "Traceback" not in out.stderr


# ---- the official openai client --------------------------------------------------------------------------------------
def test_openai_client_chat_stream_and_images(engine, vlm, test_images, monkeypatch):
    openai = pytest.importorskip("openai")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with serving(engine, api_key="k-123") as port:
        client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="k-123", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == [MODEL]
        content = [
            {"type": "image_url", "image_url": {"url": data_url(test_images[0])}},
            {"type": "text", "text": "What is on the table?"},
        ]
        messages = [{"role": "user", "content": content}]
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        expected = vlm.generate(test_images[0], "What is on the table?", max_new_tokens=8)
        assert answer.choices[0].message.content == expected and expected
        assert answer.usage.completion_tokens <= 8
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == expected
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=-1)
        bad = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)

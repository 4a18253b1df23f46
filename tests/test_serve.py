"""The OpenAI-compatible server, over real HTTP on loopback: a real uvicorn server in a subprocess (its memory is its
own, measured from /proc) serving a tiny bundle, plus an in-process one over a stand-in engine whose jobs block, so
that cancellation on client disconnect is checked deterministically."""

from __future__ import annotations

import base64
import http.client
import io
import json
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = "tiny"
HOST = "127.0.0.1"
HTTP_TIMEOUT = 30.0


# ---- helpers ------------------------------------------------------------------------------------------------------
@contextmanager
def run_server(bundle: Path, *args: str, startup_s: float = 90.0) -> Iterator[tuple[int, subprocess.Popen]]:
    """``edgelvm serve`` in a subprocess on an ephemeral loopback port; yields (port, process); always stopped."""
    code = "from edgelvm.serve.cli import main; main()"
    cmd = [sys.executable, "-c", code, str(bundle), "--host", HOST, "--port", "0", "--model-id", MODEL, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()  # drains too
    try:
        port, seen, deadline = None, [], time.monotonic() + startup_s
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            if line.startswith("edgelvm serve:") and f"http://{HOST}:" in line:
                port = int(line.rsplit(":", 1)[1])
        assert port is not None, f"server did not start: {''.join(seen)}"
        while time.monotonic() < deadline:  # the socket is bound before uvicorn accepts on it
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return request(port, "GET", path)


def post(port: int, payload: dict[str, Any] | bytes) -> tuple[int, dict[str, str], Any]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, headers, raw = request(port, "POST", "/v1/chat/completions", body)
    return status, headers, raw


def sse_events(raw: bytes) -> list[Any]:
    """The ``data:`` payloads of a server-sent-event stream, JSON-decoded except the final ``[DONE]``."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(prompt: str, url: str | None = None, **fields: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    content.append({"type": "text", "text": prompt})
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` but whose data is an 8×8 image: decoding it fully fails, so a
    413 (rather than a 400 "corrupt") proves the size is checked from the header, before decoding."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    ihdr = struct.pack(">II", width, height) + data[24:29]  # signature(8) len(4) "IHDR"(4) | w h depth color ...
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def proc_status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


# ---- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["llama-clip"]


@pytest.fixture(scope="module")
def server(bundle) -> Iterator[tuple[int, subprocess.Popen]]:
    with run_server(bundle, "--max-queue", "4", "--threads", "1", "--log-level", "warning") as running:
        yield running


@pytest.fixture(scope="module")
def port(server) -> int:
    return server[0]


@pytest.fixture(scope="module")
def vlm(bundle):
    from edgelvm.runtime import VLM

    return VLM.load(bundle, threads=1)


# ---- answers --------------------------------------------------------------------------------------------------------
def test_completion_equals_runtime_generate(port, vlm, test_images):
    prompt = "What is on the table?"
    status, _, raw = post(port, chat(prompt, data_url(test_images[0]), max_tokens=12))
    assert status == 200, raw
    body = json.loads(raw)
    expected = vlm.generate(test_images[0], prompt, max_new_tokens=12)
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert expected, "the tiny model answered nothing: the comparison would be vacuous"
    assert choice["finish_reason"] == vlm.last_stats.finish_reasons[0]
    assert body["usage"]["prompt_tokens"] == vlm.last_stats.prompt_tokens
    assert body["usage"]["completion_tokens"] == vlm.last_stats.new_tokens <= 12
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_stream_concatenates_to_the_completion(port, test_images):
    payload = chat("Describe the image in one sentence.", data_url(test_images[1]), max_completion_tokens=10)
    status, _, raw = post(port, payload)
    assert status == 200, raw
    answer = json.loads(raw)["choices"][0]
    status, headers, raw = post(port, {**payload, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == answer["message"]["content"] and text
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [answer["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 10


def test_text_only_request_is_answered(port, vlm):
    status, _, raw = post(
        port, {"model": MODEL, "messages": [{"role": "user", "content": "Is there a dog?"}], "max_tokens": 8}
    )
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"] == vlm.generate(
        None, "Is there a dog?", max_new_tokens=8
    )


def test_sampling_seed_and_stop_reach_the_runtime(port, vlm, test_images):
    url = data_url(test_images[0])
    sampled = [post(port, chat("Count.", url, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)) for _ in range(2)]
    assert sampled[0][0] == 200 and json.loads(sampled[0][2])["choices"] == json.loads(sampled[1][2])["choices"]
    assert json.loads(sampled[0][2])["choices"][0]["message"]["content"] == vlm.generate(
        test_images[0], "Count.", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7
    )
    greedy = vlm.generate(test_images[0], "Count.", max_new_tokens=12)
    start = next(i for i in range(2, len(greedy) - 1) if "\ufffd" not in greedy[i : i + 2])
    stop = greedy[start : start + 2]
    status, _, raw = post(port, chat("Count.", url, max_tokens=12, stop=[stop]))
    choice = json.loads(raw)["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == greedy[: greedy.index(stop)]


# ---- refusals -------------------------------------------------------------------------------------------------------
def _not_an_image() -> str:
    return "data:image/png;base64," + base64.b64encode(b"this is not a picture").decode()


BAD_REQUESTS = {
    "bad base64": (chat("?", "data:image/png;base64,@@not base64@@"), 400, "invalid_base64"),
    "not an image": (chat("?", _not_an_image()), 400, "invalid_image"),
    "oversized image": (
        chat("?", "data:image/png;base64," + base64.b64encode(png_claiming(5000, 5000)).decode()),
        413,
        "image_too_large",
    ),
    "unknown model": ({**chat("?"), "model": "gpt-9"}, 404, "model_not_found"),
    "malformed json": (b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    "missing messages": ({"model": MODEL}, 400, "missing_messages"),
    "empty messages": ({"model": MODEL, "messages": []}, 400, "missing_messages"),
    "local file refused": (chat("?", "/etc/hostname"), 400, "local_files_disabled"),
    "file url refused": (chat("?", "file:///etc/hostname"), 400, "local_files_disabled"),
    "remote url": (chat("?", "http://127.0.0.1/x.png"), 400, "unsupported_image_url"),
    "prompt too long": (chat("?", max_tokens=100_000), 400, "context_length_exceeded"),
    "boolean max_tokens": (chat("?", max_tokens=True), 400, "invalid_type"),
    "temperature range": (chat("?", temperature=3), 400, "invalid_value"),
    "n > 1": (chat("?", n=2), 400, "unsupported_value"),
    "placeholder in text": (chat("look: <image>"), 400, None),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_a_json_error(port, case):
    payload, status, code = BAD_REQUESTS[case]
    got, headers, raw = post(port, payload)
    assert got == status, raw
    assert headers["content-type"] == "application/json"
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code


def test_declared_oversized_body_is_refused_before_reading(port):
    """413 from the Content-Length alone: the server answers without waiting for 100 MB that never come."""
    with socket.create_connection((HOST, port), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 104857600\r\n\r\n{"model":'
        )
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_models_health_and_unknown_routes(port):
    status, _, raw = get(port, "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(raw)["data"]] == [MODEL]
    assert get(port, f"/v1/models/{MODEL}")[0] == 200
    assert get(port, "/v1/models/other")[0] == 404
    status, _, raw = get(port, "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok" and json.loads(raw)["model"] == MODEL
    status, _, raw = get(port, "/v2/nothing")
    assert status == 404 and "error" in json.loads(raw)
    status, _, raw = get(port, "/v1/chat/completions")
    assert status == 405 and "error" in json.loads(raw)


def test_local_files_only_with_the_flag(bundle, vlm, test_images, tmp_path):
    path = tmp_path / "frame.png"
    test_images[0].save(path)
    expected = vlm.generate(test_images[0], "What?", max_new_tokens=6)
    with run_server(bundle, "--allow-local-files", "--threads", "1", "--log-level", "warning") as (port, _):
        for url in (str(path), path.as_uri()):
            status, _, raw = post(port, chat("What?", url, max_tokens=6))
            assert status == 200, raw
            assert json.loads(raw)["choices"][0]["message"]["content"] == expected
        status, _, raw = post(port, chat("What?", str(tmp_path / "missing.png"), max_tokens=6))
        assert status == 400 and json.loads(raw)["error"]["code"] == "image_not_found"


# ---- load -----------------------------------------------------------------------------------------------------------
def test_bounded_load(server, test_images):
    """16 clients × 10 requests against a queue of 4: every answer is a completion or an explicit 429 with
    Retry-After; the server's peak memory stays bounded and it stays healthy."""
    port, proc = server
    from PIL import Image

    rng = np.random.default_rng(1)
    frames = [data_url(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))) for _ in range(4)]
    rss_before_kb = proc_status_kb(proc.pid, "VmRSS")
    before = json.loads(get(port, "/health")[2])["counts"]

    def client(index: int) -> list[tuple[int, str]]:
        outcomes = []
        for i in range(10):
            status, headers, raw = post(port, chat(f"Question {i}?", frames[(index + i) % 4], max_tokens=4))
            if status == 200:
                body = json.loads(raw)
                ok = body["choices"][0]["finish_reason"] in ("stop", "length")
                outcomes.append((200, "" if ok else raw.decode()))
            elif status == 429:
                ok = headers.get("retry-after", "").isdigit() and json.loads(raw)["error"]["code"] == "queue_full"
                outcomes.append((429, "" if ok else raw.decode()))
                time.sleep(0.02)
            else:
                outcomes.append((status, raw.decode()[:300]))
        return outcomes

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = [o for outcomes in pool.map(client, range(16), timeout=240) for o in outcomes]
    elapsed = time.monotonic() - started
    failures = [o for o in results if o[0] not in (200, 429) or o[1]]
    assert not failures, failures[:5]
    served, busy = sum(s == 200 for s, _ in results), sum(s == 429 for s, _ in results)
    assert served + busy == 160 and served >= 16, (served, busy)
    after = json.loads(get(port, "/health")[2])
    assert after["queued"] == 0
    assert after["counts"].get("http_429", 0) - before.get("http_429", 0) == busy
    peak_kb = proc_status_kb(proc.pid, "VmHWM")
    growth_mb = (peak_kb - rss_before_kb) / 1024
    print(
        f"\nload: {served} served, {busy} busy in {elapsed:.1f} s; server RSS {rss_before_kb / 1024:.0f} MB → "
        f"peak {peak_kb / 1024:.0f} MB"
    )
    assert growth_mb < 300, f"server memory grew by {growth_mb:.0f} MB under load"


# ---- cancellation on disconnect (in-process server, stand-in engine) ------------------------------------------------
class StallingEngine:
    """Engine stand-in whose jobs emit one piece, then hang until cancelled: a disconnect must cancel them."""

    queued = 0

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def submit(self, images, prompt=None, *, messages=None, timeout=None, **options):
        from edgelvm.runtime.engine import Job
        from edgelvm.runtime.vlm import Request, make_config

        job = Job(Request(prompt, images, messages), make_config(options), None)
        job._emit("first")

        def finish() -> None:
            job._finish("cancelled" if job.control.cancelled.wait(30) else "length")

        threading.Thread(target=finish, daemon=True).start()
        self.jobs.append(job)
        return job


@pytest.fixture
def stalling_server() -> Iterator[tuple[int, StallingEngine]]:
    import uvicorn

    from edgelvm.serve import ServeConfig, create_app

    engine = StallingEngine()
    sock = socket.socket()
    sock.bind((HOST, 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServeConfig(model_id=MODEL)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield sock.getsockname()[1], engine
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_job(stalling_server, stream):
    port, engine = stalling_server
    body = json.dumps(chat("?", max_tokens=50, stream=stream)).encode()
    with socket.create_connection((HOST, port), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if stream:  # wait until the first piece has arrived, so the disconnect is mid-stream
            received = b""
            while b'"first"' not in received:
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
        else:
            deadline = time.monotonic() + 10
            while not engine.jobs and time.monotonic() < deadline:
                time.sleep(0.02)
    assert len(engine.jobs) == 1
    assert engine.jobs[0].control.cancelled.wait(10), "the job was not cancelled after the client went away"


# ---- CLI ------------------------------------------------------------------------------------------------------------
def test_missing_extra_says_what_to_install(monkeypatch):
    from edgelvm.errors import EdgeLVMError
    from edgelvm.serve import cli

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(EdgeLVMError, match=r"pip install 'edgelvm\[serve\]'"):
        cli._import_extra()


def test_protocol_converts_messages_in_order(test_images):
    from edgelvm.serve.protocol import ServeConfig, parse_chat_request

    url = data_url(test_images[1])
    payload = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image_url", "image_url": url}]},
            {"role": "assistant", "content": None},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(test_images[0])}}]},
        ],
        "max_tokens": 5,
        "max_completion_tokens": 7,
        "stop": "x",
    }
    parsed = parse_chat_request(json.dumps(payload).encode(), ServeConfig(model_id=MODEL))
    assert parsed.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "image"}]},
    ]
    assert [im.size for im in parsed.images] == [test_images[1].size, test_images[0].size]
    assert parsed.options == {"max_new_tokens": 7, "stop": ("x",)}
    assert not parsed.stream

"""Load test of ``edgelvm serve`` on loopback: normal clients under an attack set, bounded in requests and time.

    .venv/bin/python benchmarks/load_test.py                       # the shipped teacher, exported on first use
    .venv/bin/python benchmarks/load_test.py --bundle bundles/x --clients 8 --requests 10 --max-seconds 90

It starts the server in a subprocess on 127.0.0.1 (an ephemeral port; nothing leaves the machine), warms it up,
reads its idle RSS from /proc, then runs for at most ``--max-seconds``:

- ``--clients`` normal clients sending chat requests (a small image, ``max_tokens`` 8) for ``--seconds`` (at most
  ``--requests`` each);
- ``--slow-headers`` connections that send a request line and nothing else (re-opened when the server drops them);
- ``--slow-bodies`` connections that announce a 1 MB body and send 10 bytes (re-opened after their 408);
- ``--hostile`` clients looping over hostile requests: a 1x40000 PNG (resize bomb), the largest allowed image
  (4096x4096), a prompt of the largest allowed size, a 19 MB prompt, NaN / 1e400 numbers, a lone surrogate, deep
  nesting, a text/plain body, a foreign Host, a foreign Origin.

It reports throughput and p50/p99 latency of the normal clients, statuses by kind of client, and the server's RSS:
idle, peak (VmHWM) and 3 s after the load stopped, against the bounds documented in docs/serving.md: peak ≤ 2 × idle
+ (max_queue + 1 + 2) × the largest allowed image (4096² × 3 B = 48 MiB: the queued, the running and the two being
decoded) + 2 × the largest body (20 MiB); after ≤ idle + 64 MiB. Exit status 1 when a normal request failed with
anything but 429, /health failed, or a bound was passed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "shapes-teacher"
HOST = "127.0.0.1"
QUEUE = 4  # the server's --max-queue


def teacher_bundle(workdir: Path) -> Path:
    bundle = workdir / "teacher"
    if not (bundle / "edgelvm.json").is_file():
        from edgelvm.export import ExportConfig, export

        print("[load] exporting the shipped teacher …", file=sys.stderr)
        export(TEACHER, bundle, ExportConfig(max_length=256, force=True))
    return bundle


def start_server(bundle: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    code = "from edgelvm.serve.cli import main; main()"
    cmd = [sys.executable, "-c", code, str(bundle), "--host", HOST, "--port", "0", "--log-level", "error", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line.startswith("edgelvm serve:"):
            port = int(line.rsplit(":", 1)[1])
            while time.monotonic() < deadline:
                try:
                    if request(port, "GET", "/health")[0] == 200:
                        return proc, port
                except OSError:
                    time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=60.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        sent = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def png_url(width: int, height: int, noise: bool = False) -> str:
    import numpy as np
    from PIL import Image

    if noise:
        pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (width, height), (40, 90, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(prompt: str, url: str | None = None, **fields) -> bytes:
    content = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": prompt}]
    return json.dumps({"messages": [{"role": "user", "content": content}], **fields}).encode()


def hostile_requests(max_prompt_chars: int) -> list[tuple[str, bytes, dict]]:
    def text(prompt: str) -> bytes:
        return chat(prompt, max_tokens=4)

    return [
        ("thin image 1x40000", chat("?", png_url(40000, 1), max_tokens=4), {}),
        ("largest image 4096x4096", chat("?", png_url(4096, 4096), max_tokens=4), {}),
        ("largest prompt", text("a " * (max_prompt_chars // 2)), {}),
        ("19 MB prompt", text("b" * 19_000_000), {}),
        ("NaN temperature", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', {}),
        ("1e400", b'{"messages": [{"role": "user", "content": "x"}], "top_p": 1e400}', {}),
        ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', {}),
        ("deep nesting", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", {}),
        ("text/plain", text("x"), {"Content-Type": "text/plain"}),
        ("foreign Host", text("x"), {"Host": "attacker.example"}),
        ("foreign Origin", text("x"), {"Origin": "https://evil.example"}),
        ("seed -1", chat("x", seed=-1), {}),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: the shipped teacher, exported)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edgelvm_load_test")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=100, help="at most this many per normal client")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the normal clients run, under attack")
    p.add_argument("--slow-headers", type=int, default=64)
    p.add_argument("--slow-bodies", type=int, default=3)
    p.add_argument("--hostile", type=int, default=2, help="clients looping over the hostile requests")
    p.add_argument("--max-seconds", type=float, default=120.0, help="hard bound on the whole run")
    p.add_argument("--threads", type=int, default=1, help="the server's onnxruntime threads")
    args = p.parse_args()

    bundle = args.bundle or teacher_bundle(args.workdir)
    extra = ["--threads", str(args.threads), "--max-queue", str(QUEUE)]
    extra += ["--header-timeout", "10", "--body-timeout", "10"]
    proc, port = start_server(bundle, extra)
    stop = threading.Event()
    normal: list[tuple[int, float]] = []
    hostile: Counter[str] = Counter()
    attack_counts: Counter[str] = Counter()
    lock = threading.Lock()
    try:
        from edgelvm.runtime import VLM

        max_prompt_chars = VLM.load(bundle, threads=1).max_prompt_chars
        image = png_url(64, 64, noise=True)
        for _ in range(3):  # warm up: sessions, allocator, first-request paths
            request(port, "POST", "/v1/chat/completions", chat("What shape is this?", image, max_tokens=8))
        time.sleep(1)
        idle_kb = rss_kb(proc.pid, "VmRSS")
        deadline = time.monotonic() + args.max_seconds

        def slow_header() -> None:
            while not stop.is_set():
                try:
                    s = socket.create_connection((HOST, port), timeout=30)
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
                    with lock:
                        attack_counts["slow-header connections"] += 1
                    s.settimeout(1)
                    while not stop.is_set():
                        try:
                            if s.recv(1024) == b"":
                                break  # dropped at the header deadline: open another
                        except TimeoutError:
                            continue
                    s.close()
                except OSError:
                    time.sleep(0.5)

        def slow_body() -> None:
            while not stop.is_set():
                try:
                    s = socket.create_connection((HOST, port), timeout=30)
                    s.sendall(
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b'Content-Length: 1048576\r\n\r\n{"model":'
                    )
                    s.settimeout(1)
                    answer = b""
                    while not stop.is_set() and not answer:
                        try:
                            answer = s.recv(1024)
                        except TimeoutError:
                            continue
                    with lock:
                        attack_counts[f"slow body → {answer[9:12].decode() or 'closed'}"] += 1
                    s.close()
                except OSError:
                    time.sleep(0.5)

        cases = hostile_requests(max_prompt_chars)

        def attacker(index: int) -> None:
            i = index
            while not stop.is_set() and time.monotonic() < deadline:
                name, body, headers = cases[i % len(cases)]
                i += 1
                try:
                    status, _ = request(port, "POST", "/v1/chat/completions", body, headers)
                except OSError as err:
                    status = type(err).__name__
                with lock:
                    hostile[f"{name} → {status}"] += 1

        def client(index: int) -> None:
            for i in range(args.requests):
                if time.monotonic() > min(deadline, clients_until):
                    return
                started = time.monotonic()
                try:
                    status, _ = request(
                        port, "POST", "/v1/chat/completions", chat(f"Q{i}: what shape?", image, max_tokens=8)
                    )
                except OSError:
                    status = 0
                with lock:
                    normal.append((status, time.monotonic() - started))
                if status == 429:
                    time.sleep(0.05)

        background = [threading.Thread(target=slow_header, daemon=True) for _ in range(args.slow_headers)]
        background += [threading.Thread(target=slow_body, daemon=True) for _ in range(args.slow_bodies)]
        background += [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(args.hostile)]
        for t in background:
            t.start()
        time.sleep(3)  # the attack is under way before the normal clients start
        started = time.monotonic()
        clients_until = started + args.seconds
        health_started = time.monotonic()
        health = request(port, "GET", "/health")[0]
        health_ms = (time.monotonic() - health_started) * 1e3
        clients = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(max(1.0, deadline - time.monotonic() + 60))
        elapsed = time.monotonic() - started
        stop.set()
        for t in background:
            t.join(30)
        peak_kb = rss_kb(proc.pid, "VmHWM")
        time.sleep(3)
        after_kb = rss_kb(proc.pid, "VmRSS")
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

    latencies = sorted(s for status, s in normal if status == 200)
    statuses = Counter(status for status, _ in normal)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else float("nan")

    # (queue + the running request + the 2 being decoded) x the largest allowed image, + 2 bodies being parsed
    bound_kb = 2 * idle_kb + ((QUEUE + 1 + 2) * 4096 * 4096 * 3 + 2 * 20 * 2**20) // 1024
    returned_kb = idle_kb + 64 * 1024
    report = {
        "normal": {
            "requests": len(normal),
            "ok_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(pct(0.5), 1),
            "p99_ms": round(pct(0.99), 1),
            "statuses": dict(statuses),
        },
        "health_under_attack_ms": round(health_ms, 1),
        "health_status": health,
        "hostile": dict(sorted(hostile.items())),
        "attack": dict(attack_counts),
        "rss_mb": {
            "idle": round(idle_kb / 1024),
            "peak": round(peak_kb / 1024),
            "after": round(after_kb / 1024),
            "peak_bound": round(bound_kb / 1024),
            "after_bound": round(returned_kb / 1024),
        },
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(report, indent=2))
    failed = [s for s in statuses if s not in (200, 429)]
    return 1 if failed or peak_kb > bound_kb or after_kb > returned_kb or health != 200 else 0


if __name__ == "__main__":
    raise SystemExit(main())

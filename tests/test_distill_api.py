"""Distilling from a teacher behind an OpenAI-compatible API (issue 23).

- The shipped teacher, exported and served by a real ``edgelvm serve`` on loopback, answers a derived student's
  training records through the ``openai`` client; the cache holds every answer and the student's loss drops.
- A run killed after k answers resumes without asking any answered record again (the server's /health counts).
- ``edgelvm serve`` returns no logprobs (it refuses the field), so the token-level KD path, malformed answers and
  server errors are tested against a small OpenAI-compatible stub over real HTTP in this file.

The accuracy comparison (API teacher vs. local logit KD vs. ground truth, same steps) is
``benchmarks/distill_api.py``; numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from edgelvm.distill import DistillConfig, StudentSpec, TeacherAPIConfig, distill  # noqa: E402
from edgelvm.errors import ConfigError, EdgeLVMError  # noqa: E402

TEACHER = Path(__file__).resolve().parents[1] / "models" / "shapes-teacher"
pytestmark = pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="models/shapes-teacher is missing")
HOST = "127.0.0.1"
MODEL = "shapes"
STUDENT = StudentSpec(text_layers=2, text_hidden=128, text_intermediate=256, vision_layers=2, vision_hidden=96)


# ---- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from edgelvm.data import write_split

    return write_split(tmp_path_factory.mktemp("shapes") / "train", seed=31, n=12)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    """The shipped teacher, exported, behind a real ``edgelvm serve`` on a loopback port: yields its base URL."""
    from edgelvm.export import ExportConfig, export

    bundle = export(TEACHER, tmp_path_factory.mktemp("teacher") / "bundle", ExportConfig(max_length=128)).bundle_dir
    with edgelvm_serve(bundle) as url:
        yield url


@contextmanager
def edgelvm_serve(bundle: Path) -> Iterator[str]:
    code = "from edgelvm.serve.cli import main; main()"
    cmd = [sys.executable, "-c", code, str(bundle), "--host", HOST, "--port", "0", "--model-id", MODEL]
    proc = subprocess.Popen([*cmd, "--threads", "1", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        port, deadline = None, time.monotonic() + 90
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line.startswith("edgelvm serve:") and f"http://{HOST}:" in line:
                port = int(line.rsplit(":", 1)[1])
        assert port is not None, "edgelvm serve did not start"
        url = f"http://{HOST}:{port}"
        while time.monotonic() < deadline:
            try:
                health(url)
                break
            except OSError:
                time.sleep(0.1)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as response:
        return json.loads(response.read())


def asked(url: str) -> int:
    """Chat requests the server has received."""
    return int(health(url)["counts"].get("requests", 0))


def _cfg(out: Path, api: TeacherAPIConfig, **kw: Any) -> DistillConfig:
    base = {"out": out, "steps": 3, "batch_size": 4, "save_every": 100, "progress": False, "warmup": 1}
    return DistillConfig(**{**base, "kd_weight": 0.0, "ce_weight": 1.0, "teacher_api": api, **kw})


def cached_entries(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("??/*.json"))]


# ---- through edgelvm serve ---------------------------------------------------------------------------------------
def test_served_teacher_teaches_a_derived_student(served, data, tmp_path):
    from edgelvm.data import load_jsonl_dataset

    records = load_jsonl_dataset(data)
    before = asked(served)
    api = TeacherAPIConfig(url=served, model=MODEL, max_tokens=16, concurrency=2)
    cfg = _cfg(tmp_path / "s", api, steps=8, batch_size=12, lr=2e-3, log_every=1)
    report = distill(str(TEACHER), STUDENT, data, cfg)
    assert asked(served) - before == len(records)  # each record asked once
    stats = report.teacher_api
    assert (stats["answered"], stats["malformed"], stats["asked"], stats["from_cache"]) == (len(records), 0, 12, 0)
    entries = cached_entries(tmp_path / "s" / ".distill" / "teacher_api")
    assert len(entries) == len(records) and {e["status"] for e in entries} == {"ok"}
    assert {e["record"] for e in entries} == {r.id for r in records}
    # the shipped teacher is ~100% right on its task: its answers are (nearly all) the ground truth
    truth = {r.id: r.answer for r in records}
    assert sum(e["text"].strip() == truth[e["record"]] for e in entries) >= len(records) - 1
    first, last = report.history[0]["ce"], report.history[-1]["ce"]
    assert last < 0.8 * first, (first, last)  # a running mean (0.9 decay): the last step's loss is lower still
    assert report.finished and (tmp_path / "s" / "model.safetensors").is_file()


def test_killed_answering_resumes_without_asking_again(served, data, tmp_path, monkeypatch):
    import edgelvm.distill.teacher_api as teacher_api

    store, stored = teacher_api._store, []

    class Killed(Exception):
        pass

    def dying_store(cache, key, entry):  # the process "dies" right after its 5th answer is on disk
        store(cache, key, entry)
        stored.append(key)
        if len(stored) == 5:
            raise Killed

    api = TeacherAPIConfig(url=served, model=MODEL, max_tokens=16, concurrency=1)
    out = tmp_path / "s"
    before = asked(served)
    monkeypatch.setattr(teacher_api, "_store", dying_store)
    with pytest.raises(Killed):
        distill(str(TEACHER), STUDENT, data, _cfg(out, api, steps=1))
    assert asked(served) - before == 5
    monkeypatch.setattr(teacher_api, "_store", store)
    with pytest.raises(ConfigError, match="--resume"):  # an unfinished run is not silently restarted
        distill(str(TEACHER), STUDENT, data, _cfg(out, api, steps=1))
    report = distill(str(TEACHER), STUDENT, data, _cfg(out, api, steps=1, resume=True))
    assert asked(served) - before == 12  # 5 + the 7 not answered: nothing asked twice
    assert (report.teacher_api["from_cache"], report.teacher_api["asked"]) == (5, 7)


def test_edgelvm_serve_refuses_logprobs_and_the_run_stops_early(served, data, tmp_path):
    api = TeacherAPIConfig(url=served, model=MODEL, top_logprobs=5, tokenizer=str(TEACHER))
    before = asked(served)
    with pytest.raises(EdgeLVMError, match=r"failed the first 8 requests.*logprobs"):
        distill(str(TEACHER), STUDENT, data, _cfg(tmp_path / "s", api, kd_weight=1.0))
    assert asked(served) - before <= 8 + api.concurrency


# ---- an OpenAI-compatible stub: logprobs, malformed answers, errors -------------------------------------------------
class Stub:
    """Answers each record with its ground truth; ``top_logprobs`` as an OpenAI server would send them (each token's
    text in context, the teacher's token at p=0.8, other task words after it). ``plan[record_id]`` misbehaves:
    ``"malformed"`` (200 without choices), ``"flaky"`` (503 twice, then the answer), ``"down"`` (503 always)."""

    def __init__(self, records: list[Any], tokenizer: Any, logprobs: bool = True) -> None:
        self.by_image = {hashlib.sha256(r.image_path.read_bytes()).hexdigest(): r for r in records}
        self.tok, self.logprobs, self.plan = tokenizer, logprobs, {}
        self.requests: list[str] = []
        self.auth: str | None = None
        self.lock = threading.Lock()
        words = ("▁red", "▁blue", "▁circle", "▁square", "▁yes", "▁no", "▁2", "▁3")
        self.others = [i for i in tokenizer.convert_tokens_to_ids(list(words)) if i != tokenizer.unk_token_id]

    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        record = self.by_image[hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()]
        with self.lock:
            self.requests.append(record.id)
            seen = self.requests.count(record.id)
        mode = self.plan.get(record.id)
        if mode == "malformed":
            return 200, {"id": "x", "object": "chat.completion", "choices": []}
        if mode == "down" or (mode == "flaky" and seen <= 2):
            return 503, {"error": {"message": "overloaded", "type": "server_error"}}
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": record.answer}}
        choice["finish_reason"] = "stop"
        if self.logprobs and body.get("logprobs"):
            choice["logprobs"] = {"content": self._logprobs(record.answer, body["top_logprobs"])}
        return 200, {"id": "x", "object": "chat.completion", "model": MODEL, "choices": [choice]}

    def _logprobs(self, text: str, k: int) -> list[dict[str, Any]]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        anchor = self.tok.decode(ids[:1])
        out, previous = [], ""
        for j, tid in enumerate(ids):
            whole = self.tok.decode(ids[: j + 1])
            piece, previous = whole[len(previous) :], whole
            top = [{"token": piece, "logprob": math.log(0.8)}, {"token": "§unknown§", "logprob": math.log(0.01)}]
            for other in [o for o in self.others if o != tid][: k - 2]:
                top.append({"token": self.tok.decode([ids[0], other])[len(anchor) :], "logprob": math.log(0.02)})
            out.append({"token": piece, "logprob": math.log(0.8), "top_logprobs": top})
        return out


@contextmanager
def stub_server(stub: Stub) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.auth = self.headers.get("Authorization")
            status, payload = stub.answer(body)
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TEACHER))


def test_top_logprobs_kd_malformed_answers_and_errors(data, tokenizer, tmp_path):
    from edgelvm.data import load_jsonl_dataset

    records = load_jsonl_dataset(data)
    stub = Stub(records, tokenizer)
    stub.plan = {records[0].id: "malformed", records[1].id: "flaky", records[2].id: "down"}
    out = tmp_path / "s"
    with stub_server(stub) as url:
        api = TeacherAPIConfig(url=url, model=MODEL, top_logprobs=5, tokenizer=str(TEACHER), max_retries=2)
        cfg = _cfg(out, api, kd_weight=1.0, log_every=1)
        # the record that stays down fails the run after the client's retries; the others are cached
        with pytest.raises(EdgeLVMError, match=rf"1 of 12 records could not be answered.*{records[2].id}.*503"):
            distill(str(TEACHER), STUDENT, data, cfg)
        assert stub.requests.count(records[1].id) == 3  # 503, 503, answer: the client's backoff retries
        assert stub.requests.count(records[2].id) == 3  # 1 + max_retries, then recorded as an error
        entries = {e["record"]: e for e in cached_entries(out / ".distill" / "teacher_api")}
        assert entries[records[2].id]["status"] == "error" and "503" in entries[records[2].id]["problem"]
        assert entries[records[0].id]["status"] == "malformed" and entries[records[0].id]["raw"]
        # the server is back: the resumed run asks only the failed record
        stub.plan.pop(records[2].id)
        n = len(stub.requests)
        report = distill(str(TEACHER), STUDENT, data, DistillConfig(**{**cfg.__dict__, "resume": True}))
        assert stub.requests[n:] == [records[2].id]
    stats = report.teacher_api
    assert (stats["answered"], stats["malformed"], stats["malformed_ids"]) == (11, 1, [records[0].id])
    assert stats["with_logprobs"] == 11 and stats["misaligned"] == 0 and stats["kd_records"] > 0
    assert stats["alternatives_dropped"] > 0  # the stub's unknown piece: left out of the top-k, counted
    assert report.history[-1]["kd"] > 0 and "ce" in report.history[-1]


def test_kd_targets_are_the_teachers_top_k_at_the_right_ids(data, tokenizer):
    from edgelvm.data import load_jsonl_dataset
    from edgelvm.distill.teacher_api import APITargets, parse_completion

    record = load_jsonl_dataset(data)[0]
    url = "data:image/png;base64," + base64.b64encode(record.image_path.read_bytes()).decode()
    body = {"messages": [{"content": [{"image_url": {"url": url}}]}], "logprobs": True, "top_logprobs": 4}
    entry = parse_completion(json.dumps(Stub([record], tokenizer).answer(body)[1]))
    ids = tokenizer(record.answer, add_special_tokens=False).input_ids
    targets = APITargets(tokenizer, [entry["tokens"]], 5)
    values, indices = targets.get(0, [*ids, tokenizer.eos_token_id])
    assert indices[:, 0].tolist() == ids  # the teacher's token first (p = 0.8), at the student's id
    assert torch.allclose(values[:, 0], torch.full((len(ids),), math.log(0.8)))
    assert targets.get(0, [*ids, tokenizer.eos_token_id]) is not None
    assert APITargets(tokenizer, [entry["tokens"]], 5).get(0, [ids[-1] + 1, *ids]) is None  # misaligned: no KD
    # vLLM's token_id:N form maps directly
    assert targets.pieces.id_of(f"token_id:{ids[0]}", first=False) == ids[0]


def test_refusals_say_why(data, tokenizer, tmp_path):
    from edgelvm.data import load_jsonl_dataset

    records = load_jsonl_dataset(data)
    with stub_server(Stub(records, tokenizer, logprobs=False)) as url:
        api = TeacherAPIConfig(url=url, model=MODEL, top_logprobs=5, tokenizer=str(TEACHER))
        with pytest.raises(ConfigError, match="returned no logprobs"):
            distill(str(TEACHER), STUDENT, data, _cfg(tmp_path / "a", api, kd_weight=1.0))
    api = TeacherAPIConfig(url="http://127.0.0.1:9/v1", model=MODEL, top_logprobs=5)
    with pytest.raises(ConfigError, match="tokenizer is unknown"):
        _cfg(tmp_path / "b", api, kd_weight=1.0).validate()
    other = tmp_path / "other-tokenizer"
    tokenizer.save_pretrained(other)
    extra = type(tokenizer).from_pretrained(other)
    extra.add_tokens(["<extra>"])
    extra.save_pretrained(other)
    api = TeacherAPIConfig(url="http://127.0.0.1:9/v1", model=MODEL, top_logprobs=5, tokenizer=str(other))
    with pytest.raises(ConfigError, match="tokenizer differs"):
        distill(str(TEACHER), STUDENT, data, _cfg(tmp_path / "c", api, kd_weight=1.0))
    with pytest.raises(ConfigError, match="feature_weight"):
        _cfg(tmp_path / "d", TeacherAPIConfig(url="http://x/v1", model="m"), feature_weight=1.0).validate()
    with pytest.raises(ConfigError, match="derived student needs a local checkpoint"):
        distill(None, STUDENT, data, _cfg(tmp_path / "e", TeacherAPIConfig(url="http://x/v1", model="m")))


def test_cli_distills_from_an_api_teacher(data, tokenizer, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgelvm.cli import app
    from edgelvm.data import load_jsonl_dataset

    stub = Stub(load_jsonl_dataset(data), tokenizer)
    out = tmp_path / "cli"
    monkeypatch.setenv("EDGELVM_TEACHER_API_KEY", "secret-key")
    with stub_server(stub) as url:
        args = ["distill", str(TEACHER), "-d", str(data), "-o", str(out), "--steps", "1", "--batch-size", "4"]
        args += ["--derive", "text_layers=1,text_hidden=128,vision_layers=1", "--teacher-api", url]
        args += ["--teacher-model", MODEL, "--teacher-top-logprobs", "3", "--teacher-tokenizer", str(TEACHER)]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 used, 0 malformed" in result.output
    assert stub.auth == "Bearer secret-key"  # from $EDGELVM_TEACHER_API_KEY
    report = json.loads((out / "distill_report.json").read_text())
    assert report["config"]["kd_weight"] == 1.0 and report["config"]["ce_weight"] == 1.0  # the API defaults
    assert report["teacher_api"]["kd_records"] > 0
    # the key went to the server only: nowhere in the run's files
    assert not any("secret-key" in p.read_text(errors="ignore") for p in out.rglob("*.json"))

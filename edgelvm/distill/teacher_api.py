"""A teacher reached only through an OpenAI-compatible chat-completions API (``edgelvm serve``, vLLM, llama.cpp's
server, a hosted model): every training record is asked once, the answers are cached on disk, and the student
trains on them (sequence-level KD on the teacher's text, plus token-level KD on its ``top_logprobs`` where the
server returns them and the teacher's tokenizer is the student's).

- **Requests**: one user message per record: its image as a ``data:`` URL (the file's own bytes) and its question
  (the first user turn) as text; ``temperature`` 0 by default, ``max_tokens``, and ``logprobs`` /
  ``top_logprobs`` when asked for. Multi-turn records are asked their first question only.
- **Cache** (``DIR/<2 hex>/<sha256>.json``, one file per request, written to a temporary name and renamed): the key
  is the SHA-256 of the request (model, messages with each image replaced by the SHA-256 of its bytes, sampling
  fields), not of the server's address, so moving the server keeps the answers. An answered (or malformed) record
  is never asked again; a request that failed (an HTTP error after the client's retries, a refused request) is
  recorded with status ``error`` and asked again by the next run. A killed run therefore loses at most the
  ``concurrency`` requests in flight.
- **Transport**: the ``openai`` client, which retries 408/409/429/5xx, connection errors and timeouts with
  exponential backoff (honouring ``Retry-After``) — configured through ``max_retries`` and ``timeout``, not
  re-implemented; on top of it a rate limit (requests per second, all threads together) and a bound on requests in
  flight. The first failures abort the run early when nothing has succeeded (a wrong URL, model or key, or a server
  that refuses a field, would otherwise fail every record).
- **Malformed answers** (not JSON, no choices, no text) are stored as ``malformed`` with the raw body, skipped and
  counted in the report — never silently dropped.
- **Token-level KD**: the answer's tokens from the API are matched to the student's target tokens by their text
  (each token's piece in context, or vLLM's ``token_id:N`` form); a record whose tokens do not line up trains on
  cross-entropy only (counted). Alternatives are mapped to ids through the tokenizer's pieces; pieces that are
  ambiguous or unknown are left out of the top-k (counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from edgelvm.data.jsonl import IMAGE_MARKER, VQARecord
from edgelvm.distill.config import TeacherAPIConfig
from edgelvm.errors import ConfigError, EdgeLVMError

log = logging.getLogger(__name__)

FORMAT = 1
#: abort when this many requests failed before any succeeded (the server refuses every request)
FAIL_FAST = 8
#: a logprob below this is clamped (and is what padding uses): exp() of it is exactly 0 in float32
MIN_LOGPROB = -1e4
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


# ------------------------------------------------------------------------------------------------ requests


def _image_mime(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        fmt = image.format or ""
    return _MIME.get(fmt, f"image/{fmt.lower() or 'png'}")


def request_body(record: VQARecord, api: TeacherAPIConfig, image_url: str | None) -> dict[str, Any]:
    """The chat-completions body for ``record`` (``image_url``: its data URL, or a stand-in for hashing)."""
    content: list[dict[str, Any]] = []
    if record.image_path is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    content.append({"type": "text", "text": record.question})
    body: dict[str, Any] = {
        "model": api.model,
        "messages": [{"role": "user", "content": content}],
        "temperature": api.temperature,
        "max_tokens": api.max_tokens,
    }
    if api.top_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = api.top_logprobs
    return body


def request_key(record: VQARecord, api: TeacherAPIConfig) -> str:
    """Content address of the request: SHA-256 of its body with the image replaced by the SHA-256 of its bytes."""
    stand_in = None
    if record.image_path is not None:
        stand_in = "sha256:" + hashlib.sha256(Path(record.image_path).read_bytes()).hexdigest()
    body = request_body(record, api, stand_in)
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _data_url(path: Path) -> str:
    import base64

    return f"data:{_image_mime(path)};base64," + base64.b64encode(path.read_bytes()).decode()


# ------------------------------------------------------------------------------------------------ answers


def parse_completion(raw: str) -> dict[str, Any]:
    """A response body → ``{"status": "ok", "text", "finish_reason", "tokens"}`` or ``{"status": "malformed",
    "problem", "raw"}``. ``tokens``: ``[{"token", "logprob", "top": [[token, logprob], ...]}]`` or None."""

    def malformed(problem: str) -> dict[str, Any]:
        return {"status": "malformed", "problem": problem, "raw": raw[:2000]}

    try:
        data = json.loads(raw)
    except ValueError:
        return malformed("the response body is not JSON")
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return malformed("the response has no choices")
    choice = choices[0]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        return malformed("the answer has no text (choices[0].message.content is missing or empty)")
    entry: dict[str, Any] = {"status": "ok", "text": content, "finish_reason": choice.get("finish_reason")}
    entry["tokens"], problem = _parse_logprobs(choice.get("logprobs"))
    if problem:
        entry["logprobs_problem"] = problem
    return entry


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return max(float(value), MIN_LOGPROB)


def _parse_logprobs(logprobs: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    if logprobs is None:
        return None, None
    items = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(items, list):
        return None, "logprobs.content is not a list"
    tokens = []
    for item in items:
        token = item.get("token") if isinstance(item, dict) else None
        logprob = _number(item.get("logprob")) if isinstance(item, dict) else None
        if not isinstance(token, str) or logprob is None:
            return None, "a logprobs.content item has no string token or numeric logprob"
        top = []
        for alt in item.get("top_logprobs") or []:
            alt_lp = _number(alt.get("logprob")) if isinstance(alt, dict) else None
            if isinstance(alt, dict) and isinstance(alt.get("token"), str) and alt_lp is not None:
                top.append([alt["token"], alt_lp])
        tokens.append({"token": token, "logprob": logprob, "top": top})
    return tokens, None


class AnswerCache:
    """``DIR/<key[:2]>/<key>.json`` per request; every write goes to a temporary name and is renamed."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = self.root / "meta.json"
        if meta.is_file():
            found = json.loads(meta.read_text()).get("format")
            if found != FORMAT:
                raise ConfigError(
                    f"teacher-answer cache of format {found}, this edgelvm writes {FORMAT}",
                    where=self.root,
                    fix="point the cache at a new directory",
                )
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_json(meta, {"format": FORMAT, "kind": "edgelvm teacher-API answers"})

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, ValueError):  # absent (or unreadable: asked again)
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        _write_json(path, entry)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False))
    os.replace(tmp, path)


class RateLimiter:
    """At most ``rate`` acquisitions per second over all threads (evenly spaced; None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


@dataclasses.dataclass
class Answers:
    entries: list[dict[str, Any]]  # one per record, in order: status ok / malformed
    stats: dict[str, Any]


def answer_records(
    records: list[VQARecord], api: TeacherAPIConfig, cache_dir: str | Path, *, ask: bool = True, progress: Any = None
) -> Answers:
    """Every record's teacher answer: from the cache, or asked (``ask``) and cached. Raises when a record could not
    be answered (after the client's retries): the answered ones stay cached, so a rerun asks only the rest."""
    cache = AnswerCache(cache_dir)
    keys = [request_key(r, api) for r in records]
    entries: list[dict[str, Any] | None] = [cache.get(k) for k in keys]
    todo = [i for i, e in enumerate(entries) if e is None or e.get("status") == "error"]
    stats: dict[str, Any] = {"records": len(records), "from_cache": len(records) - len(todo), "asked": 0}
    if todo and not ask:
        raise ConfigError(
            f"{len(todo)} records have no cached teacher answer", where=cache.root, fix="run the main process first"
        )
    if todo:
        _ask(records, keys, todo, entries, api, cache, stats, progress)
    failed = [i for i, e in enumerate(entries) if e is None or e.get("status") == "error"]
    if failed:
        first = entries[failed[0]] or {}
        raise EdgeLVMError(
            f"{len(failed)} of {len(records)} records could not be answered by the teacher API (first, record "
            f"{records[failed[0]].id!r}: {first.get('problem', 'not asked')}); the {len(records) - len(failed)} "
            "answered are cached",
            where=api.url,
            fix="rerun with --resume once the server answers: only the unanswered records are asked again",
        )
    malformed = [records[i].id for i, e in enumerate(entries) if e["status"] == "malformed"]
    ok = [e for e in entries if e["status"] == "ok"]
    stats.update(
        answered=len(ok),
        malformed=len(malformed),
        malformed_ids=malformed[:20],
        truncated=sum(e.get("finish_reason") == "length" for e in ok),
        with_logprobs=sum(e.get("tokens") is not None for e in ok),
    )
    if malformed:
        log.warning("%d malformed teacher answers skipped (e.g. %s)", len(malformed), ", ".join(malformed[:5]))
    return Answers(entries, stats)  # type: ignore[arg-type]


def _ask(records, keys, todo, entries, api, cache, stats, progress) -> None:
    from openai import APIConnectionError, APIStatusError, OpenAI

    client = OpenAI(
        base_url=api.url,
        api_key=os.environ.get(api.api_key_env) or "unused",  # local servers take any key
        max_retries=api.max_retries,
        timeout=api.timeout,
    )
    limiter = RateLimiter(api.requests_per_second)

    def ask_one(i: int) -> tuple[int, dict[str, Any]]:
        record = records[i]
        body = request_body(record, api, _data_url(Path(record.image_path)) if record.image_path else None)
        limiter.acquire()
        try:
            raw = client.chat.completions.with_raw_response.create(**body)
            entry = parse_completion(raw.http_response.text)
        except APIStatusError as err:
            entry = {"status": "error", "problem": f"HTTP {err.status_code}: {str(err)[:500]}"}
        except APIConnectionError as err:  # timeouts included, after the retries
            entry = {"status": "error", "problem": f"{type(err).__name__}: {err}"[:500]}
        entry.update(key=keys[i], record=record.id, at=round(time.time(), 3))
        _store(cache, keys[i], entry)
        return i, entry

    counts = {"ok": 0, "malformed": 0, "error": 0}
    task = progress.add_task("teacher answers", total=len(records), completed=stats["from_cache"], info="") if (
        progress
    ) else None  # fmt: skip
    pending_iter = iter(todo)
    with ThreadPoolExecutor(api.concurrency, thread_name_prefix="teacher-api") as pool:
        # submitted as slots free up (not all at once), so an interrupted run leaves nothing queued behind it
        pending = {pool.submit(ask_one, i) for i in _take(pending_iter, api.concurrency)}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i, entry = future.result()
                    entries[i] = entry
                    counts[entry["status"]] += 1
                    stats["asked"] += 1
                    answered_before = stats["from_cache"] + counts["ok"] + counts["malformed"]
                    if counts["error"] >= min(FAIL_FAST, len(todo)) and not answered_before:
                        raise EdgeLVMError(
                            f"the teacher API failed the first {counts['error']} requests ({entry['problem']})",
                            where=api.url,
                            fix="check the URL, --teacher-model (GET /v1/models lists it), the key in "
                            f"${api.api_key_env}, and that the server accepts the request (a server without logprobs "
                            "refuses top_logprobs: drop --teacher-top-logprobs)",
                        )
                    if progress is not None:
                        info = f"asked {stats['asked']} | malformed {counts['malformed']} | errors {counts['error']}"
                        progress.update(task, advance=1, info=info)
                pending |= {pool.submit(ask_one, i) for i in _take(pending_iter, len(done))}
        finally:
            for future in pending:  # the ones in flight finish (and are cached); nothing new starts
                future.cancel()


def _take(iterator: Any, n: int) -> list[int]:
    out = []
    for _ in range(n):
        item = next(iterator, None)
        if item is None:
            break
        out.append(item)
    return out


def _store(cache: AnswerCache, key: str, entry: dict[str, Any]) -> None:
    cache.put(key, entry)


# ------------------------------------------------------------------------------------------------ training data


def answered_records(records: list[VQARecord], answers: Answers) -> tuple[list[VQARecord], list[Any]]:
    """Single-turn records (the question, the teacher's answer) for every ``ok`` answer, and their tokens."""
    out, tokens = [], []
    for record, entry in zip(records, answers.entries):
        if entry["status"] != "ok":
            continue
        question = (IMAGE_MARKER + "\n" if record.image_path is not None else "") + record.question
        conversations = ({"from": "human", "value": question}, {"from": "gpt", "value": entry["text"]})
        out.append(dataclasses.replace(record, answer=entry["text"].strip(), conversations=conversations))
        tokens.append(entry.get("tokens"))
    return out, tokens


class PieceMap:
    """Token text (as an API reports it) → token id, through the tokenizer's pieces: each id's text after an
    ordinary token (mid-sequence) and on its own (first token). Ambiguous pieces map to nothing."""

    def __init__(self, tokenizer: Any) -> None:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        alone = tokenizer.batch_decode([[i] for i in ids])
        anchor = next(i for i, text in zip(ids, alone) if text.strip().isalnum())
        base = tokenizer.decode([anchor])
        after = tokenizer.batch_decode([[anchor, i] for i in ids])
        self.mid = _unique((a[len(base) :], i) for a, i in zip(after, ids) if a.startswith(base))
        self.start = _unique(zip(alone, ids))

    def id_of(self, piece: str, first: bool) -> int | None:
        if piece.startswith("token_id:") and piece[9:].isdigit():  # vLLM's --return-tokens-as-token-ids
            return int(piece[9:])
        found = self.mid.get(piece)
        if found is None and first:
            found = self.start.get(piece)
        return found if found is not None and found >= 0 else None


def _unique(pairs: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for piece, i in pairs:
        out[piece] = -1 if piece in out and out[piece] != i else i
    return out


class APITargets:
    """The KD targets of each training record: its teacher tokens' top-k log-probabilities as
    (values [n, k], indices [n, k]) for the first n target positions, or None (no logprobs, or they do not line
    up with the student's tokens). Computed when a record is first trained on, then kept."""

    def __init__(self, tokenizer: Any, tokens: list[Any], k: int) -> None:
        self.tokenizer, self.tokens, self.k = tokenizer, tokens, k
        self.pieces = PieceMap(tokenizer)
        self.done: dict[int, Any] = {}
        self.stats = {"kd_records": 0, "misaligned": 0, "no_logprobs": 0, "kd_tokens": 0, "alternatives_dropped": 0}

    def get(self, index: int, target_ids: list[int]) -> tuple[Any, Any] | None:
        if index not in self.done:
            self.done[index] = self._build(self.tokens[index], target_ids)
        return self.done[index]

    def _build(self, tokens: list[dict[str, Any]] | None, target_ids: list[int]) -> tuple[Any, Any] | None:
        import torch

        if not tokens:
            self.stats["no_logprobs"] += 1
            return None
        if not _aligned(self.tokenizer, tokens, target_ids):
            self.stats["misaligned"] += 1
            return None
        values = torch.full((len(tokens), self.k), MIN_LOGPROB)
        indices = torch.zeros((len(tokens), self.k), dtype=torch.long)
        for j, token in enumerate(tokens):
            row = {target_ids[j]: token["logprob"]}  # the teacher's own token, whether or not it is in its top list
            for piece, logprob in token["top"]:
                tid = self.pieces.id_of(piece, j == 0)
                if tid is None:
                    self.stats["alternatives_dropped"] += 1
                elif tid not in row:
                    row[tid] = logprob
            best = sorted(row.items(), key=lambda kv: -kv[1])[: self.k]
            for col, (tid, logprob) in enumerate(best):
                indices[j, col], values[j, col] = tid, logprob
        self.stats["kd_records"] += 1
        self.stats["kd_tokens"] += len(tokens)
        return values, indices


def _aligned(tokenizer: Any, tokens: list[dict[str, Any]], target_ids: list[int]) -> bool:
    """Each API token is the student's target token at the same position (by its text in context)."""
    if len(tokens) > len(target_ids):
        return False
    previous = ""
    for j, token in enumerate(tokens):
        text = tokenizer.decode(target_ids[: j + 1])
        if not text.startswith(previous):
            return False
        piece, previous = text[len(previous) :], text
        got = token["token"]
        if got == f"token_id:{target_ids[j]}" or got == piece or (j == 0 and got.lstrip() == piece.lstrip()):
            continue
        return False
    return True


def progress_bar(enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )  # fmt: skip

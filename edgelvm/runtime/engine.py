"""``Engine``: one model, many callers — a bounded request queue served by one worker thread.

The concurrency model: a loaded model runs one generation at a time (on a CPU or a Jetson, parallel generations only
split the same cores and memory bandwidth), so requests wait in a bounded FIFO queue. A full queue answers
:class:`BusyError` at once instead of growing memory; every request can be cancelled and has an optional deadline
(queue wait included), both checked before each decode step, so a cancelled or late request frees the model within
one token.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from edgelvm.errors import EdgeLVMError
from edgelvm.runtime.images import load_image
from edgelvm.runtime.vlm import VLM, Control, GenerationConfig, Request, _as_list, make_config

_DONE = object()
_trim_lock = threading.Lock()
_last_trim = [0.0]


def release_free_memory(min_interval_s: float = 1.0) -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; a no-op elsewhere), at most once per
    ``min_interval_s``. Decoded images and large bodies are freed by Python but, allocated from several threads, stay
    in glibc's per-thread arenas; a server calls this when it goes idle so that its RSS returns to the idle level."""
    with _trim_lock:
        now = time.monotonic()
        if now - _last_trim[0] < min_interval_s:
            return
        _last_trim[0] = now
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class BusyError(EdgeLVMError):
    """The request queue is full; retry later (servers map this to HTTP 429)."""


class Job:
    """A submitted request: iterate it for text pieces, or call :meth:`result`; :meth:`cancel` stops it."""

    def __init__(self, request: Request, config: GenerationConfig, deadline: float | None) -> None:
        self.request = request
        self.config = config
        self.control = Control(deadline=deadline)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.stats: Any = None
        self._pieces: queue.Queue[Any] = queue.Queue()
        self._done = threading.Event()
        self._text: list[str] = []

    def cancel(self) -> None:
        self.control.cancel()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._pieces.get()
            if item is _DONE:
                self._pieces.put(_DONE)  # let a second iteration (or result()) finish too
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> str:
        """The whole answer (waits for it); raises the generation's error if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return "".join(self._text)

    # worker side
    def _emit(self, piece: str) -> None:
        self._text.append(piece)
        self._pieces.put(piece)

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._pieces.put(_DONE)
        self._done.set()


class Engine:
    """Serialises access to one :class:`VLM` through a bounded queue and a worker thread.

    engine = Engine(VLM.load("bundle/"), max_queue=8)
    job = engine.submit(frame, "Is the door open?", timeout=5.0, max_new_tokens=16)
    for piece in job: ...          # or job.result(); job.cancel() from any thread
    """

    def __init__(self, vlm: VLM, *, max_queue: int = 8) -> None:
        self.vlm = vlm
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._current: Job | None = None  # the job the worker is running
        self._worker = threading.Thread(target=self._serve, name="edgelvm-engine", daemon=True)
        self._worker.start()

    def submit(
        self,
        images: Any,
        prompt: str | None = None,
        *,
        messages: list | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Job:
        """Queue a request; raises :class:`BusyError` when the queue is full (nothing is queued then)."""
        if self._closed:
            raise EdgeLVMError("the engine is closed", where="Engine.submit", fix="create a new Engine")
        # Decode image files here, in the caller's thread: bad files fail synchronously, and decoding overlaps with
        # the worker's generation instead of queueing behind it.
        request = Request(prompt=prompt, images=[load_image(i) for i in _as_list(images)], messages=messages)
        config = make_config(options)
        prompt_ids = self.vlm.prompt_ids(request)  # validate now: bad input is the caller's error, synchronously
        self.vlm._check_length(len(prompt_ids), config.max_new_tokens)
        deadline = time.monotonic() + timeout if timeout is not None else None
        job = Job(request, config, deadline)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise BusyError(
                f"the request queue is full ({self._queue.maxsize} waiting)",
                where="Engine.submit",
                fix="retry after a short wait, or raise max_queue if memory allows",
            ) from None
        return job

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def cancel_all(self) -> int:
        """Cancel the running job and every queued one (each finishes as ``cancelled``: the running one within a
        token or a preprocessing stage, the queued ones without running); returns how many were cancelled."""
        cancelled = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # close()'s sentinel: put it back for the worker
                self._queue.put(None)
                break
            job.cancel()
            job._finish("cancelled")
            cancelled += 1
        current = self._current
        if current is not None and not current.done:
            current.cancel()
            cancelled += 1
        return cancelled

    def close(self, wait: bool = True, *, cancel: bool = False) -> None:
        """Stop accepting requests; the worker finishes the queue (or, with ``cancel``, cancels it and the running
        job — what a server does on SIGTERM), then exits."""
        if self._closed:
            return
        self._closed = True
        if cancel:
            self.cancel_all()
        self._queue.put(None)
        if wait:
            self._worker.join()

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            reason = job.control.reason()
            if reason is not None:  # cancelled or out of time while waiting
                job._finish(reason)
                continue
            self._current = job
            try:
                for _, piece in self.vlm.stream_requests([job.request], job.config, job.control):
                    job._emit(piece)
                job.stats = self.vlm.last_stats
                job._finish(self.vlm.last_stats.finish_reasons[0])
            except BaseException as err:  # the worker must survive any single request
                job._finish("error", err)
            finally:
                self._current = None
            if self._queue.empty():  # idle: return the request's freed memory (images, features) to the system
                job = None
                release_free_memory()

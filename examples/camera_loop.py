"""A camera loop: frames arrive at a fixed rate, every N-th frame asks the model a question, frames are dropped while
the model is still busy with the previous question, and each answer is printed with its latency.

This is the pattern for robots and cameras: the camera never waits for the model. One :class:`Engine` owns the model;
the loop keeps at most one question in flight (``max_queue=1`` and a check before submitting), so a slow model means
fewer answers about fresher frames, never a growing backlog of stale ones.

    python examples/camera_loop.py --bundle bundles/llava --every 10 --frames 200            # synthetic frames
    python examples/camera_loop.py --bundle bundles/llava --video clip.mp4 --every 15        # needs opencv-python

Frames are RGB ``HxWx3`` uint8 arrays (OpenCV's BGR is converted); without ``--video`` a synthetic source draws a
square and a disc moving across a gradient with numpy alone.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgelvm.runtime import VLM
from edgelvm.runtime.engine import BusyError, Engine, Job

log = logging.getLogger("camera_loop")


def synthetic_frames(count: int, height: int = 240, width: int = 320) -> Iterator[np.ndarray]:
    """Moving shapes: a red square sweeping right and a blue disc bouncing vertically, over a static gradient."""
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 96)], axis=-1).astype(np.uint8)
    for t in range(count):
        frame = background.copy()
        x0 = (t * 4) % (width - 40)
        frame[100:140, x0 : x0 + 40] = (220, 30, 30)
        cy = 40 + int(abs((t * 3) % 320 - 160)) * (height - 80) // 160
        frame[(ys - cy) ** 2 + (xs - width * 3 // 4) ** 2 < 20**2] = (30, 60, 220)
        yield frame


def video_frames(path: Path, count: int) -> Iterator[np.ndarray]:
    """Frames of a video file through OpenCV (``pip install opencv-python-headless``), converted to RGB."""
    try:
        import cv2
    except ImportError:
        sys.exit("--video needs OpenCV: pip install opencv-python-headless (or omit --video for synthetic frames)")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        sys.exit(f"cannot open video {path}")
    try:
        for _ in range(count):
            ok, frame = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


class AnswerPrinter:
    """Follows one job in a thread: time to first piece, total latency, the answer. Keeps the latencies."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.first_piece_ms: list[float] = []
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def follow(self, job: Job, frame_index: int, submitted: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(job, frame_index, submitted), daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _run(self, job: Job, frame_index: int, submitted: float) -> None:
        first = None
        pieces = []
        try:
            for piece in job:
                first = first if first is not None else time.perf_counter()
                pieces.append(piece)
        except Exception as err:  # a failed answer is reported, the loop goes on
            print(f"frame {frame_index:5d}: error: {err}", flush=True)
            return
        done = time.perf_counter()
        latency = (done - submitted) * 1e3
        self.latencies_ms.append(latency)
        ttft = ((first or done) - submitted) * 1e3
        self.first_piece_ms.append(ttft)
        print(
            f"frame {frame_index:5d}: {latency:7.1f} ms (first piece {ttft:6.1f} ms, {job.finish_reason}) "
            f"{''.join(pieces)!r}",
            flush=True,
        )


def run(args: argparse.Namespace) -> int:
    vlm = VLM.load(args.bundle, threads=args.threads)
    engine = Engine(vlm, max_queue=1)
    frames = video_frames(args.video, args.frames) if args.video else synthetic_frames(args.frames)
    printer = AnswerPrinter()
    asked = dropped = seen = 0
    period = 1.0 / args.fps if args.fps > 0 else 0.0
    next_frame_at = time.perf_counter()
    try:
        for index, frame in enumerate(frames):
            seen += 1
            if index % args.every == 0:
                if printer.busy:
                    dropped += 1  # the model is still on an older frame: skip this one, never queue behind it
                else:
                    try:
                        submitted = time.perf_counter()
                        job = engine.submit(frame, args.question, max_new_tokens=args.max_tokens, timeout=args.timeout)
                    except BusyError:
                        dropped += 1
                    else:
                        asked += 1
                        printer.follow(job, index, submitted)
            if period:  # pace like a camera: the source does not wait for the model
                next_frame_at += period
                time.sleep(max(0.0, next_frame_at - time.perf_counter()))
        printer.wait()
    finally:
        engine.close()
    latencies = printer.latencies_ms
    summary = f"{seen} frames, {asked} questions, {dropped} dropped while busy"
    if latencies:
        summary += (
            f"; latency median {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms; "
            f"first piece median {statistics.median(printer.first_piece_ms):.1f} ms"
        )
    print(summary)
    return 0 if asked else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (edgelvm export)")
    parser.add_argument("--every", type=int, default=10, help="ask about every N-th frame")
    parser.add_argument("--frames", type=int, default=120, help="frames to process")
    parser.add_argument("--video", type=Path, help="video file (OpenCV); default: synthetic moving shapes")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate of the source (0 = as fast as possible)")
    parser.add_argument("--question", default="What is moving in the picture?")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per answer before it is abandoned")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    if args.every < 1 or args.frames < 1:
        parser.error("--every and --frames must be ≥ 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())

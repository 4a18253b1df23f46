"""Runtime features for embedding in robots and cameras: feature cache, KV reuse, concurrency, cancellation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgelvm.runtime import VLM, Request
from edgelvm.runtime.engine import BusyError, Engine
from edgelvm.runtime.images.cache import VisionCache

QUESTIONS = ["What is on the table?", "Describe the image in one sentence.", "How many people?"]


def test_vision_cache_lru_eviction_by_bytes():
    cache = VisionCache(max_bytes=3 * 400)
    arrays = {k: np.full((10, 10), i, dtype=np.float32) for i, k in enumerate("abcd")}  # 400 bytes each
    for key in "abc":
        cache.put(key, arrays[key])
    assert cache.get("a") is not None  # a becomes most recent
    cache.put("d", arrays["d"])  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    assert cache.nbytes == 1200
    cache.put("huge", np.zeros(1000, dtype=np.float32))  # larger than the budget: not cached, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    assert VisionCache(0).max_bytes == 0


def test_second_question_on_same_frame_skips_the_encoder(tiny_bundles, test_images):
    cached = VLM.load(tiny_bundles["llama-clip"])
    uncached = VLM.load(tiny_bundles["llama-clip"], vision_cache_mb=0)
    frame = np.asarray(test_images[0])
    first = cached.generate(frame, QUESTIONS[0], max_new_tokens=12)
    assert cached.last_stats.images_encoded == 1
    # Same pixels as a *different* object (a camera delivering the same frame again): still a hit.
    second = cached.generate(frame.copy(), QUESTIONS[1], max_new_tokens=12)
    assert cached.last_stats.images_encoded == 0 and cached.last_stats.image_cache_hits == 1
    assert first == uncached.generate(frame, QUESTIONS[0], max_new_tokens=12)
    assert second == uncached.generate(frame, QUESTIONS[1], max_new_tokens=12)
    assert uncached.last_stats.images_encoded == 1 and uncached.last_stats.image_cache_hits == 0


@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_questions_about_one_image_share_the_prefill(tiny_bundles, test_images, decoder):
    vlm = VLM.load(tiny_bundles["qwen2-siglip"], vision_cache_mb=0, decoder=decoder)
    batch = vlm.generate_batch([(test_images[0], q) for q in QUESTIONS], max_new_tokens=16)
    stats = vlm.last_stats
    assert stats.reused_tokens >= 2 * 16  # the 16 image tokens (and more) were prefilled once, not three times
    assert stats.prefill_tokens < stats.prompt_tokens
    assert batch == [vlm.generate(test_images[0], q, max_new_tokens=16) for q in QUESTIONS]


@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_chat_session_prefills_only_the_new_turn(tiny_bundles, test_images, decoder):
    vlm = VLM.load(tiny_bundles["llama-clip"], decoder=decoder)
    chat = vlm.chat(test_images[0])
    first = chat.ask(QUESTIONS[0], max_new_tokens=10)
    turn1_prompt = vlm.last_stats.prompt_tokens
    second = chat.ask(QUESTIONS[1], max_new_tokens=10)
    stats = vlm.last_stats
    assert stats.reused_tokens >= turn1_prompt  # the whole first turn came from the cache
    assert stats.prefill_tokens == stats.prompt_tokens - stats.reused_tokens
    # The same conversation answered statelessly gives the same second answer.
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]},
    ]
    fresh = VLM.load(tiny_bundles["llama-clip"], decoder=decoder)
    stateless = "".join(
        p for _, p in fresh.stream_requests([Request(images=[test_images[0]], messages=messages)], chat_config(10))
    )
    assert second == stateless
    assert fresh.last_stats.reused_tokens == 0


def chat_config(n: int):
    from edgelvm.runtime import GenerationConfig

    return GenerationConfig(max_new_tokens=n)


def test_threads_share_one_engine_and_get_sequential_answers(tiny_bundles, test_images):
    vlm = VLM.load(tiny_bundles["llama-clip"])
    jobs = [(test_images[i % 2], QUESTIONS[i % 3]) for i in range(40)]
    expected = {(i % 2, i % 3): vlm.generate(img, q, max_new_tokens=8) for i, (img, q) in enumerate(jobs)}
    engine = Engine(vlm, max_queue=64)
    results: dict[int, str] = {}

    def client(worker: int) -> None:
        for k in range(5):
            i = worker * 5 + k
            image, question = jobs[i]
            results[i] = engine.submit(image, question, max_new_tokens=8).result(timeout=60)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    engine.close()
    assert len(results) == 40
    assert all(results[i] == expected[(i % 2, i % 3)] for i in range(40))


def test_direct_vlm_calls_from_threads_are_serialised(tiny_bundles, test_images):
    vlm = VLM.load(tiny_bundles["qwen2-siglip"])
    expected = [vlm.generate(test_images[i % 2], QUESTIONS[i % 3], max_new_tokens=8) for i in range(8)]
    got: list[str | None] = [None] * 8

    def run(i: int) -> None:
        got[i] = vlm.generate(test_images[i % 2], QUESTIONS[i % 3], max_new_tokens=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == expected


def test_cancel_and_timeout_leave_the_model_usable(tiny_bundles, test_images):
    vlm = VLM.load(tiny_bundles["llama-clip"])
    engine = Engine(vlm, max_queue=4)
    job = engine.submit(test_images[0], QUESTIONS[0], max_new_tokens=200, min_new_tokens=200)
    pieces = iter(job)
    next(pieces)  # generation is running
    job.cancel()
    job.result(timeout=30)
    assert job.finish_reason == "cancelled" and job.stats.new_tokens < 200

    # 5 ms: far below what 200 tokens take even on a fast machine (a 50 ms deadline was once outrun: "length")
    late = engine.submit(test_images[0], QUESTIONS[0], max_new_tokens=200, min_new_tokens=200, timeout=0.005)
    late.result(timeout=30)
    # on a loaded machine the deadline may pass while the job still waits in the queue: no step ran, no stats
    assert late.finish_reason == "timeout" and (late.stats is None or late.stats.new_tokens < 200)

    normal = engine.submit(test_images[0], QUESTIONS[0], max_new_tokens=12).result(timeout=30)
    engine.close()
    assert normal == vlm.generate(test_images[0], QUESTIONS[0], max_new_tokens=12)


def test_full_queue_answers_busy(tiny_bundles, test_images):
    vlm = VLM.load(tiny_bundles["llama-clip"])
    engine = Engine(vlm, max_queue=1)
    running = engine.submit(test_images[0], QUESTIONS[0], max_new_tokens=150, min_new_tokens=150)
    deadline = time.monotonic() + 10
    while engine.queued and time.monotonic() < deadline:  # wait until the worker took it off the queue
        time.sleep(0.01)
    waiting = engine.submit(test_images[0], QUESTIONS[1], max_new_tokens=4)
    with pytest.raises(BusyError, match="queue is full"):
        engine.submit(test_images[0], QUESTIONS[2], max_new_tokens=4)
    running.cancel()
    assert waiting.result(timeout=30) == vlm.generate(test_images[0], QUESTIONS[1], max_new_tokens=4)
    engine.close()


def test_bad_request_fails_at_submit_not_in_the_worker(tiny_bundles, tmp_path):
    from edgelvm.errors import ImageError

    engine = Engine(VLM.load(tiny_bundles["llama-clip"]))
    with pytest.raises(ImageError, match="not found"):
        engine.submit(tmp_path / "missing.png", "hi")
    assert engine.queued == 0
    engine.close()


def test_session_settings_follow_the_device_and_can_be_overridden(tiny_bundles, monkeypatch):
    import edgelvm.runtime.session_settings as ss

    monkeypatch.setattr(ss, "is_jetson", lambda: False)
    host = ss.SessionSettings.for_this_device()
    assert host.threads == ss._usable_cores() and host.spinning
    monkeypatch.setattr(ss, "is_jetson", lambda: True)
    assert not ss.SessionSettings.for_this_device().spinning  # shares the SoC: no spin-waiting
    assert ss.SessionSettings.for_this_device(threads=1, spinning=True) == ss.SessionSettings(1, True)
    vlm = VLM.load(tiny_bundles["llama-clip"], threads=1, spinning=False)
    assert vlm.backend.settings == ss.SessionSettings(threads=1, spinning=False)
    assert vlm.generate(None, "hi", max_new_tokens=3) is not None


def test_one_frame_in_a_batch_is_encoded_once_even_without_the_cache(tiny_bundles, test_images):
    vlm = VLM.load(tiny_bundles["llama-clip"], vision_cache_mb=0)
    answers = vlm.generate_batch([(test_images[0], q) for q in QUESTIONS] + [(None, "Hello?")], max_new_tokens=6)
    assert vlm.last_stats.images_encoded == 1 and len(answers) == 4
    assert answers[:3] == [vlm.generate(test_images[0], q, max_new_tokens=6) for q in QUESTIONS]


@pytest.mark.parametrize("decoder", ["fused", "portable"])
def test_chunked_prefill_answers_as_one_step(tiny_bundles, test_images, decoder):
    """A backend that takes at most N tokens per step (TensorRT engines built with ``--prefill-chunk``) is fed the
    prompt in chunks after a growing cache: the same greedy tokens as one prefill step; a batch longer than a
    chunk is a clear error, not a wrong answer."""
    from edgelvm.errors import BackendError

    vlm = VLM.load(tiny_bundles["llama-clip"], decoder=decoder)
    want = [vlm.generate(image, "Describe the image.", max_new_tokens=8) for image in test_images]
    prompt_tokens = vlm.last_stats.prefill_tokens
    calls = []
    step = vlm.backend.step
    vlm.backend.step = lambda rows, *a, **k: calls.append(len(rows[0])) or step(rows, *a, **k)
    vlm.backend.max_step_tokens = 7
    got = [vlm.generate(image, "Describe the image.", max_new_tokens=8) for image in test_images]
    assert got == want
    chunks = calls[: -(-prompt_tokens // 7)]  # the first request's prefill steps, then its 1-token decode steps
    assert sum(chunks) == prompt_tokens and max(chunks) == 7 and calls[len(chunks)] == 1
    with pytest.raises(BackendError, match="only a single causal prompt is fed in chunks"):
        vlm.generate_batch([Request(prompt="Describe the image.", images=[image]) for image in test_images])

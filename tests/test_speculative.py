"""Speculative decoding's loop against a plain decode, on numpy stand-ins for the target and the draft (a table of
logits indexed by the last two tokens, behind the real :class:`Backend` contract: left-padded rows, ``last=K``
logits, a cache that crops). What is checked: greedy text identical to the target alone (any k, batches, budgets,
EOS, stop strings), the caches hold exactly the text kept, acceptance counted, and sampled tokens distributed as the
target's (rejection sampling), measured against the exact distribution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgelvm.runtime.generate import AllInputs, Control, Decoding, GenerationConfig, GenerationStats, Plan, generate
from edgelvm.runtime.speculative import DraftRun

VOCAB, EOS, PAD = 12, 0, 11


class Tokens:
    """Ids <-> text: token i is the letter ``a + i``."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class History:
    """The stand-in cache: each row's fed ids, left-padded with -1 to one length (as the real caches pad)."""

    supports_reuse, recurrent = True, False

    def __init__(self, batch: int) -> None:
        self.rows: list[list[int]] = [[] for _ in range(batch)]

    @property
    def length(self) -> int:
        return len(self.rows[0])

    def rewind_point(self, length: int) -> int:
        return min(length, self.length)

    def crop(self, length: int) -> None:
        self.rows = [row[:length] for row in self.rows]

    def drop(self, count: int) -> None:
        self.rows = [row[: len(row) - count] for row in self.rows]

    def fill_from(self, prefix: History) -> None:
        self.rows = [list(prefix.rows[0]) for _ in self.rows]


class TableModel:
    """A backend whose next-token logits are ``table[previous token, last token]``; embeddings are one-hot."""

    name, embed_dtype = "table", np.float32

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.steps = 0

    def new_cache(self, batch: int) -> History:
        return History(batch)

    def step(self, rows: list[np.ndarray], cache: History, inputs=None, *, last: int = 1) -> np.ndarray:
        self.steps += 1
        seq = max(len(r) for r in rows)
        out = np.empty((len(rows), last, VOCAB), dtype=np.float32)
        for index, row in enumerate(rows):
            ids = [-1] * (seq - len(row)) + [int(e.argmax()) for e in row]
            cache.rows[index].extend(ids)
            history = cache.rows[index]
            for j in range(last):
                end = len(history) - last + j + 1
                prev = history[end - 2] if end >= 2 and history[end - 2] >= 0 else PAD
                out[index, j] = self.table[prev, history[end - 1]]
        return out[:, 0] if last == 1 else out


def embed(ids: np.ndarray) -> np.ndarray:
    return np.eye(VOCAB, dtype=np.float32)[ids]


def tables(seed: int, noise: float, eos_bias: float = -3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.normal(0, 2.0, size=(VOCAB, VOCAB, VOCAB)).astype(np.float32)
    target[..., EOS] += eos_bias
    target[..., PAD] = -1e9  # never generated
    draft = target + rng.normal(0, noise, size=target.shape).astype(np.float32)
    return target, draft


def run(target: np.ndarray, draft: np.ndarray | None, prompts: list[list[int]], k: int = 4, **options):
    """Generate with (or without) a draft; ``(texts, output ids, stats, target cache rows, draft cache rows)``."""
    backend = TableModel(target)
    config = GenerationConfig(**{"max_new_tokens": 16, **options})
    stats = GenerationStats()
    outputs: list[list[int]] = [[] for _ in prompts]
    fed: list[list[int]] = [list(p) for p in prompts]
    draft_run = None
    draft_fed: list[list[int]] = [list(p) for p in prompts]
    if draft is not None:
        draft_backend = TableModel(draft)
        draft_cache = draft_backend.new_cache(len(prompts))
        draft_backend.step([embed(np.array(p)) for p in prompts], draft_cache)
        draft_run = DraftRun(draft_backend, embed, draft_cache, tokens=k,
                             on_fed=lambda row, token: draft_fed[row].append(token))  # fmt: skip
    decoding = Decoding(backend, embed, Tokens(), {EOS}, PAD, config, Control(), stats, outputs,
                        on_fed=lambda row, token: fed[row].append(token), draft=draft_run)  # fmt: skip
    plan = Plan([embed(np.array(p)) for p in prompts], AllInputs([]))
    cache = backend.new_cache(len(prompts))
    texts = [""] * len(prompts)
    for row, piece in generate(decoding, plan, cache, 0):
        texts[row] += piece
    kept = [[t for t in row if t >= 0] for row in cache.rows]
    if draft_run is not None:  # the draft's cache holds what it was told it keeps
        assert [[t for t in row if t >= 0] for row in draft_run.cache.rows] == draft_fed
    return texts, outputs, stats, kept, fed, draft_run


PROMPTS = [[3, 5, 7], [2], [9, 9, 4, 1, 6]]


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("noise", [0.0, 1.0, 4.0])
def test_greedy_text_equals_the_target_alone(k, noise):
    target, draft = tables(0, noise)
    for prompts in ([PROMPTS[0]], PROMPTS):
        plain_texts, plain_ids, plain_stats, *_ = run(target, None, prompts)
        texts, ids, stats, kept, fed, draft_run = run(target, draft, prompts, k=k)
        assert ids == plain_ids and texts == plain_texts
        assert stats.finish_reasons == plain_stats.finish_reasons
        # the target's cache holds the prompt and every kept token but the last (never fed), as the plain loop's
        for row, prompt in enumerate(prompts):
            assert kept[row][: len(prompt) + len(ids[row]) - 1] == prompt + ids[row][:-1]
            assert fed[row][: len(prompt) + len(ids[row]) - 1] == prompt + ids[row][:-1]
            in_draft = [t for t in draft_run.cache.rows[row] if t >= 0]
            assert len(in_draft) >= len(prompt) + len(ids[row]) - 2  # all but the last one or two tokens
        assert 0 < stats.speculative_rounds <= stats.new_tokens
        assert stats.accepted_tokens <= stats.draft_tokens
        if noise == 0.0:  # a draft equal to the target: every proposal kept
            assert stats.acceptance_rate == 1.0


def test_a_perfect_draft_needs_a_target_step_per_k_plus_one_tokens():
    target, _ = tables(1, 0.0, eos_bias=-50.0)  # no EOS: the budget ends it
    _, ids, stats, *_ = run(target, target.copy(), [PROMPTS[0]], k=4, max_new_tokens=21)
    assert len(ids[0]) == 21
    assert stats.speculative_rounds == 4  # 4 rounds of (1 fed + 4 kept), then the last token = 21
    assert stats.acceptance_rate == 1.0


def test_budget_eos_and_stop_strings_end_rows_as_the_plain_loop_does():
    target, draft = tables(2, 1.5, eos_bias=1.0)  # EOS likely: rows end at different steps
    for options in ({"max_new_tokens": 1}, {"max_new_tokens": 3}, {"min_new_tokens": 6, "max_new_tokens": 9},
                    {"stop": ["c", "fk"]}):  # fmt: skip
        plain = run(target, None, PROMPTS, **options)
        spec = run(target, draft, PROMPTS, k=3, **options)
        assert spec[0] == plain[0] and spec[1] == plain[1], options
        assert spec[2].finish_reasons == plain[2].finish_reasons, options


def test_a_cancel_stops_speculation_after_the_current_round():
    target, draft = tables(3, 0.0, eos_bias=-50.0)
    backend, draft_backend = TableModel(target), TableModel(draft)
    control, stats, outputs = Control(), GenerationStats(), [[]]
    draft_cache = draft_backend.new_cache(1)
    draft_backend.step([embed(np.array(PROMPTS[0]))], draft_cache)
    decoding = Decoding(backend, embed, Tokens(), {EOS}, PAD, GenerationConfig(max_new_tokens=64), control, stats,
                        outputs, draft=DraftRun(draft_backend, embed, draft_cache, tokens=2))  # fmt: skip
    plan = Plan([embed(np.array(PROMPTS[0]))], AllInputs([]))
    for _ in generate(decoding, plan, backend.new_cache(1), 0):
        control.cancel()
    assert stats.finish_reasons == ["cancelled"]
    assert len(outputs[0]) <= 3  # the first token, then at most one round of 2


def exact_distribution(target: np.ndarray, prompt: list[int], length: int, temperature: float) -> dict:
    """P(first ``length`` generated tokens) under the target alone, by enumeration."""
    def probs(prev: int, last: int) -> np.ndarray:
        z = target[prev, last].astype(np.float64) / temperature
        e = np.exp(z - z.max())
        return e / e.sum()

    out = {}
    for seq in itertools.product(range(VOCAB - 1), repeat=length):
        history, p = list(prompt), 1.0
        for token in seq:
            p *= probs(history[-2] if len(history) > 1 else PAD, history[-1])[token]
            history.append(token)
        out[seq] = p
    return out


def test_sampled_tokens_follow_the_targets_distribution():
    """Rejection sampling: over 3000 seeded runs of 3 tokens (k = 2: the first token is the target's, the next two
    verified draft proposals), each position's token frequencies and the first two tokens' joint ones are within 4.5
    standard errors of their exact probabilities under the target alone, with a poor draft."""
    target, _ = tables(4, 0.0, eos_bias=-50.0)
    draft = np.random.default_rng(5).normal(0, 2.0, size=target.shape).astype(np.float32)  # unrelated to the target
    draft[..., PAD] = -1e9
    exact = exact_distribution(target, [3, 5], 3, temperature=1.0)
    runs, samples = 3000, []
    accepted = drafted = 0
    for seed in range(runs):
        _, ids, stats, *_ = run(target, draft, [[3, 5]], k=2, max_new_tokens=3, temperature=1.0, seed=seed)
        samples.append(tuple(ids[0]))
        accepted, drafted = accepted + stats.accepted_tokens, drafted + stats.draft_tokens
    for positions in ((0,), (1,), (2,), (0, 1)):
        expected: dict = {}
        for seq, p in exact.items():
            key = tuple(seq[i] for i in positions)
            expected[key] = expected.get(key, 0.0) + p
        seen: dict = {}
        for seq in samples:
            key = tuple(seq[i] for i in positions)
            seen[key] = seen.get(key, 0) + 1
        for key, p in expected.items():
            error = np.sqrt(p * (1 - p) / runs)
            assert abs(seen.get(key, 0) / runs - p) < 4.5 * error + 1e-9, (positions, key, seen.get(key, 0), p)
    assert 0 < accepted < drafted  # the poor draft is sometimes right, often not


# ---- real bundles: a tiny LLaVA target and its INT4 + INT8-vision export as the draft -----------------------------
QUESTIONS = ["What is on the table?", "Describe the image in one sentence."]
TINY = "llava-llama-clip"


@pytest.fixture(scope="module")
def pair(artifacts):
    """(target bundle, draft bundle): the fp32 export and the INT4 export of one tiny checkpoint."""
    return artifacts.bundle(TINY), artifacts.quantized(TINY).export.bundle_dir


@pytest.mark.parametrize("decoder", ["portable", "fused"])
def test_greedy_with_a_draft_equals_the_target_alone_on_bundles(pair, test_images, decoder):
    """generate, a batch of different images and prompts, and a 2-turn chat: every answer is the target's own,
    token for token; the draft proposed and some of it was kept."""
    from edgelvm.runtime import VLM

    target, draft = pair
    alone = VLM.load(target, decoder=decoder)
    fast = VLM.load(target, decoder=decoder, draft=draft, draft_tokens=3)
    for image in test_images[:2]:
        for question in QUESTIONS:
            expected = alone.generate(image, question, max_new_tokens=24)
            ids = alone.last_output_ids
            assert fast.generate(image, question, max_new_tokens=24) == expected
            assert fast.last_output_ids == ids
            assert fast.last_stats.speculative_rounds > 0 and fast.last_stats.draft_tokens > 0
    requests = [(test_images[0], QUESTIONS[0]), (test_images[1], QUESTIONS[1]), (test_images[0], QUESTIONS[1])]
    assert fast.generate_batch(requests, max_new_tokens=20) == alone.generate_batch(requests, max_new_tokens=20)
    plain_chat, fast_chat = alone.chat(test_images[1]), fast.chat(test_images[1])
    for question in QUESTIONS:
        assert fast_chat.ask(question, max_new_tokens=16) == plain_chat.ask(question, max_new_tokens=16)
    assert fast.last_stats.reused_tokens > 0 and fast.last_stats.speculative_rounds > 0
    assert fast.generate(test_images[0], QUESTIONS[0], max_new_tokens=24, draft_tokens=0) == alone.generate(
        test_images[0], QUESTIONS[0], max_new_tokens=24
    )
    assert fast.last_stats.speculative_rounds == 0  # draft_tokens=0: this call without the draft


def test_a_second_question_about_a_frame_runs_no_encoder_and_still_speculates(pair, test_images):
    from edgelvm.runtime import VLM

    target, draft = pair
    vlm = VLM.load(target, draft=draft)
    frame = np.asarray(test_images[0])
    vlm.generate(frame, QUESTIONS[0], max_new_tokens=12)
    assert vlm.last_stats.images_encoded == 1 and vlm.last_stats.draft_images_encoded == 1
    vlm.generate(frame.copy(), QUESTIONS[1], max_new_tokens=12)
    stats = vlm.last_stats
    assert stats.images_encoded == 0 and stats.draft_images_encoded == 0
    assert stats.speculative_rounds > 0 and 0 <= stats.acceptance_rate <= 1


def test_sampling_with_a_draft_gives_valid_seeded_text(pair, test_images):
    from edgelvm.runtime import VLM

    target, draft = pair
    vlm = VLM.load(target, draft=draft)
    options = {"max_new_tokens": 16, "temperature": 0.8, "top_k": 20, "seed": 3}
    first = vlm.generate(test_images[0], QUESTIONS[0], **options)
    assert vlm.generate(test_images[0], QUESTIONS[0], **options) == first  # the same seed, the same text
    assert vlm.last_stats.speculative_rounds > 0


def test_pairs_speculation_cannot_keep_exact_are_refused(artifacts, pair, tmp_path):
    """Another tokenizer, a family with per-step inputs (M-RoPE), a hybrid decoder, the target itself, a bad k."""
    import json
    import shutil

    from edgelvm.errors import ConfigError
    from edgelvm.runtime import VLM

    target, draft = pair
    vlm = VLM.load(target)
    other = shutil.copytree(draft, tmp_path / "other-tokenizer")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: the same words, other ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match="tokenizer"):
        vlm.use_draft(VLM.load(other, verify=False))
    with pytest.raises(ConfigError, match=r"tokenizer|per-step inputs"):
        vlm.use_draft(VLM.load(artifacts.bundle("qwen2_vl")))
    with pytest.raises(ConfigError, match="itself"):
        vlm.use_draft(vlm)
    with pytest.raises(ConfigError, match="draft_tokens"):
        vlm.use_draft(VLM.load(draft), tokens=0)
    with pytest.raises(ConfigError, match="no draft bundle is loaded"):
        vlm.generate(None, "Hello?", draft_tokens=3)
    qwen = VLM.load(artifacts.bundle("qwen2_vl"))
    with pytest.raises(ConfigError, match="per-step inputs"):
        qwen.use_draft(VLM.load(artifacts.bundle("qwen2_vl")))
    hybrid = VLM.load(artifacts.bundle("qwen3_5"))
    with pytest.raises(ConfigError, match="recurrent"):
        hybrid.use_draft(VLM.load(artifacts.bundle("qwen3_5")))


def test_cli_generate_and_bench_take_a_draft(pair, test_images, tmp_path):
    """``edgelvm generate --draft`` prints the target's own text and the acceptance; ``edgelvm bench --draft``
    reports the share of drafted tokens kept."""
    from typer.testing import CliRunner

    from edgelvm.cli import app

    target, draft = pair
    image = tmp_path / "frame.png"
    test_images[0].save(image)
    runner = CliRunner()
    common = ["generate", str(target), "-i", str(image), "-p", QUESTIONS[0], "--max-new-tokens", "12"]
    plain = runner.invoke(app, common)
    fast = runner.invoke(app, [*common, "--draft", str(draft), "--draft-tokens", "3", "--stats"])
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    assert fast.stdout.startswith(plain.stdout.rstrip("\n"))
    assert "draft kept" in fast.output
    bench = runner.invoke(app, ["bench", str(target), "--draft", str(draft), "--runs", "1", "--warmup", "0",
                                "--gen-len", "8", "--prompt-len", "8"])  # fmt: skip
    assert bench.exit_code == 0, bench.output
    assert "draft tokens kept" in bench.output


def test_a_draft_with_the_targets_vision_graph_reuses_its_features(pair, test_images):
    """A draft whose vision graph and image rules are byte for byte the target's (here: the target's own bundle,
    loaded again) takes the target's image features instead of encoding the image again; every proposal is kept."""
    from edgelvm.runtime import VLM

    target, _ = pair
    vlm = VLM.load(target, draft=target, vision_cache_mb=0)
    alone = VLM.load(target, vision_cache_mb=0)
    assert vlm.generate(test_images[1], QUESTIONS[1], max_new_tokens=16) == alone.generate(
        test_images[1], QUESTIONS[1], max_new_tokens=16
    )
    stats = vlm.last_stats
    assert stats.images_encoded == 1 and stats.draft_images_encoded == 0
    assert stats.acceptance_rate == 1.0

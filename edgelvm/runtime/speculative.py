"""Speculative decoding: a draft bundle proposes ``k`` tokens, the target checks them all in one step.

Why: at batch 1 a decode step reads every weight of the target for one token — memory bandwidth, not arithmetic,
bounds it. Checking ``k + 1`` tokens in one step reads the weights once, so each draft token the target accepts
saves a target step, at the price of the draft's own, cheaper steps. The draft is another bundle with the same
tokenizer: a distilled student, or the INT4 export of the target.

Every token kept is the target's own choice:

- greedy: draft token ``i`` is kept only while it equals the target's argmax after the kept prefix, and the first
  mismatch is replaced by that argmax — the text equals the target's alone;
- sampling: standard rejection sampling (Leviathan et al., 2023; Chen et al., 2023): a draft token ``x`` is kept
  with probability ``min(1, p(x) / q(x))``, a rejected one is replaced by a draw from ``norm(max(0, p - q))``, and a
  round whose every token was kept adds a draw from ``p`` — each token is distributed as the target's alone (the
  random stream differs from a plain run's, so a seeded text differs; its distribution does not).

A batch advances by the fewest tokens any running row accepted, since a cache holds one length for all its rows; a
row that accepted more keeps that many, and its next token is its own next accepted one (the target's choice).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelvm.errors import ConfigError
from edgelvm.runtime.backend import NO_INPUTS, Backend
from edgelvm.runtime.generate import MAX_DRAFT_TOKENS, Decoding, Plan, RowOutputs, suppress_eos
from edgelvm.runtime.sampling import Sampler

#: What each kind of per-step decoder input is, for refusals (``runtime/images.step_input_rules``).
_STEP_INPUTS = {"positions": "M-RoPE positions", "cross_attention": "cross-attention states",
                "deepstack": "DeepStack features", "image_blocks": "bidirectional image-block masks"}  # fmt: skip

#: Draft tokens proposed per round when the caller does not say: acceptance falls with the distance from the last
#: verified token, and a rejected token costs a draft step.
DEFAULT_DRAFT_TOKENS = 4


@dataclass
class DraftRun:
    """The draft's side of one generation: its backend, embedding table and cache (holding its own prompt)."""

    backend: Backend
    embed: Callable[[np.ndarray], np.ndarray]  # token ids [N] -> embeddings [N, E]
    cache: Any
    tokens: int = DEFAULT_DRAFT_TOKENS  # k: proposed per round
    on_fed: Callable[[int, int], None] = lambda row, token: None  # told each token its cache keeps (chat reuse)

    def decode(self, run: Decoding, cache: Any, plan: Plan, logits: np.ndarray) -> Iterator[tuple[int, str]]:
        """The decode loop :func:`~edgelvm.runtime.generate.generate` runs when a draft is given."""
        return speculate_n_tokens(run, cache, plan, logits, self)


def speculate_n_tokens(
    run: Decoding, cache: Any, plan: Plan, logits: np.ndarray, draft: DraftRun
) -> Iterator[tuple[int, str]]:
    """Like :func:`~edgelvm.runtime.generate.decode_n_tokens` (same stops, budget, cancellation and streaming), with
    the draft proposing and the target verifying ``draft.tokens`` tokens per step."""
    config, batch = run.config, len(plan.rows)
    sampler = Sampler(config.sampling)
    outputs = RowOutputs(run, batch)
    stats = run.stats
    started = time.perf_counter()
    emitted = 0  # tokens each running row has streamed
    pending = sampler(suppress_eos(run, logits, 0))  # the target's next token: emitted, not yet fed
    carry = np.empty((batch, 0), dtype=np.int64)  # kept draft tokens the draft's cache lacks (a full round)
    while True:
        for row in outputs.active():
            piece = outputs.push(row, int(pending[row]))
            if piece:
                yield row, piece
        emitted += 1
        stats.new_tokens += 1
        outputs.interrupt()
        if outputs.done():
            break
        running = outputs.active()
        fed = np.full(batch, run.pad_id, dtype=np.int64)
        fed[running] = pending[running]
        k = min(draft.tokens, config.max_new_tokens - emitted)

        draft_started = time.perf_counter()
        head = np.concatenate([carry, fed[:, None]], axis=1)
        proposals, draft_probs = _propose(run, draft, sampler, head, k, emitted)
        stats.draft_ms += (time.perf_counter() - draft_started) * 1e3
        tokens = np.concatenate([fed[:, None], proposals], axis=1)  # [B, k + 1]
        checked = run.backend.step(_embed_rows(run.embed, tokens), cache, NO_INPUTS, last=k + 1)  # no step inputs
        for index in range(k + 1):
            suppress_eos(run, checked[:, index], emitted + index)
        accepted, replacements = _verify(sampler, checked, proposals, draft_probs)
        kept = min(int(accepted[row]) for row in running)
        stats.speculative_rounds += 1
        stats.draft_tokens += k * len(running)
        stats.accepted_tokens += kept * len(running)

        cache.drop(k - kept)  # keep the fed token and the kept proposals
        for row in range(batch):
            for token in tokens[row, : 1 + kept]:
                run.on_fed(row, int(token))
        # the draft fed `head` and its first k - 1 proposals; it keeps `head` and the kept ones
        draft_fed = np.concatenate([head, proposals[:, : k - 1]], axis=1)[:, : head.shape[1] + kept]
        if kept == k:  # the draft never fed its last proposal: it goes in front of the next round's token
            carry = proposals[:, k - 1 :]
        else:
            draft.cache.drop(k - 1 - kept)
            carry = np.empty((batch, 0), dtype=np.int64)
        for row in range(batch):
            for token in draft_fed[row]:
                draft.on_fed(row, int(token))

        for index in range(kept):
            for row in outputs.active():
                piece = outputs.push(row, int(proposals[row, index]))
                if piece:
                    yield row, piece
            emitted += 1
            stats.new_tokens += 1
        if outputs.done():
            break
        # a row that accepted more than `kept` goes on with its next accepted draft token (the target's choice too)
        pending = np.where(accepted > kept, proposals[:, min(kept, k - 1)], replacements)
    stats.decode_ms = (time.perf_counter() - started) * 1e3
    outputs.finish()


def check_draft(target: Any, draft: Any, tokens: int) -> None:
    """Refuse a target/draft pair (two :class:`~edgelvm.runtime.vlm.VLM`) that speculation cannot keep exact."""
    if not 1 <= tokens <= MAX_DRAFT_TOKENS:
        raise ConfigError(f"draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {tokens}", where="draft_tokens",
                          fix="propose a few tokens per step (4 is typical)")  # fmt: skip
    if draft is target:
        raise ConfigError("the draft is the target itself", where="draft",
                          fix="use a smaller bundle: a distilled student or the INT4 export")  # fmt: skip
    if target.tokenizer.vocab() != draft.tokenizer.vocab():
        raise ConfigError(
            "the draft's tokenizer differs from the target's: its token ids would mean other text",
            where=draft.bundle_dir,
            fix="use a draft with this model's tokenizer (a distilled student of it, or its INT4 export)",
        )
    widths = [vlm.manifest.graphs["decoder"].outputs[0].shape[-1] for vlm in (target, draft)]
    if widths[0] != widths[1]:
        raise ConfigError(f"the draft's logits have {widths[1]} entries, the target's {widths[0]}",
                          where=draft.bundle_dir, fix="use a draft with the target's vocabulary")  # fmt: skip
    for who, vlm in (("target", target), ("draft", draft)):
        if any(w is not None for w in vlm.manifest.kv_cache.windows or []):
            raise ConfigError(
                f"the {who}'s decoder has sliding-window layers (family {vlm.manifest.family}): they keep only their "
                "window, so a step cannot be rewound past rejected draft tokens",
                where=vlm.bundle_dir,
                fix="generate without a draft for this family",
            )
        if vlm.manifest.kv_cache.states:
            raise ConfigError(
                f"the {who}'s decoder keeps recurrent / convolution states (family {vlm.manifest.family}): they "
                "cannot be rewound past rejected draft tokens",
                where=vlm.bundle_dir,
                fix="generate without a draft for this family",
            )
        if vlm.step_rules:
            kinds = ", ".join(_STEP_INPUTS.get(kind, kind) for kind in vlm.step_input_kinds)
            raise ConfigError(
                f"the {who}'s decoder takes per-step inputs besides its embeddings (family {vlm.manifest.family}: "
                f"{kinds}), which speculation does not feed for several positions yet",
                where=vlm.bundle_dir,
                fix="generate without a draft for this family",
            )
        if not getattr(vlm.backend, "caches_crop", False):
            raise ConfigError(
                f"the {who}'s backend ({vlm.backend.name}) keeps its cache on the device, where it cannot crop the "
                "rejected draft tokens",
                where=vlm.bundle_dir,
                fix="use the onnxruntime CPU backend (or the fused decoder) for speculative decoding",
            )
    most = getattr(target.backend, "max_last_logits", 1)
    if most < tokens + 1:
        raise ConfigError(
            f"the target's decoder returns the logits of {most} position(s) per step; verifying {tokens} draft tokens "
            "needs the logits of every drafted position (a bundle exported before them, a prefix-LM decoder, or "
            "TensorRT engines)",
            where=target.bundle_dir,
            fix="re-export the target with this edgelvm, or run it on an onnxruntime backend",
        )


def _embed_rows(embed: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray) -> list[np.ndarray]:
    """Token ids ``[B, S]`` -> one ``[S, E]`` embedding block per row."""
    flat = embed(tokens.reshape(-1))
    return list(flat.reshape(tokens.shape[0], tokens.shape[1], -1))


def _propose(
    run: Decoding, draft: DraftRun, sampler: Sampler, feed: np.ndarray, k: int, emitted: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``k`` draft tokens per row ``[B, k]`` after feeding ``feed`` (and each proposal but the last), and — when
    sampling — the distributions they were drawn from."""
    proposals = np.empty((feed.shape[0], k), dtype=np.int64)
    probs: list[np.ndarray] = []
    for index in range(k):
        logits = suppress_eos(run, draft.backend.step(_embed_rows(draft.embed, feed), draft.cache), emitted + index)
        if sampler.config.greedy:
            proposals[:, index] = logits.argmax(axis=-1)
        else:
            probs.append(sampler.probs(logits))
            proposals[:, index] = sampler.draw(probs[-1])
        if index < k - 1:
            feed = proposals[:, index : index + 1]
    return proposals, probs


def _verify(
    sampler: Sampler, checked: np.ndarray, proposals: np.ndarray, draft_probs: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many leading proposals the target accepts, and the token that follows them (the target's
    argmax; when sampling, a draw from the residual ``max(0, p - q)`` after a rejection or from ``p`` after a round
    with none). ``checked [B, k + 1, vocab]``: the target's logits after the fed token and each proposal."""
    batch, k = proposals.shape
    if sampler.config.greedy:
        choice = checked.argmax(axis=-1)  # [B, k + 1]
        matches = choice[:, :k] == proposals
        accepted = np.where(matches.all(axis=1), k, matches.argmin(axis=1))
        return accepted, choice[np.arange(batch), accepted]
    target = sampler.probs(checked)  # [B, k + 1, vocab]
    accepted = np.full(batch, k, dtype=np.int64)
    replacements = np.empty(batch, dtype=np.int64)
    for row in range(batch):
        for index in range(k):
            token = proposals[row, index]
            p, q = target[row, index], draft_probs[index][row]
            if sampler.uniform() * q[token] < p[token]:  # accept with probability min(1, p / q)
                continue
            residual = np.maximum(p - q, 0.0)
            total = residual.sum()
            accepted[row] = index
            replacements[row] = sampler.draw((residual / total if total > 0 else p)[None])[0]
            break
        else:
            replacements[row] = sampler.draw(target[row, k][None])[0]
    return accepted, replacements

"""Activation statistics at the inputs of linear layers, collected in one pass and shared by every algorithm.

Per layer: the number of tokens seen, per-channel mean |x| (AWQ's salience), per-channel max |x|, a histogram of
|x| over the whole tensor (the observers pick a clipping range from it) and, where asked, the Gram matrix
``H = Σ xᵀx`` over tokens. ``H`` is what both weight-only algorithms need: GPTQ's Hessian is ``2H``, and the output
error of any weight change ``ΔW`` on the calibration tokens is ``Σ‖x ΔWᵀ‖² = tr(ΔW H ΔWᵀ)`` — AWQ's scale search
is evaluated through it exactly, without keeping the activations.

Layers that read the same tensor (q/k/v after one norm, gate/up) share one Gram matrix: it is computed once per
distinct input and referenced by each reader.

Padding positions of the language model (attention mask 0) are excluded; the vision tower has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelvm.calibration.dataset import run_forward

HISTOGRAM_BINS = 2048
#: Tokens kept per input where a sample replaces the Gram matrix (see :class:`TokenSample`).
SAMPLE_TOKENS = 1024


class AbsHistogram:
    """Histogram of |x| over ``[0, width * bins)``, growing by doubling the bin width (adjacent bins merge exactly),
    so one pass suffices even though the range is unknown before it."""

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, np.float64)
        self.width = 0.0
        self.max = 0.0

    @property
    def edges(self) -> np.ndarray:
        return np.arange(self.bins + 1) * self.width

    def add(self, values: Any) -> None:
        """``values``: a torch tensor of |x| (any shape)."""
        import torch

        vmax = float(values.max()) if values.numel() else 0.0
        if vmax <= 0.0:
            self.counts[0] += values.numel()
            return
        if self.width == 0.0:
            self.width = vmax / self.bins * (1 + 1e-6)
        while vmax >= self.width * self.bins:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([merged, np.zeros(self.bins - merged.size)])
            self.width *= 2
        hist = torch.histc(values.float().flatten(), bins=self.bins, min=0.0, max=self.width * self.bins)
        self.counts += hist.double().numpy()
        self.max = max(self.max, vmax)


class TokenSample:
    """A uniform random sample of (at most) ``size`` token rows of one linear input, kept as batches arrive (the
    rows with the smallest random keys), and the number of tokens it stands for.

    Why: for an input of width ``K`` the Gram matrix costs ``K²`` floats and every error evaluation through it
    ``N·K²`` multiply-adds; a sample of ``S < K`` tokens costs ``S·K`` and ``N·K·S`` — for a 7B's ``down_proj``
    (K = 11008) and S = 1024 an eleventh, which turns AWQ's 20-point scale search from hours into minutes on a CPU.
    AutoAWQ evaluates its search on a token sample too. GPTQ needs the full Gram matrix and never gets a sample."""

    def __init__(self, size: int, seed: int) -> None:
        import torch

        self.size = size
        self.rows: Any = None  # torch float32 [S, K]
        self.keys: Any = None
        self.tokens = 0
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, flat: Any) -> None:
        import torch

        keys = torch.rand(flat.shape[0], generator=self._generator)
        rows = flat if self.rows is None else torch.cat([self.rows, flat])
        keys = keys if self.keys is None else torch.cat([self.keys, keys])
        if rows.shape[0] > self.size:
            keep = keys.topk(self.size, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows.contiguous().clone(), keys
        self.tokens += flat.shape[0]

    def error(self, delta: Any) -> float:
        """``tr(Δ H Δᵀ)`` estimated on the sample (scaled to the tokens it stands for)."""
        out = delta.float() @ self.rows.T
        return float((out.double() ** 2).sum()) * self.tokens / max(self.rows.shape[0], 1)

    def divided(self, s: Any) -> TokenSample:
        """The sample of ``x / s`` (per channel): what AWQ's scaled input space sees."""
        other = TokenSample.__new__(TokenSample)
        other.size, other.rows, other.keys, other.tokens = self.size, self.rows / s.float(), self.keys, self.tokens
        return other

    def gram_block(self, lo: int, hi: int) -> Any:
        """Columns ``lo:hi`` of the estimated Gram matrix's diagonal block (float32)."""
        block = self.rows[:, lo:hi]
        return (block.T @ block) * (self.tokens / max(self.rows.shape[0], 1))


@dataclass
class LinearStats:
    tokens: int = 0
    abs_sum: Any = None  # torch float64 [K]
    abs_max: Any = None  # torch float32 [K]
    histogram: AbsHistogram = field(default_factory=AbsHistogram)
    gram_key: int | None = None  # index into CalibrationStats.grams

    @property
    def abs_mean(self) -> np.ndarray:
        return (self.abs_sum / max(self.tokens, 1)).float().numpy()


@dataclass
class CalibrationStats:
    layers: dict[str, LinearStats]
    #: torch float32 [K, K], shared by the layers that read one tensor. float32, as GPTQ's reference keeps its
    #: Hessian: the consumers compute in float64 one layer at a time, and a 7B's Grams are 1.4 GB per layer even so.
    #: A :class:`TokenSample` instead where it was asked for and is smaller (``sampled`` names with K > S).
    grams: list[Any]
    calibration: dict[str, Any] = field(default_factory=dict)

    def with_prefix(self, prefix: str) -> CalibrationStats:
        """The layers named ``prefix + name``, renamed ``name`` (one pass can serve several namespaces)."""
        layers = {k[len(prefix) :]: v for k, v in self.layers.items() if k.startswith(prefix)}
        return CalibrationStats(layers, self.grams, self.calibration)

    def gram(self, name: str) -> Any:
        """``name``'s Gram matrix as float64 (a copy: the algorithms ask for one layer's at a time), or its
        :class:`TokenSample` where one was collected instead."""
        key = self.layers[name].gram_key
        if key is None:
            raise KeyError(f"no Gram matrix was collected for {name}")
        value = self.grams[key]
        return value if isinstance(value, TokenSample) else value.double()


class _Collector:
    def __init__(self, modules: dict[str, Any], gram: set[str], text: set[str], sampled: set[str] | None = None,
                 sample_tokens: int | None = None) -> None:  # fmt: skip
        sample_tokens = SAMPLE_TOKENS if sample_tokens is None else sample_tokens
        self.modules = modules
        self.gram = gram
        self.text = text
        # a token sample instead of the Gram matrix where the caller allows it and it is the smaller of the two
        self.sampled = {n for n in (sampled or ()) if n in gram and modules[n].in_features > sample_tokens}
        self.sample_tokens = sample_tokens
        self.stats = {name: LinearStats() for name in modules}
        self.grams: list[Any] = []
        self.mask: Any = None
        # The last input seen and its gram index: readers of one tensor run back to back (q/k/v, gate/up). Held by
        # reference, so that its memory cannot be reused by a later tensor that would then look the same.
        self._last: tuple[Any, int] | None = None
        self._gram_index: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def new_batch(self, inputs: dict[str, Any]) -> None:
        self.mask = inputs.get("attention_mask")
        self._last = None

    def _hook(self, name: str) -> Any:
        def hook(_module: Any, args: tuple) -> None:
            original = args[0]
            x = original.detach()
            flat = x.reshape(-1, x.shape[-1])
            if name in self.text and self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(
                self.mask.shape
            ):
                flat = flat[self.mask.reshape(-1).bool()]
            flat = flat.float()
            s = self.stats[name]
            a = flat.abs()
            s.tokens += flat.shape[0]
            s.abs_sum = a.sum(0).double() if s.abs_sum is None else s.abs_sum + a.sum(0).double()
            amax = a.amax(0) if a.numel() else a.new_zeros(a.shape[-1])
            s.abs_max = amax if s.abs_max is None else s.abs_max.maximum(amax)
            s.histogram.add(a)
            if name in self.gram:
                if self._last is not None and self._last[0] is original:
                    index = self._last[1]  # another reader of the same tensor: its product is already in
                elif name in self.sampled:
                    index = self._gram_index.get(name)
                    if index is None:
                        self.grams.append(TokenSample(self.sample_tokens, seed=len(self.grams)))
                        index = len(self.grams) - 1
                    self.grams[index].add(flat)
                    self._last = (original, index)
                else:
                    gram = flat.T @ flat
                    index = self._gram_index.get(name)
                    if index is None:
                        self.grams.append(gram)
                        index = len(self.grams) - 1
                    else:
                        self.grams[index] += gram
                    self._last = (original, index)
                s.gram_key = index
                self._gram_index.setdefault(name, index)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def collect_stats(
    adapter: Any,
    calib: Any,
    modules: dict[str, Any],
    *,
    gram: set[str] | None = None,
    text: set[str] | None = None,
    batch_size: int = 16,
    progress: Any = None,
    sampled: set[str] | None = None,
) -> CalibrationStats:
    """One forward pass of the calibration set with hooks on ``modules`` (name -> ``nn.Linear``).

    ``gram``: names that also need ``XᵀX``; ``text``: names on the language-model side (padding excluded);
    ``sampled``: names of ``gram`` whose consumer can take a :class:`TokenSample` instead (where it is smaller)."""
    return collect_stats_while(
        lambda on_batch: run_forward(adapter, calib, batch_size, on_batch=on_batch, progress=progress),
        modules, gram=gram, text=text, calibration=calib.describe(), sampled=sampled,
    )  # fmt: skip


def collect_stats_while(
    feed: Any,
    modules: dict[str, Any],
    *,
    gram: set[str] | None = None,
    text: set[str] | None = None,
    calibration: dict[str, Any] | None = None,
    sampled: set[str] | None = None,
) -> CalibrationStats:
    """The statistics of ``modules``' inputs while ``feed(on_batch)`` runs forwards; ``feed`` calls ``on_batch``
    with each batch's inputs (its ``attention_mask`` marks padding) before that batch's forward. The whole-model
    pass above and the layer-by-layer one (:mod:`edgelvm.quantize.layerwise`) both collect through it."""
    collector = _Collector(modules, gram or set(), text or set(), sampled)
    try:
        feed(collector.new_batch)
    finally:
        collector.close()
    return CalibrationStats(collector.stats, collector.grams, calibration or {})

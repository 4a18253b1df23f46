"""Bootstrap intervals: coverage, width and the paired difference that ranks two compression variants."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelvm.eval.intervals import bootstrap_interval, paired_difference
from edgelvm.eval.metrics import ScoredItem, summarize


def test_interval_width_matches_the_binomial_standard_error():
    """At p = 0.9, n = 2000 the 95% interval is ±1.96·sqrt(p(1-p)/n) ≈ ±1.3 points."""
    correct = np.zeros(2000, dtype=bool)
    correct[:1800] = True
    low, high = bootstrap_interval(correct)
    half = 1.96 * np.sqrt(0.9 * 0.1 / 2000)
    assert abs((high - low) / 2 - half) < 0.002
    assert low < 0.9 < high


def test_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        sample = rng.random(400) < 0.8
        low, high = bootstrap_interval(sample, n_resamples=1000, seed=trial)
        covered += low <= 0.8 <= high
    assert 180 <= covered <= 199  # 95% nominal; the binomial spread of 200 trials is about ±6


def test_paired_difference_finds_a_gap_two_overlapping_intervals_hide():
    """Variant a is right on every question b gets right plus 30 more of 2000: 1.5 points, the separate intervals
    overlap, the paired interval excludes 0."""
    rng = np.random.default_rng(2)
    b = rng.random(2000) < 0.85
    a = b.copy()
    a[np.flatnonzero(~b)[:30]] = True
    (low_a, _), (_, high_b) = bootstrap_interval(a), bootstrap_interval(b)
    assert low_a < high_b  # overlapping
    diff, low, high = paired_difference(a, b)
    assert diff == 30 / 2000 and 0 < low <= diff <= high


def test_paired_difference_of_identical_variants_is_exactly_zero():
    a = np.random.default_rng(3).random(500) < 0.5
    assert paired_difference(a, a) == (0.0, 0.0, 0.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_interval_lies_in_unit_range_and_brackets_the_mean(values):
    low, high = bootstrap_interval(values, n_resamples=200)
    mean = float(np.mean(values))
    assert 0.0 <= low <= high <= 1.0
    assert low - 1e-12 <= mean <= high + 1e-12


def test_summarize_reports_intervals_per_type():
    items = [ScoredItem(str(i), "count" if i % 2 else "color", "q", "a", "a" if i % 3 else "b", bool(i % 3))
             for i in range(300)]  # fmt: skip
    metrics = summarize(items)
    low, high = metrics["exact_match_ci95"]
    assert low < metrics["exact_match"] < high
    for row in metrics["per_type"].values():
        assert row["exact_match_ci95"][0] <= row["exact_match"] <= row["exact_match_ci95"][1]


def test_pareto_front_keeps_only_undominated_variants():
    from edgelvm.eval.pareto import Variant, pareto_front

    variants = [
        Variant("fp32", 0.95, (0.94, 0.96), 400, 20.0),
        Variant("int8", 0.95, (0.94, 0.96), 200, 35.0),  # dominates fp32 on both axes
        Variant("int4-rtn", 0.80, (0.78, 0.82), 120, 60.0),  # dominated by int4-awq (same size, more accurate)
        Variant("int4-awq", 0.90, (0.88, 0.92), 120, 60.0),
        Variant("pruned", 0.70, (0.68, 0.72), 90, 50.0),  # smallest: on the size front, not on the speed front
    ]
    assert pareto_front(variants) == ["pruned", "int4-awq", "int8"]
    assert pareto_front(variants, cost="decode_tok_s") == ["int4-awq", "int8"]


def test_pareto_plot_writes_a_png(tmp_path):
    from PIL import Image

    from edgelvm.eval.pareto import Variant, pareto_plot

    variants = [Variant("fp32", 0.95, (0.94, 0.96), 400_000_000, 20.0), Variant("int4", 0.9, (0.88, 0.92), 1e8, 60.0)]
    out = pareto_plot(variants, tmp_path / "pareto.png", title="test")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 600

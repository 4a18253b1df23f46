"""Token samples in place of Gram matrices (AWQ's search and the error report on wide inputs): exact when the
sample holds every token, an unbiased estimate when it does not, never given to GPTQ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelvm.calibration import stats as st
from edgelvm.quantize.awq import _diagonal_blocks, output_error, scaled_input


def _tokens(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 3.0, k)  # channels of different magnitude, as activations have
    return torch.randn(n, k, generator=g) * scale


def test_a_sample_holding_every_token_is_the_gram_matrix():
    x = _tokens(300, 48)
    sample = st.TokenSample(size=1000, seed=0)
    for chunk in x.split(70):
        sample.add(chunk)
    gram = (x.T @ x).double()
    delta = torch.randn(16, 48)
    assert sample.tokens == 300
    assert output_error(delta, sample) == pytest.approx(output_error(delta, gram), rel=1e-5)
    np.testing.assert_allclose(_diagonal_blocks(sample, 48, 32), _diagonal_blocks(gram, 48, 32), rtol=1e-4, atol=1e-3)
    s = torch.linspace(0.5, 2.0, 48)
    assert output_error(delta, scaled_input(sample, s)) == pytest.approx(output_error(delta, scaled_input(gram, s)),
                                                                       rel=1e-5)  # fmt: skip


def test_a_smaller_sample_estimates_the_error_and_is_deterministic():
    x = _tokens(20000, 64, seed=1)
    gram = (x.T @ x).double()
    delta = torch.randn(32, 64)
    estimates = []
    for _ in range(2):
        sample = st.TokenSample(size=1024, seed=3)
        for chunk in x.split(1500):
            sample.add(chunk)
        assert sample.rows.shape == (1024, 64) and sample.tokens == 20000
        estimates.append(output_error(delta, sample))
    assert estimates[0] == estimates[1]
    assert estimates[0] == pytest.approx(output_error(delta, gram), rel=0.15)


def test_the_collector_samples_only_wide_inputs_it_is_allowed_to(monkeypatch):
    monkeypatch.setattr(st, "SAMPLE_TOKENS", 16)
    wide, narrow, hessian = torch.nn.Linear(32, 8), torch.nn.Linear(8, 4), torch.nn.Linear(32, 8)
    modules = {"wide": wide, "narrow": narrow, "hessian": hessian}

    def feed(on_batch):
        for seed in range(3):
            on_batch({})
            x = _tokens(40, 32, seed)
            wide(x), hessian(x + 1), narrow(_tokens(40, 8, seed))

    stats = st.collect_stats_while(feed, modules, gram=set(modules), sampled={"wide", "narrow"})
    assert isinstance(stats.gram("wide"), st.TokenSample) and stats.gram("wide").rows.shape == (16, 32)
    assert isinstance(stats.gram("narrow"), torch.Tensor)  # K = 8 <= 16: the Gram matrix is the smaller
    assert isinstance(stats.gram("hessian"), torch.Tensor)  # not allowed (GPTQ's)


def test_awq_on_token_samples_stays_close_to_awq_on_gram_matrices(tiny_checkpoints, calib_records, monkeypatch):
    """The tiny model's inputs are 32-64 wide: a 16-token sample stands in for every Gram matrix AWQ reads, while
    GPTQ still gets the Gram matrices (its codes do not change)."""
    from edgelvm.models import load_model
    from edgelvm.quantize import AWQConfig, GPTQConfig
    from edgelvm.quantize.api import quantize_model

    def run(config):
        adapter = load_model(str(tiny_checkpoints["llama-clip"]))
        result = quantize_model(adapter, [config], calib_records[:16], batch_size=8)
        errors = {r["name"]: r["output_error"] for r in result.report.layers if r["side"] == "text"}
        return result.sidecars["int4.safetensors"], errors

    awq_gram, errors_gram = run(AWQConfig(group_size=32))
    gptq_gram, _ = run(GPTQConfig(group_size=32))
    monkeypatch.setattr(st, "SAMPLE_TOKENS", 16)
    awq_sample, errors_sample = run(AWQConfig(group_size=32))
    gptq_sample, _ = run(GPTQConfig(group_size=32))
    for key, value in gptq_gram.items():
        np.testing.assert_array_equal(gptq_sample[key], value, err_msg=key)
    assert any(not np.array_equal(awq_sample[k], v) for k, v in awq_gram.items() if k.endswith(".scales"))
    mean_gram, mean_sample = np.mean(list(errors_gram.values())), np.mean(list(errors_sample.values()))
    assert mean_sample == pytest.approx(mean_gram, rel=0.25), (mean_gram, mean_sample)

"""Relaxed subset sampling (Xie and Ermon 2019): Gumbel top-k relaxed by k softmaxes.

Statistical tests use fixed seeds (deterministic); with a fresh seed each bound (5
standard errors) would fail with probability below 6e-7 per entry, 1e-5 per test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import softtopk
from tests.reference import oracles


def subset(x, k, **kw):
    return softtopk.relaxed_subset(x, k, **kw)


def gumbel_like(x, seed):
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp(min=1e-300)))


@pytest.mark.parametrize("n,k", [(4, 1), (10, 3), (50, 12)])
def test_equals_the_reference_algorithm(rng, n, k):
    for t in (0.05, 0.5, 5.0):
        x = torch.from_numpy(rng.normal(size=(3, n)))
        g = gumbel_like(x, 0)
        y = subset(x, k, temperature=t, gumbel=g)
        ref = np.stack([oracles.relaxed_subset_reference(x[b].numpy(), g[b].numpy(), k, t) for b in range(3)])
        np.testing.assert_allclose(y.numpy(), ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(y.sum(-1), torch.full((3,), float(k), dtype=torch.float64))


def test_entries_can_exceed_one_at_large_temperature():
    x = torch.tensor([[4.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    y = subset(x, 3, temperature=3.0, gumbel=torch.zeros_like(x))
    assert y.max() > 1.0


def test_zero_temperature_limit_is_the_top_k_of_the_keys(rng):
    x = torch.from_numpy(rng.normal(size=(6, 30)))
    g = gumbel_like(x, 1)
    y = subset(x, 5, temperature=1e-4, gumbel=g)
    hard = torch.zeros_like(x).scatter_(-1, (x + g).topk(5).indices, 1.0)
    torch.testing.assert_close(y, hard, atol=1e-9, rtol=0)


def test_samples_without_replacement_with_probability_proportional_to_weights():
    """Hard samples: inclusion probabilities are those of Plackett-Luce sampling."""
    M = 20_000
    logits = torch.tensor([0.5, -0.2, 1.0, 0.0, -1.0], dtype=torch.float64)
    y = subset(logits.expand(M, 5), 2, temperature=0.1, hard=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y.sum(-1), torch.full((M,), 2.0, dtype=torch.float64))
    freq = y.mean(0).numpy()
    p = oracles.plackett_luce_inclusion(logits.numpy(), 2)
    assert (np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / M)).all()


def test_straight_through_gradient(rng):
    x = torch.from_numpy(rng.normal(size=(2, 8))).requires_grad_()
    g = gumbel_like(x, 2)
    hard = subset(x, 3, temperature=0.5, hard=True, gumbel=g)
    soft = subset(x, 3, temperature=0.5, gumbel=g)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(
        hard.detach(), torch.zeros_like(x).scatter_(-1, soft.detach().topk(3).indices, 1.0)
    )
    v = torch.randn_like(soft)
    (gh,) = torch.autograd.grad(hard, x, v)
    (gs,) = torch.autograd.grad(soft, x, v)
    torch.testing.assert_close(gh, gs)


def test_gradcheck_float64(rng):
    x = torch.from_numpy(rng.normal(size=(2, 7))).requires_grad_()
    g = gumbel_like(x, 3)
    assert torch.autograd.gradcheck(lambda a: subset(a, 3, temperature=0.7, gumbel=g), (x,))
    k = torch.tensor([1.5, 2.25], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda kk: subset(x.detach(), kk, temperature=0.7, gumbel=g), (k,))


def test_padding_rules_and_plus_inf(rng):
    x = torch.from_numpy(rng.normal(size=(1, 6)))
    g = gumbel_like(x, 4)
    padded = torch.cat([x, torch.full((1, 2), -math.inf, dtype=torch.float64)], -1).requires_grad_()
    gp = torch.cat([g, torch.zeros(1, 2, dtype=torch.float64)], -1)
    y = subset(padded, 2, temperature=0.3, gumbel=gp)
    torch.testing.assert_close(y[:, :6], subset(x, 2, temperature=0.3, gumbel=g))
    assert (y[:, 6:] == 0).all()
    (grad,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), padded)
    assert (grad[:, 6:] == 0).all() and torch.isfinite(grad).all()
    z = torch.tensor([[math.inf, 0.0, 1.0, -1.0], [math.nan, 0, 1, 2], [1.0, -math.inf, -math.inf, 0.0]])
    y = subset(z, 2, temperature=0.3, generator=torch.Generator().manual_seed(0))
    assert y[0, 0] == 1.0 and torch.isclose(y[0].sum(), torch.tensor(2.0))
    assert torch.isnan(y[1]).all()
    torch.testing.assert_close(y[2], torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_validation():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="pass either generator or gumbel"):
        subset(x, 2, gumbel=torch.zeros(2, 5), generator=torch.Generator())
    with pytest.raises(ValueError, match="gumbel must have the shape of x"):
        subset(x, 2, gumbel=torch.zeros(5))
    with pytest.raises(TypeError, match="hard must be a bool"):
        subset(x, 2, hard=1)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        subset(x, 2, temperature=0.0)


@pytest.mark.parametrize("row", [[3e38, 1.0, -3e38], [3.4028237e37, 3.4028237e37], [3.4e38, 3.4e38, -3.4e38]])
def test_logits_near_the_float32_limit_give_finite_values_and_gradients(row):
    # x + g and alpha / t overflowed to inf (NaN samples); the keys are shifted by the row's max.
    x = torch.tensor([row], requires_grad=True)
    y = softtopk.relaxed_subset(x, 1, temperature=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(1))
    y.backward(torch.ones_like(y) + y.detach())
    assert torch.isfinite(x.grad).all()

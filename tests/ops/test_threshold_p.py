"""Threshold-p selection (MoDification): hard rule, router-weight gradient, soft budget version."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import softtopk
from softtopk import soft_threshold_p_mask, threshold_p_gate, threshold_p_mask


def test_hard_mask_is_the_elementwise_rule(rng):
    s = torch.from_numpy(rng.uniform(size=(6, 50)))
    for p in (0.1, 0.5, 0.93):
        expected = (s.numpy() >= p).astype(np.float64)
        np.testing.assert_array_equal(threshold_p_mask(s, p).numpy(), expected)
    # A tensor p broadcasts (one threshold per row).
    p = torch.tensor([[0.2], [0.8], [0.5], [0.0], [1.0], [0.3]], dtype=torch.float64)
    np.testing.assert_array_equal(threshold_p_mask(s, p).numpy(), (s >= p).double().numpy())


def test_hard_mask_is_causal():
    # Each token's decision depends on its own score only: changing later tokens changes nothing before.
    s = torch.rand(3, 40)
    later = s.clone()
    later[:, 20:] = torch.rand(3, 20)
    torch.testing.assert_close(threshold_p_mask(s, 0.5)[:, :20], threshold_p_mask(later, 0.5)[:, :20])


def test_special_values_and_dtypes():
    s = torch.tensor([math.nan, math.inf, -math.inf, 0.5, 0.49])
    torch.testing.assert_close(threshold_p_mask(s, 0.5), torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.tensor([0.2, 0.7], dtype=dtype)
        assert threshold_p_mask(x, 0.5).dtype == dtype and threshold_p_gate(x, 0.5).dtype == dtype


def test_gradient_reaches_router_only_through_the_weight():
    s = torch.rand(4, 30, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 30, dtype=torch.float64)
    (threshold_p_gate(s, 0.4) * v).sum().backward()
    kept = (s.detach() >= 0.4).double()
    torch.testing.assert_close(s.grad, v * kept)  # d(s m)/ds = m, with m held fixed
    s.grad = None
    threshold_p_mask(s, 0.4).sum().backward() if threshold_p_mask(s, 0.4).requires_grad else None
    assert s.grad is None  # the hard mask passes no gradient at all


def test_gate_gradcheck():
    s = (torch.rand(3, 8, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    s.data[s.data.sub(0.5).abs() < 0.02] += 0.05  # keep away from the jump at p
    assert torch.autograd.gradcheck(lambda z: threshold_p_gate(z, 0.5), (s,))


@pytest.mark.parametrize("method", ["sparse", "sparse-p4/3", "entropic", "lapsum", "hard"])
def test_soft_version_has_the_threshold_budget_and_hard_limit(method):
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(5, 32, generator=gen, dtype=torch.float64)
    s[:, 0] = 0.99  # at least one kept per row
    y = soft_threshold_p_mask(s, 0.6, method=method, temperature=0.05)
    budget = (s >= 0.6).sum(-1).double()
    if softtopk.registry.OPERATORS[method].sums_to_k:
        torch.testing.assert_close(y.sum(-1), budget)
    cold = soft_threshold_p_mask(s, 0.6, method=method, temperature=1e-6)
    # Entries are at least 1/(2 n) apart with high probability; the hard limit is the rule.
    torch.testing.assert_close(cold, threshold_p_mask(s, 0.6), atol=1e-3, rtol=0)


def test_soft_version_along_any_dim_and_gradcheck():
    s = torch.rand(4, 6, 3, dtype=torch.float64)
    y = soft_threshold_p_mask(s, 0.5, dim=1, temperature=0.1)
    torch.testing.assert_close(y.sum(1), (s >= 0.5).sum(1).double())
    z = torch.rand(2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_threshold_p_mask(t, 0.5, temperature=0.3), (z,))
    # The soft selection passes a gradient between tokens, which the hard rule does not.
    y0 = soft_threshold_p_mask(z, 0.5, method="entropic", temperature=0.3)[:, 0]
    g = torch.autograd.grad(y0.sum(), z)[0]
    assert g[:, 1:].abs().sum() > 0


def test_bad_input():
    with pytest.raises(TypeError, match="scores"):
        threshold_p_mask([0.1, 0.2], 0.5)
    with pytest.raises(TypeError, match="threshold must"):
        threshold_p_mask(torch.rand(3), "0.5")
    with pytest.raises(ValueError, match="threshold must not be NaN"):
        threshold_p_mask(torch.rand(3), math.nan)
    with pytest.raises(ValueError, match="broadcast"):
        threshold_p_mask(torch.rand(3, 4), torch.rand(5))
    with pytest.raises(ValueError, match="unknown method"):
        soft_threshold_p_mask(torch.rand(3), 0.5, method="nope")
    with pytest.raises(ValueError, match="magnitude operator"):
        soft_threshold_p_mask(torch.rand(3), 0.5, method="magnitude")
    with pytest.raises(ValueError, match="temperature"):
        soft_threshold_p_mask(torch.rand(3), 0.5, temperature=0.0)


def test_budget_is_counted_in_float32_for_half_precision_scores():
    s = torch.cat([torch.ones(257), torch.zeros(43)]).to(torch.bfloat16)[None]
    assert soft_threshold_p_mask(s, 0.5, temperature=1e-3).float().sum() == 257  # bf16 counts 256
    y = soft_threshold_p_mask(torch.ones(1, 1414, dtype=torch.bfloat16), 0.5)  # raised a k-range error
    assert y.float().sum() == 1414


def test_gate_is_zero_for_scores_it_does_not_keep():
    w = threshold_p_gate(torch.tensor([-math.inf, math.nan, 0.2, 0.7]), 0.5)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 0.0, 0.7]))

"""SOFT (Xie et al. 2020): method="soft" (two anchors) and the sorted k x n indicators.

Oracles: SOFT's published Sinkhorn in float64 (k smallest, cost normalised by its max)
to convergence, the paper's sorted variant (k + 1 anchors), finite differences of the
converged plan, and ott-jax's ``soft_sort.topk_mask`` (peer).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softtopk
from softtopk.ops._soft import soft_cost_scale
from tests.reference import oracles

_SCORE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3.0, 3.0))


@pytest.mark.parametrize("n,k", [(6, 3), (20, 5), (50, 10), (200, 7)])
@pytest.mark.parametrize("eps", [0.05, 0.2, 1.0])
def test_soft_equals_published_sinkhorn(rng, n, k, eps):
    """SOFT selects the k smallest; the mass at the anchor with weight k/n selects the k
    largest and is 1 - SOFT_smallest(x, n - k): the same transport problem."""
    for _ in range(3):
        x = rng.normal(size=n) * rng.choice([0.3, 1.0, 4.0]) + rng.choice([-2.0, 0.0, 3.0])
        ref = 1.0 - oracles.sinkhorn_soft(x, n - k, eps)
        ours = softtopk.topk_mask(torch.from_numpy(x), k, method="soft", temperature=eps)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6, rtol=0)


def test_soft_equals_soft_sinkhorn_mask_and_entropic(rng):
    x = torch.from_numpy(rng.normal(size=(4, 30)))
    ours = softtopk.topk_mask(x, 6, method="soft", temperature=0.3)
    sink = softtopk.soft_sinkhorn_mask(x, 6, temperature=0.3, max_iter=400)
    torch.testing.assert_close(ours, sink, atol=1e-9, rtol=0)
    c_max = torch.maximum(x**2, (x - 1) ** 2).amax(-1, keepdim=True)
    for i in range(4):
        ent = softtopk.topk_mask(x[i], 6, method="entropic", temperature=0.3 * c_max[i].item() / 2)
        torch.testing.assert_close(ours[i], ent, atol=1e-12, rtol=0)


def test_soft_reference_demo():
    """The reference demo: scores [5, 2, 3, 4, 1, 6], k = 3, eps = 0.05 (k smallest)."""
    x = torch.tensor([5.0, 2.0, 3.0, 4.0, 1.0, 6.0], dtype=torch.float64)
    smallest = 1.0 - softtopk.topk_mask(x, 3, method="soft", temperature=0.05)  # n - k = 3
    np.testing.assert_allclose(smallest.numpy(), [0.16, 0.84, 0.64, 0.36, 0.94, 0.06], atol=0.005)


def test_soft_gradcheck_with_fixed_normaliser(rng):
    """C_max is a constant in the backward, as published: with the maximal cost held by a
    constant entry, the backward is the exact derivative (float64 gradcheck)."""
    x = torch.from_numpy(rng.normal(size=(2, 9))).requires_grad_()
    far = torch.full((2, 1), -6.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: softtopk.topk_mask(torch.cat([a, far], -1), 3, method="soft", temperature=0.4), (x,)
    )


def test_soft_padding_and_rules():
    x = torch.tensor([[0.5, -math.inf, 2.0, 1.0], [-math.inf] * 4], dtype=torch.float64)
    y = softtopk.topk_mask(x, 2, method="soft", temperature=0.1)
    ref = softtopk.topk_mask(x[0, [0, 2, 3]], 2, method="soft", temperature=0.1)
    torch.testing.assert_close(y[0, [0, 2, 3]], ref)
    assert y[0, 1] == 0 and (y[1] == 0).all()


# --------------------------------------------------------------- sorted indicators


def sorted_soft(x, k, **kw):
    return softtopk.topk_indicators(x, k, method="soft", **kw)


@pytest.mark.parametrize("n,k", [(5, 1), (12, 3), (30, 6)])
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_sorted_soft_equals_published_sinkhorn(rng, n, k, eps):
    x = rng.normal(size=(3, n)) * 2.0 + 1.0
    y = sorted_soft(torch.from_numpy(x), k, temperature=eps, tol=1e-12, max_iter=100_000)
    assert y.shape == (3, k, n)
    for b in range(3):
        np.testing.assert_allclose(
            y[b].numpy(), oracles.sinkhorn_sorted_soft(x[b], k, eps), atol=1e-9, rtol=0
        )
    torch.testing.assert_close(y.sum(-1), torch.ones(3, k, dtype=torch.float64))


def test_sorted_soft_hard_limit():
    """Well separated scores on the anchors' scale: row j is the one-hot of the (j+1)-th largest."""
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0, 5.0, 4.0]], dtype=torch.float64)
    hard = torch.zeros(1, 3, 6, dtype=torch.float64)
    hard[0, [0, 1, 2], x.topk(3).indices[0]] = 1.0
    errors = [
        (sorted_soft(x, 3, temperature=eps, tol=1e-9, max_iter=10_000) - hard).abs().max().item()
        for eps in (0.1, 0.03, 0.01)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_sorted_soft_gradcheck_float64(rng, backward):
    x = torch.from_numpy(rng.normal(size=(2, 7)) * 2.0).requires_grad_()
    far = torch.full((2, 1), -5.0, dtype=torch.float64)  # holds the maximal cost, as above
    assert torch.autograd.gradcheck(
        lambda a: sorted_soft(
            torch.cat([a, far], -1), 3, temperature=0.3, tol=1e-13, max_iter=100_000, backward=backward
        ),
        (x,),
        atol=1e-6,
    )


def test_implicit_equals_unrolled_after_convergence(rng):
    x = torch.from_numpy(rng.normal(size=(4, 25)) * 2.0)
    v = torch.randn(4, 5, 25, dtype=torch.float64)
    grads = []
    for backward in ("implicit", "unrolled"):
        xr = x.clone().requires_grad_()
        sorted_soft(xr, 5, temperature=0.2, tol=1e-13, max_iter=100_000, backward=backward).backward(v)
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=0)


def test_sorted_soft_padding_and_short_rows():
    """-inf entries are absent sources; with fewer entries than k the rows beyond are 0."""
    x = torch.tensor(
        [[1.0, -math.inf, 3.0, 0.0, 2.0], [1.0, -math.inf, 3.0, -math.inf, -math.inf]], dtype=torch.float64
    )
    xr = x.clone().requires_grad_()
    y = sorted_soft(xr, 3, temperature=0.2, tol=1e-12, max_iter=100_000)
    ref = oracles.sinkhorn_sorted_soft(x[0].numpy(), 3, 0.2)
    np.testing.assert_allclose(y[0].detach().numpy(), ref, atol=1e-9)
    ref1 = oracles.sinkhorn_sorted_soft(x[1].numpy(), 3, 0.2)  # a soft sort of the two entries
    np.testing.assert_allclose(y[1].detach().numpy(), ref1, atol=1e-9)
    assert (y[1, 2] == 0).all() and (y[:, :, 1] == 0).all()
    torch.testing.assert_close(y[1, :2].sum(-1), torch.ones(2, dtype=torch.float64))
    (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), xr)
    assert torch.isfinite(g).all() and (g[:, 1] == 0).all() and (g[1, 3:] == 0).all()


def test_sorted_soft_warns_when_not_converged(rng):
    x = torch.from_numpy(rng.normal(size=(2, 20)))
    with pytest.warns(UserWarning, match="Sinkhorn stopped after max_iter=3 iterations"):
        sorted_soft(x, 4, temperature=0.01, max_iter=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sorted_soft(x, 4, temperature=0.5)


# ------------------------------------------------------------------------ ott-jax (peer)


@pytest.mark.peer
@pytest.mark.slow
def test_ott_topk_mask_equals_entropic():
    """ott's topk_mask transports n points to targets {0, 1} with weights (1 - k/n, k/n)
    and cost (x - y)^2: with identity squashing it is our entropic mask at t = eps / 2.
    Two shapes only: every new shape costs seconds of jit."""
    jax = pytest.importorskip("jax")
    soft_sort = pytest.importorskip("ott.tools.soft_sort")
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(7)
    x = rng.normal(size=20)
    for eps in (0.1, 0.5):
        for k in (3, 7):
            theirs = soft_sort.topk_mask(
                jax.numpy.asarray(x),
                k=k,
                epsilon=eps,
                squashing_fun=lambda z: z,
                threshold=1e-12,
                max_iterations=100_000,
            )
            ours = softtopk.topk_mask(torch.from_numpy(x), k, method="entropic", temperature=eps / 2)
            np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), atol=1e-5, rtol=0)
            assert np.abs(ours.numpy() - np.asarray(theirs)).max() < 1e-9


def test_huge_finite_scores_stay_finite():
    x = torch.tensor([[1e20, 0.0, 1.0, -math.inf]])
    for y in (
        softtopk.topk_mask(x, 1, method="soft"),
        softtopk.soft_sinkhorn_mask(x, 1),
        softtopk.topk_indicators(x[:, :3], 1)[0],
    ):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.sum(-1), torch.ones(1))


@pytest.mark.parametrize("k", [0, 5])
def test_sinkhorn_mask_at_k_zero_and_n_follows_the_row_rules(k):
    x = torch.randn(1, 5, requires_grad=True)
    y = softtopk.soft_sinkhorn_mask(x, k)
    torch.testing.assert_close(y, torch.full((1, 5), float(k > 0)))
    y.sum().backward()  # raised a singular-matrix error at k = n
    assert torch.equal(x.grad, torch.zeros(1, 5))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_effective_temperature_beyond_float64(monkeypatch, backend):
    # eps C_max / 2 = 1e4 * 1.8e304 overflowed to inf: NaN masks (numba) or gradients.
    monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
    x = torch.tensor([[0.0, 1.8961503816218354e152]], dtype=torch.float64, requires_grad=True)
    y = softtopk.topk_mask(x, 1, method="soft", temperature=1e4)
    torch.testing.assert_close(y.detach(), torch.full((1, 2), 0.5, dtype=torch.float64))
    y.backward(torch.ones_like(y) + y.detach())
    assert torch.isfinite(x.grad).all()


def test_sinkhorn_mask_rows_set_by_a_rule_on_one_entry():
    # Ruled rows were solved with k = 1 = n: a singular implicit backward (LinAlgError).
    x = torch.zeros(2, 1, requires_grad=True)
    y = softtopk.soft_sinkhorn_mask(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(y.detach(), torch.tensor([[0.0], [1.0]]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros(2, 1))


def test_sinkhorn_mask_keeps_fewer_than_k_infinite_entries():
    # +inf entries (fewer than k) get 1 and the others share k - (their number), as in
    # topk_mask; the solve on them was NaN (cost inf / inf).
    x = torch.tensor([[0.0, 0.0, math.inf, -1.0, -math.inf]], dtype=torch.float64, requires_grad=True)
    y = softtopk.soft_sinkhorn_mask(x, 2, temperature=0.1)
    finite = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)
    rest = softtopk.soft_sinkhorn_mask(finite, 1, temperature=0.1)
    torch.testing.assert_close(y.detach()[:, [0, 1, 3]], rest)
    assert y[0, 2] == 1.0 and y[0, 4] == 0.0
    y.backward(torch.arange(5.0, dtype=torch.float64).unsqueeze(0))
    assert torch.isfinite(x.grad).all() and x.grad[0, 2] == 0.0


def test_sinkhorn_rows_whose_costs_differ_by_a_shift_get_equal_masks():
    # A row spanning the float64 range: both entries have equal costs to the two anchors
    # (up to 1e-308), so SOFT sends them the same mass; rounding used to order them wrongly.
    big = torch.finfo(torch.float64).max
    y = softtopk.soft_sinkhorn_mask(torch.tensor([[big, 2.2e-308]], dtype=torch.float64), 1, temperature=0.1)
    assert y[0, 0] == y[0, 1]


def test_sinkhorn_backward_where_a_target_mass_rounds_away():
    # k within rounding of 0 (or n) makes the implicit backward's kernel singular: the
    # least-squares solution gives the gradient (zero: on one entry the mask is k whatever x).
    for k in (1.175494351e-38, 1.0 - 1e-17):
        x = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
        softtopk.soft_sinkhorn_mask(x, k, temperature=0.1).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-12
    # an unconverged plan (t = 1e-6, 200 iterations) sums to k but may exceed 1 (documented)
    y = softtopk.soft_sinkhorn_mask(torch.tensor([[0.0, 1.0]]), 1.5, temperature=1e-6)
    torch.testing.assert_close(y.sum(), torch.tensor(1.5))


@pytest.mark.parametrize("route", ["torch", "cpu"])
def test_rows_near_the_float64_limit(route, monkeypatch):
    """x - tau overflowed the CPU kernel: [max, 0] gave [0, 0] and [max, -max] NaN.

    The threshold family solves such rows on (x / c, t / c), which leaves the mask unchanged.
    """
    monkeypatch.setenv("SOFTTOPK_BACKEND", route)
    m = torch.finfo(torch.float64).max
    x = torch.tensor([[m, -m, 0.0], [m, 0.0, 0.0], [m / 2, m / 4, -m], [3.0, 1.0, 2.0]], dtype=torch.float64)
    k = torch.tensor([1.0, 1.0, 1.5, 1.5], dtype=torch.float64)
    y = softtopk.topk_mask(x, k, method="soft", temperature=0.1)
    assert torch.isfinite(y).all() and ((y >= 0) & (y <= 1)).all(), y
    torch.testing.assert_close(y.sum(-1), k, rtol=0, atol=1e-12)
    # the effective temperature is capped at 1e300, far below the gaps: the hard mask
    torch.testing.assert_close(y[:2], torch.tensor([[1.0, 0, 0], [1, 0, 0]], dtype=torch.float64))
    # an ordinary row of the same batch is untouched
    torch.testing.assert_close(
        y[3], softtopk.topk_mask(x[3:], k[3:], method="soft", temperature=0.1)[0], rtol=0, atol=0
    )


#: scores for the cost scale: also many in [0, 1], where every cost is below 1, next to
#: non-finite entries (which must not raise it)
_COST_SCORE = st.one_of(_SCORE, st.floats(0.0, 1.0), st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12).flatmap(
        lambda n: st.lists(st.lists(_COST_SCORE, min_size=n, max_size=n), min_size=1, max_size=4)
    ),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
def test_cost_scale_equals_the_largest_cost_over_every_entry(rows, dtype):
    """C_max / 2 from the row's extreme finite scores equals half the largest cost
    max((x - 0)^2, (x - 1)^2) over every finite entry, in float64; 1/8 without one."""
    x = torch.tensor(rows, dtype=torch.float64).to(dtype)
    xd = x.to(torch.float64)
    cost = torch.where(torch.isfinite(xd), torch.maximum(xd * xd, (xd - 1.0) ** 2), 0.0)
    want = 0.5 * cost.amax(-1).clamp(min=0.25, max=torch.finfo(torch.float64).max)
    assert torch.equal(soft_cost_scale(x), want)

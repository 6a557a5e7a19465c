"""The perturbation engine: noise objects, the one estimator Function, finite Monte-Carlo means.

The operators built on the engine (perturbed mask and indicators, smoothed k-th value,
Fenchel-Young and hinge losses) have their own tests; these check the engine against
independent float64 computations in numpy and the overflow regressions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import softtopk
from softtopk.losses import balanced_topk_hinge_loss, fenchel_young_topk_loss, smoothed_kth_value
from softtopk.ops._perturbation import (
    GAUSSIAN,
    GUMBEL,
    NOISES,
    Noise,
    perturbation,
    perturbed,
    sorted_selection,
    topk_selection,
)


def _pert(x, **kw):
    defaults = {"num_samples": None, "noise": None, "generator": None, "noise_samples": None}
    defaults.update(kw)
    return perturbation(x, x.dim() - 1, x.shape[0], default_samples=10, **defaults)


# ------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("name", ["gaussian", "gumbel"])
def test_noise_log_prob_and_score_match_scipy(name):
    z = torch.linspace(-4.0, 6.0, 41, dtype=torch.float64, requires_grad=True)
    law = NOISES[name]
    ref = (
        stats.norm.logpdf(z.detach().numpy())
        if name == "gaussian"
        else stats.gumbel_r.logpdf(z.detach().numpy())
    )
    np.testing.assert_allclose(law.log_prob(z).detach().numpy(), ref, rtol=1e-12, atol=1e-12)
    (dlogp,) = torch.autograd.grad(law.log_prob(z).sum(), z)
    torch.testing.assert_close(law.score(z.detach()), -dlogp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("law", [GAUSSIAN, GUMBEL])
def test_noise_samples_have_the_law(law):
    z = law.sample((200_000,), torch.Generator().manual_seed(0), torch.float64, "cpu")
    ref = stats.norm if law is GAUSSIAN else stats.gumbel_r
    assert stats.kstest(z.numpy(), ref.cdf).pvalue > 1e-3
    # E[score(Z)] = 0 for a smooth density vanishing at infinity.
    assert abs(law.score(z).mean().item()) < 5 / math.sqrt(200_000) * law.score(z).std().item()


def test_noise_object_or_name_and_bad_noise():
    x = torch.randn(2, 6, dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    by_name = softtopk.topk_mask(x, 2, method="perturbed", noise="gumbel", generator=gen())
    by_object = softtopk.topk_mask(x, 2, method="perturbed", noise=GUMBEL, generator=gen())
    torch.testing.assert_close(by_name, by_object, atol=0, rtol=0)
    with pytest.raises(ValueError, match="noise must be one of 'gaussian', 'gumbel'; got 'laplace'"):
        softtopk.topk_mask(x, 2, method="perturbed", noise="laplace")
    assert isinstance(GAUSSIAN, Noise) and repr(GUMBEL) == "Gumbel()"


# --------------------------------------------------------------------------- estimator


def _hard_masks(u: np.ndarray, k: int) -> np.ndarray:
    """Top-k masks of each sample row (M, B, n), by a stable argsort in numpy."""
    order = np.argsort(-u, axis=-1, kind="stable")[..., :k]
    y = np.zeros_like(u)
    np.put_along_axis(y, order, 1.0, axis=-1)
    return y


@pytest.mark.parametrize("noise", ["gaussian", "gumbel"])
def test_engine_gradient_is_the_closed_form_score_function_estimate(noise):
    """J^T v = (1 / (t M)) sum_m <y*(x + t Z_m), v> s(Z_m), computed in float64 numpy."""
    gen = torch.Generator().manual_seed(7)
    B, n, k, t, M = 3, 6, 2, 0.6, 25
    x = torch.randn(B, n, generator=gen, dtype=torch.float64, requires_grad=True)
    z = NOISES[noise].sample((M, B, n), gen, torch.float64, "cpu")
    v = torch.randn(B, n, generator=gen, dtype=torch.float64)
    pert = _pert(x.detach(), noise=noise, noise_samples=z)
    kv = torch.full((B,), float(k), dtype=torch.float64)
    y, _ = perturbed(x, topk_selection(kv, n), temperature=t, pert=pert, budget=kv)
    (g,) = torch.autograd.grad(y, x, v)

    xn, zn, vn = x.detach().numpy(), z.numpy(), v.numpy()
    hard = _hard_masks(xn[None] + t * zn, k)  # (M, B, n)
    score = zn if noise == "gaussian" else 1.0 - np.exp(-zn)
    inner = (hard * vn[None]).sum(-1)  # (M, B)
    expected = (inner[..., None] * score).sum(0) / (t * M)
    np.testing.assert_allclose(y.detach().numpy(), hard.mean(0), atol=1e-15, rtol=0)
    np.testing.assert_allclose(g.numpy(), expected, atol=1e-12, rtol=1e-12)


def test_engine_indicators_gradient_is_the_closed_form_estimate():
    gen = torch.Generator().manual_seed(8)
    B, n, k, t, M = 2, 5, 3, 0.4, 15
    x = torch.randn(B, n, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(M, B, n, generator=gen, dtype=torch.float64)
    v = torch.randn(B, k * n, generator=gen, dtype=torch.float64)
    y, _ = perturbed(
        x, sorted_selection(k, n), temperature=t, pert=_pert(x.detach(), noise_samples=z), width=k * n
    )
    (g,) = torch.autograd.grad(y, x, v)
    u = x.detach().numpy()[None] + t * z.numpy()
    order = np.argsort(-u, axis=-1, kind="stable")[..., :k]  # (M, B, k)
    hard = np.zeros((M, B, k, n))
    for j in range(k):
        np.put_along_axis(hard[:, :, j], order[..., j : j + 1], 1.0, axis=-1)
    inner = (hard.reshape(M, B, k * n) * v.numpy()[None]).sum(-1)
    expected = (inner[..., None] * z.numpy()).sum(0) / (t * M)
    np.testing.assert_allclose(y.detach().numpy(), hard.mean(0).reshape(B, k * n), atol=1e-15)
    np.testing.assert_allclose(g.numpy(), expected, atol=1e-12, rtol=1e-12)


def test_engine_value_gradient_is_pathwise():
    """F = mean_m <y*(u_m), u_m> - <c, x>: dF/dx = y - c, dF/dc = -x."""
    gen = torch.Generator().manual_seed(9)
    B, n, t, M = 2, 7, 0.5, 12
    x = torch.randn(B, n, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.rand(B, n, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(M, B, n, generator=gen, dtype=torch.float64)
    k = torch.tensor([2.0, 3.5], dtype=torch.float64)
    y, F = perturbed(
        x, topk_selection(k, n), temperature=t, pert=_pert(x.detach(), noise_samples=z), target=c, budget=k
    )
    gx, gc = torch.autograd.grad(F.sum(), (x, c))
    torch.testing.assert_close(gx, (y - c).detach(), atol=1e-15, rtol=0)
    torch.testing.assert_close(gc, -x.detach(), atol=0, rtol=0)
    u = (x.detach()[None] + t * z).numpy()
    top = np.stack([-np.sort(-u[:, b], axis=-1) for b in range(B)], 1)  # (M, B, n) decreasing
    w = np.clip(k.numpy()[None, :, None] - np.arange(n), 0, 1)
    ref = (w * top).sum(-1).mean(0) - (c * x).sum(-1).detach().numpy()
    np.testing.assert_allclose(F.detach().numpy(), ref, atol=1e-13, rtol=0)


def test_different_generators_differ_and_a_seed_reproduces():
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 20, dtype=torch.float64)

    def run(seed):
        y = softtopk.topk_mask(
            x, 4, method="perturbed", num_samples=16, generator=torch.Generator().manual_seed(seed)
        )
        (g,) = torch.autograd.grad(y, x, v)
        return y.detach(), g

    (ya, ga), (yb, gb), (yc, gc) = run(1), run(2), run(1)
    assert not torch.equal(ya, yb) and not torch.equal(ga, gb)
    assert torch.equal(ya, yc) and torch.equal(ga, gc)
    # The global generator: two calls differ, the same torch.manual_seed reproduces.
    torch.manual_seed(3)
    a = softtopk.topk_mask(x.detach(), 4, method="perturbed", num_samples=16)
    b = softtopk.topk_mask(x.detach(), 4, method="perturbed", num_samples=16)
    torch.manual_seed(3)
    c = softtopk.topk_mask(x.detach(), 4, method="perturbed", num_samples=16)
    assert not torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------- means of finite values


def test_smoothed_kth_value_of_large_finite_scores_is_finite():
    x = torch.tensor([[1e38, 2e38, 0.0]], requires_grad=True)
    v = smoothed_kth_value(x, 1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, torch.tensor([2e38]), rtol=1e-6, atol=0)
    (g,) = torch.autograd.grad(v.sum(), x)
    torch.testing.assert_close(g, torch.tensor([[0.0, 1.0, 0.0]]))
    v2 = smoothed_kth_value(x.detach(), 2, num_samples=64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(v2, torch.tensor([1e38]), rtol=1e-6, atol=0)


def test_hinge_loss_of_large_finite_scores_is_finite():
    scores = torch.tensor([[1e38, 2e38, 0.0], [3e38, -3e38, 1.0]], requires_grad=True)
    loss = balanced_topk_hinge_loss(
        scores, torch.tensor([1, 0]), 1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, scores)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fenchel_young_loss_of_large_finite_scores_is_finite(dtype):
    big = torch.finfo(dtype).max / 2
    x = torch.tensor([[0.5 * big, big, 0.0], [big, big, -big]], dtype=dtype, requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=dtype)
    loss = fenchel_young_topk_loss(x, target, generator=torch.Generator().manual_seed(0), reduction="none")
    assert torch.isfinite(loss).all()
    # The target is the top k of x (by a margin far above the noise): the loss is the mean of
    # t <y*, Z_m>, tiny next to the scores, and its gradient y - target is zero.
    assert (loss.abs() < 10.0).all()
    (g,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(g, torch.zeros_like(x), atol=0, rtol=0)

"""Perturbed top-k (Berthet et al. 2020): mask, sorted indicators, Fenchel-Young loss.

Exact checks use an explicit noise tensor (the Monte-Carlo estimate is then a
deterministic function). The score-function backward is checked exactly against the
derivative of the importance-weighted estimate (the same samples seen from a moved
input), and statistically against closed forms. Statistical tests use fixed seeds, so
they are deterministic; with a fresh seed each bound (5 standard errors, two-sided)
would fail with probability below 6e-7 per entry, below 1e-4 per test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import softtopk
from softtopk.losses import fenchel_young_topk_loss
from tests.reference import oracles


def perturbed(x, k, **kw):
    return softtopk.topk_mask(x, k, method="perturbed", **kw)


def gumbel(shape, seed):
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp(min=1e-300)))


def log_density(z, noise):
    return -0.5 * z * z if noise == "gaussian" else -z - torch.exp(-z)


@pytest.mark.parametrize("noise", ["gaussian", "gumbel"])
@pytest.mark.parametrize("n,k", [(5, 2), (40, 7), (300, 1)])
def test_mask_equals_reference_with_the_same_noise(rng, noise, n, k):
    x = torch.from_numpy(rng.normal(size=(4, n)))
    z = torch.randn(25, 4, n, dtype=torch.float64) if noise == "gaussian" else gumbel((25, 4, n), 1)
    y = perturbed(x, k, temperature=0.7, noise=noise, noise_samples=z)
    ref = np.stack(
        [oracles.perturbed_topk_reference(x[b].numpy(), z[:, b].numpy(), k, 0.7) for b in range(4)]
    )
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-15, rtol=0)
    torch.testing.assert_close(y.sum(-1), torch.full((4,), float(k), dtype=torch.float64))


def test_generator_draws_are_replayed_in_the_backward():
    """Generator-driven noise = the same draws passed explicitly, forward and backward."""
    x = torch.randn(3, 50, dtype=torch.float64)
    v = torch.randn(3, 50, dtype=torch.float64)
    for noise in ("gaussian", "gumbel"):
        xa = x.clone().requires_grad_()
        ya = perturbed(
            xa, 5, temperature=0.5, noise=noise, num_samples=30, generator=torch.Generator().manual_seed(3)
        )
        ya.backward(v)
        gen = torch.Generator().manual_seed(3)
        if noise == "gaussian":
            z = torch.randn(30, 3, 50, generator=gen, dtype=torch.float64)
        else:
            u = torch.rand(30, 3, 50, generator=gen, dtype=torch.float64)
            z = -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float64).tiny)))
        xb = x.clone().requires_grad_()
        yb = perturbed(xb, 5, temperature=0.5, noise=noise, noise_samples=z)
        yb.backward(v)
        torch.testing.assert_close(ya, yb, atol=0, rtol=0)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-13, rtol=0)


def test_chunked_noise_matches_one_chunk(monkeypatch):
    from softtopk.ops import _perturbation

    x = torch.randn(2, 64, dtype=torch.float64)
    z = torch.randn(40, 2, 64, dtype=torch.float64)
    v = torch.randn(2, 64, dtype=torch.float64)
    outs = []
    for chunk in (1 << 23, 200):  # one chunk, or chunks of one or two samples
        monkeypatch.setattr(_perturbation, "CHUNK_ELEMENTS", chunk)
        xr = x.clone().requires_grad_()
        y = perturbed(xr, 6, temperature=0.3, noise_samples=z)
        y.backward(v)
        outs.append((y, xr.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-15, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-13, rtol=0)


def test_generator_advances_and_seeds_reproduce():
    x = torch.randn(2, 30)
    g = torch.Generator().manual_seed(5)
    a, b = perturbed(x, 4, generator=g, num_samples=10), perturbed(x, 4, generator=g, num_samples=10)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, perturbed(x, 4, generator=torch.Generator().manual_seed(5), num_samples=10))


@pytest.mark.parametrize("noise", ["gaussian", "gumbel"])
@pytest.mark.parametrize("what", ["mask", "indicators"])
def test_score_function_backward_is_the_derivative_of_the_importance_weighted_estimate(noise, what):
    """Exact float64 check of the backward (Berthet et al., Prop. 3.1).

    With u_m = x0 + t Z_m fixed, f(x) = mean_m y*(u_m) p((u_m - x)/t) / p(Z_m) is smooth
    in x, equals the estimate at x0, and its derivative at x0 is the score-function
    estimator. Central differences of f must match our backward.
    """
    gen = torch.Generator().manual_seed(11)
    n, k, t, M = 7, 3, 0.8, 50
    x0 = torch.randn(1, n, generator=gen, dtype=torch.float64)
    z = (
        torch.randn(M, 1, n, generator=gen, dtype=torch.float64)
        if noise == "gaussian"
        else gumbel((M, 1, n), 2)
    )

    def op(a, samples):
        if what == "mask":
            return perturbed(a, k, temperature=t, noise=noise, noise_samples=samples)
        return softtopk.topk_indicators(
            a, k, method="perturbed", temperature=t, noise=noise, noise_samples=samples
        )

    u = x0 + t * z  # (M, 1, n)
    hard = torch.stack([op(um, torch.zeros(1, 1, n, dtype=torch.float64)) for um in u])  # y*(u_m)

    def f(a):
        w = torch.exp((log_density((u - a) / t, noise) - log_density(z, noise)).sum(-1))  # (M, 1)
        return (w.view(M, *([1] * (hard.dim() - 1))) * hard).mean(0)

    torch.testing.assert_close(f(x0), op(x0, z), atol=1e-14, rtol=0)
    ours = torch.autograd.functional.jacobian(lambda a: op(a, z), x0).reshape(-1, n)
    h = 1e-6
    numeric = torch.stack(
        [(f(x0 + h * e) - f(x0 - h * e)).reshape(-1) / (2 * h) for e in torch.eye(n, dtype=torch.float64)], -1
    )
    torch.testing.assert_close(ours, numeric, atol=1e-8, rtol=1e-6)


def _se_bound(M, t):
    # For v = e_i, each sample's term is <y_m, e_i> grad nu(Z_m)_j / t with <y_m, e_i> in {0, 1}
    # and E[grad nu(Z)^2] = 1 for both noises: the standard error is at most 1/(t sqrt(M)).
    return 1.0 / (t * math.sqrt(M))


def test_gaussian_two_entries_closed_form():
    """n = 2, k = 1: y_1 = Phi((x_1 - x_2)/(t sqrt 2)), dy_1/dx_1 = phi(.)/(t sqrt 2)."""
    M, t = 40_000, 0.7
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    y = perturbed(x, 1, temperature=t, num_samples=M, generator=torch.Generator().manual_seed(0))
    d = (0.3 + 0.2) / (t * math.sqrt(2))
    p = norm.cdf(d)
    se = math.sqrt(p * (1 - p) / M)
    assert abs(y[0, 0].item() - p) < 5 * se
    (g,) = torch.autograd.grad(y[0, 0], x)
    slope = norm.pdf(d) / (t * math.sqrt(2))
    bound = 5 * _se_bound(M, t)
    assert abs(g[0, 0].item() - slope) < bound and abs(g[0, 1].item() + slope) < bound


@pytest.mark.parametrize("k", [1, 2])
def test_gumbel_inclusion_probabilities_closed_form(k):
    """Gumbel noise: top-k of x + tG samples without replacement with P proportional to exp(x/t).

    k = 1 is the Gumbel-max trick: y = softmax(x/t), J = (diag y - y y^T)/t.
    """
    M, t = 40_000, 0.5
    x0 = np.array([0.4, -0.3, 0.1, 0.9, -1.0])
    x = torch.tensor(x0[None], requires_grad=True)
    y = perturbed(
        x, k, temperature=t, noise="gumbel", num_samples=M, generator=torch.Generator().manual_seed(1)
    )
    p = oracles.plackett_luce_inclusion(x0 / t, k)
    se = np.sqrt(p * (1 - p) / M)
    assert (np.abs(y[0].detach().numpy() - p) < 5 * se).all()
    jac = np.stack([torch.autograd.grad(y[0, i], x, retain_graph=True)[0][0].numpy() for i in range(5)])
    h = 1e-6
    exact = np.stack(
        [
            (
                oracles.plackett_luce_inclusion((x0 + h * e) / t, k)
                - oracles.plackett_luce_inclusion((x0 - h * e) / t, k)
            )
            / (2 * h)
            for e in np.eye(5)
        ],
        -1,
    )
    if k == 1:
        sm = np.exp(x0 / t) / np.exp(x0 / t).sum()
        np.testing.assert_allclose(exact, (np.diag(sm) - np.outer(sm, sm)) / t, atol=1e-8)
    assert (np.abs(jac - exact) < 5 * _se_bound(M, t)).all()


def test_hard_limit_and_sparsity(rng):
    x = torch.from_numpy(rng.normal(size=(5, 200)))
    y = perturbed(x, 10, temperature=1e-9, num_samples=3, generator=torch.Generator().manual_seed(0))
    hard = torch.zeros_like(x).scatter_(-1, x.topk(10, dim=-1).indices, 1.0)
    torch.testing.assert_close(y, hard, atol=0, rtol=0)
    y = perturbed(x, 10, temperature=0.1, num_samples=8, generator=torch.Generator().manual_seed(0))
    assert ((y > 0).sum(-1) <= 80).all()  # at most M k non-zeros


def test_padding_rules_and_infinite_entries():
    inf = math.inf
    x = torch.tensor(
        [
            [1.0, -inf, 0.5, 2.0, -inf],
            [inf, 0.0, 1.0, -1.0, 2.0],
            [1.0, -inf, -inf, -inf, 0.0],
            [math.nan, 0, 1, 2, 3],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    y = perturbed(x, 2, temperature=0.5, num_samples=200, generator=torch.Generator().manual_seed(0))
    assert (y[0, [1, 4]] == 0).all() and y[1, 0] == 1.0
    torch.testing.assert_close(y[2], torch.tensor([1.0, 0, 0, 0, 1.0], dtype=torch.float64))
    assert torch.isnan(y[3]).all()
    torch.testing.assert_close(y[:3].sum(-1), torch.full((3,), 2.0, dtype=torch.float64))
    (g,) = torch.autograd.grad((y[:3] * torch.randn(3, 5, dtype=torch.float64)).sum(), x)
    assert torch.isfinite(g[:3]).all()
    assert (g[0, [1, 4]] == 0).all() and g[1, 0] == 0 and (g[2] == 0).all()


def test_dim_and_dtype(rng):
    x = torch.from_numpy(rng.normal(size=(3, 8, 2))).float()
    z = torch.randn(6, 3, 8, 2)
    y = perturbed(x, 3, dim=1, noise_samples=z, temperature=0.2)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = perturbed(x.movedim(1, -1), 3, noise_samples=z.movedim(2, -1), temperature=0.2).movedim(-1, 1)
    torch.testing.assert_close(y, ref)


# ------------------------------------------------------------------------ indicators


def test_indicators_equal_reference_with_the_same_noise(rng):
    x = torch.from_numpy(rng.normal(size=(2, 9)))
    z = torch.randn(30, 2, 9, dtype=torch.float64)
    y = softtopk.topk_indicators(x, 3, method="perturbed", temperature=0.4, noise_samples=z)
    assert y.shape == (2, 3, 9)
    for b in range(2):
        ref = np.zeros((3, 9))
        for m in range(30):
            order = np.argsort(-(x[b].numpy() + 0.4 * z[m, b].numpy()), kind="stable")
            ref[np.arange(3), order[:3]] += 1 / 30
        np.testing.assert_allclose(y[b].numpy(), ref, atol=1e-15)
    torch.testing.assert_close(y.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    # Summing the k rows gives the perturbed mask with the same noise.
    torch.testing.assert_close(y.sum(-2), perturbed(x, 3, temperature=0.4, noise_samples=z))


def test_indicators_gumbel_first_row_is_softmax():
    M, t = 40_000, 0.5
    x0 = torch.tensor([[0.4, -0.3, 0.1, 0.9, -1.0]], dtype=torch.float64)
    y = softtopk.topk_indicators(
        x0,
        2,
        method="perturbed",
        temperature=t,
        noise="gumbel",
        num_samples=M,
        generator=torch.Generator().manual_seed(2),
    )
    p = torch.softmax(x0[0] / t, -1)
    se = torch.sqrt(p * (1 - p) / M)
    assert ((y[0, 0] - p).abs() < 5 * se).all()


# ----------------------------------------------------------------- Fenchel-Young loss


def test_fenchel_young_gradient_is_mask_minus_target(rng):
    x = torch.from_numpy(rng.normal(size=(4, 12))).requires_grad_()
    target = torch.zeros(4, 12, dtype=torch.float64).scatter_(-1, torch.randint(0, 12, (4, 3)), 1.0)
    k = target.sum(-1)
    z = torch.randn(20, 4, 12, dtype=torch.float64)
    loss = fenchel_young_topk_loss(x, target, temperature=0.3, noise_samples=z, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    y = perturbed(x.detach(), k, temperature=0.3, noise_samples=z)
    torch.testing.assert_close(g, y - target, atol=1e-15, rtol=0)
    # Value: mean over samples of the sum of the top k of x + t z, minus <x, target>.
    top = torch.stack(
        [
            torch.stack([(x[b] + 0.3 * z[m, b]).topk(int(k[b])).values.sum() for m in range(20)]).mean()
            for b in range(4)
        ]
    )
    torch.testing.assert_close(loss, (top - (x * target).sum(-1)).sum().detach())


def test_fenchel_young_gradcheck_float64(rng):
    """With fixed noise the estimate of F is piecewise linear: its derivative is exact."""
    x = torch.from_numpy(rng.normal(size=(2, 9))).requires_grad_()
    target = torch.zeros(2, 9, dtype=torch.float64)
    target[:, :3] = 1.0
    z = torch.randn(15, 2, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: fenchel_young_topk_loss(a, target, temperature=0.5, noise_samples=z, reduction="none"), (x,)
    )


def test_fenchel_young_is_zero_gradient_when_target_is_the_top_k():
    x = torch.tensor([[3.0, 1.0, 2.0, -1.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    loss = fenchel_young_topk_loss(x, target, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert abs(loss.item()) < 1e-4


# ------------------------------------------------------------------------ validation


def test_noise_arguments_are_validated():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="num_samples applies to method='perturbed' only, got num_samples=5"):
        softtopk.topk_mask(x, 2, method="sparse", num_samples=5)
    with pytest.raises(ValueError, match="generator applies to the stochastic methods only"):
        softtopk.topk_mask(x, 2, method="entropic", generator=torch.Generator())
    with pytest.raises(ValueError, match="noise must be one of 'gaussian', 'gumbel'; got 'cauchy'"):
        perturbed(x, 2, noise="cauchy")
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        perturbed(x, 2, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be a positive int, got float 2.0"):
        perturbed(x, 2, num_samples=2.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        perturbed(x, 2, generator=0)
    with pytest.raises(ValueError, match=r"noise_samples must have shape \(num_samples, \*x.shape\)"):
        perturbed(x, 2, noise_samples=torch.randn(3, 6, 2))
    with pytest.raises(ValueError, match="pass either generator or noise_samples"):
        perturbed(x, 2, noise_samples=torch.randn(3, 2, 6), generator=torch.Generator())
    with pytest.raises(ValueError, match="num_samples=4 disagrees with noise_samples.shape"):
        perturbed(x, 2, noise_samples=torch.randn(3, 2, 6), num_samples=4)
    with pytest.raises(ValueError, match="not differentiable in k"):
        perturbed(x, torch.tensor([1.0, 2.0], requires_grad=True))

"""Smoothed k-th value and the noised top-k hinge losses (Garcin et al. 2022).

The peer tests compare with the published ``pytopk`` package given the same noise
tensor Z (pytopk's layout (batch, classes, samples) is ours moved: Z.movedim(-1, 0)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import softtopk
from softtopk.losses import (
    balanced_topk_hinge_loss,
    imbalanced_topk_hinge_loss,
    ldam_margins,
    smoothed_kth_value,
)


def kth_reference(x, z, k, t):
    """mean_m of the k-th largest of x + t z_m, by sorting (numpy)."""
    v = x[None] + t * z  # (M, B, n)
    return np.sort(v, axis=-1)[..., ::-1][..., k - 1].mean(0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_smoothed_kth_value_equals_sorting(rng, k):
    x = rng.normal(size=(5, 10))
    z = rng.normal(size=(7, 5, 10))
    v = smoothed_kth_value(torch.from_numpy(x), k, temperature=0.3, noise_samples=torch.from_numpy(z))
    np.testing.assert_allclose(v.numpy(), kth_reference(x, z, k, 0.3), atol=1e-15, rtol=0)
    # Per-row ranks take the topk route.
    ks = torch.tensor([1, 2, 3, 4, 10])
    v = smoothed_kth_value(torch.from_numpy(x), ks, temperature=0.3, noise_samples=torch.from_numpy(z))
    ref = [kth_reference(x[i : i + 1], z[:, i : i + 1], int(ks[i]), 0.3)[0] for i in range(5)]
    np.testing.assert_allclose(v.numpy(), ref, atol=1e-15, rtol=0)


def test_smoothed_kth_value_gradient(rng):
    """The gradient is the mean one-hot of the k-th index: gradcheck holds exactly (piecewise linear)."""
    x = torch.from_numpy(rng.normal(size=(3, 8))).requires_grad_()
    z = torch.randn(9, 3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: smoothed_kth_value(a, 3, temperature=0.5, noise_samples=z), (x,)
    )
    (g,) = torch.autograd.grad(smoothed_kth_value(x, 3, temperature=0.5, noise_samples=z).sum(), x)
    torch.testing.assert_close(g.sum(-1), torch.ones(3, dtype=torch.float64))
    assert ((g > 0).sum(-1) <= 9).all()


def test_smoothed_kth_value_limits_and_edges():
    x = torch.tensor(
        [[3.0, 1.0, 2.0, -math.inf], [0.0, math.nan, 1.0, 2.0]], dtype=torch.float64, requires_grad=True
    )
    v = smoothed_kth_value(x, 2, temperature=1e-9, generator=torch.Generator().manual_seed(0))
    assert abs(v[0].item() - 2.0) < 1e-8 and math.isnan(v[1].item())
    (g,) = torch.autograd.grad(v[0], x)
    assert g[0, 3] == 0 and g[0, 2] == 1.0
    with pytest.raises(ValueError, match="k must be an integer in"):
        smoothed_kth_value(x, 0)
    with pytest.raises(ValueError, match="k must be an integer in"):
        smoothed_kth_value(x, 1.5)


def _hinge_reference(s, y, k, t, z, margin):
    kth = kth_reference(s, z, k + 1, t)
    return np.maximum(0.0, margin + kth - s[np.arange(len(y)), y])


def test_balanced_and_imbalanced_hinge_formulas(rng):
    s = rng.normal(size=(6, 5))
    y = rng.integers(0, 5, size=6)
    z = rng.normal(size=(4, 6, 5))
    args = (torch.from_numpy(s), torch.from_numpy(y), 2)
    bal = balanced_topk_hinge_loss(
        *args, temperature=0.4, noise_samples=torch.from_numpy(z), reduction="none"
    )
    np.testing.assert_allclose(bal.numpy(), _hinge_reference(s, y, 2, 0.4, z, 1.0), atol=1e-15)
    counts = [50, 10, 5, 200, 1]
    m = ldam_margins(counts, 0.3).numpy()
    np.testing.assert_allclose(m, 0.3 * np.power(counts, -0.25) / np.power(1.0, -0.25))
    imb = imbalanced_topk_hinge_loss(
        *args,
        class_counts=counts,
        max_margin=0.3,
        scale=7.0,
        temperature=0.4,
        noise_samples=torch.from_numpy(z),
    )
    kth = kth_reference(s, z, 3, 0.4)
    ref = np.maximum(0.0, 7.0 * (m[y] + kth - s[np.arange(6), y])).mean()
    np.testing.assert_allclose(imb.item(), ref, atol=1e-14)


def test_hinge_losses_validate():
    s, y = torch.randn(2, 4), torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, n - 1\]"):
        balanced_topk_hinge_loss(s, y, 4)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        balanced_topk_hinge_loss(s, y.float(), 2)
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 3\]"):
        balanced_topk_hinge_loss(s, torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="target must have the shape of scores without dim"):
        balanced_topk_hinge_loss(s, torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="class_counts must have one entry per class"):
        imbalanced_topk_hinge_loss(s, y, 2, class_counts=[1, 2], max_margin=0.2)
    with pytest.raises(ValueError, match="reduction must be one of"):
        balanced_topk_hinge_loss(s, y, 2, reduction="avg")


# ------------------------------------------------------------------------ pytopk (peer)


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pytopk_smoothed_kth_value_and_gradient(dtype):
    noised = pytest.importorskip("pytopk.noised_topk")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 20, generator=gen).to(dtype)
    Z = torch.randn(8, 20, 6, generator=gen).to(dtype)  # pytopk's layout
    for k in (1, 4, 20):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        theirs = noised._noised_topk(xa, Z, k, 0.7, -1, -1)
        ours = smoothed_kth_value(xb, k, temperature=0.7, noise_samples=Z.movedim(-1, 0))
        tol = 1e-6 if dtype == torch.float32 else 1e-15
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)
        v = torch.randn(8, generator=gen).to(dtype)
        theirs.backward(v)
        ours.backward(v)
        # pytopk averages the one-hots in float32 (torch.zeros without a dtype), so its
        # gradient carries float32 rounding even for float64 inputs.
        torch.testing.assert_close(xb.grad, xa.grad.to(dtype), atol=1e-7 * v.abs().max().item(), rtol=0)


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pytopk_hinge_losses(dtype):
    noised = pytest.importorskip("pytopk.noised_topk")
    functional = pytest.importorskip("pytopk.functional")
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(16, 10, generator=gen).to(dtype)
    y = torch.randint(0, 10, (16,), generator=gen)
    Z = torch.randn(16, 10, 5, generator=gen).to(dtype)
    counts = [100, 50, 20, 10, 5, 300, 7, 2, 40, 1]
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for k in (1, 2, 5):
        sa, sb = s.clone().requires_grad_(), s.clone().requires_grad_()
        theirs = functional.bal_noised_topk_loss(sa, y, k, 0.2, noised._noised_topk, Z)
        ours = balanced_topk_hinge_loss(sb, y, k, temperature=0.2, noise_samples=Z.movedim(-1, 0))
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)
        theirs.backward()
        ours.backward()
        torch.testing.assert_close(sb.grad, sa.grad.to(dtype), atol=1e-7, rtol=0)  # float32 one-hot means
        m_list = ldam_margins(counts, 0.2).to(torch.float32)  # pytopk keeps the margins in float32
        sa, sb = s.clone().requires_grad_(), s.clone().requires_grad_()
        theirs = functional.imbal_noised_topk_loss(
            sa, y, k, m_list.to(dtype), 0.01, noised._noised_topk, Z, 60.0
        )
        ours = imbalanced_topk_hinge_loss(
            sb,
            y,
            k,
            class_counts=counts,
            max_margin=0.2,
            scale=60.0,
            temperature=0.01,
            noise_samples=Z.movedim(-1, 0),
        )
        # pytopk rounds the margins to float32: up to 0.2 * 2^-24 each, times the scale 60.
        torch.testing.assert_close(ours, theirs, atol=max(60 * tol, 1e-6), rtol=0)
        theirs.backward()
        ours.backward()
        torch.testing.assert_close(sb.grad, sa.grad.to(dtype), atol=60 * 1e-7, rtol=0)


@pytest.mark.peer
def test_pytopk_margins_equal_ldam_margins():
    pytopk = pytest.importorskip("pytopk")
    counts = [100, 50, 20, 10, 5, 300, 7, 2, 40, 1]
    module = pytopk.ImbalNoisedTopK(2, 0.1, max_m=0.3, cls_num_list=counts)
    torch.testing.assert_close(ldam_margins(counts, 0.3).float(), module.m_list, atol=0, rtol=0)


@pytest.mark.peer
def test_pytopk_same_noise_gives_our_perturbed_mask():
    """The perturbed mask is sum_{j <= k} of the gradients of the smoothed j-th values."""
    noised = pytest.importorskip("pytopk.noised_topk")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 15, generator=gen, dtype=torch.float64)
    Z = torch.randn(6, 15, 40, generator=gen, dtype=torch.float64)
    for k in (1, 3, 7):
        mask = torch.zeros_like(x)
        for j in range(1, k + 1):
            xr = x.clone().requires_grad_()
            noised._noised_topk(xr, Z, j, 0.5, -1, -1).sum().backward()
            mask += xr.grad
        ours = softtopk.topk_mask(x, k, method="perturbed", temperature=0.5, noise_samples=Z.movedim(-1, 0))
        torch.testing.assert_close(ours, mask, atol=1e-7, rtol=0)

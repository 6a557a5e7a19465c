"""CUDA for the operators that take explicit noise (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import softtopk
from softtopk.losses import fenchel_young_topk_loss, smoothed_kth_value

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def both(fn, x, *args, **kw):
    """fn on CPU and on CUDA (same inputs), outputs and gradients for one cotangent."""
    out = []
    v = None
    for device in ("cpu", "cuda"):
        xr = x.to(device).requires_grad_()
        moved = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
        y = fn(xr, *args, **moved)
        v = (
            torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(0))
            if v is None
            else v
        )
        y.backward(v.to(device))
        out.append((y.detach().cpu(), xr.grad.cpu()))
    return out


@pytest.mark.parametrize("n", [50, 5000])
def test_noise_driven_operators_match_cpu(n):
    x = torch.randn(3, n, dtype=torch.float64)
    z = torch.randn(8, 3, n, dtype=torch.float64)
    cases = [
        (softtopk.topk_mask, (4,), {"method": "perturbed", "noise_samples": z, "temperature": 0.3}),
        (softtopk.topk_indicators, (4,), {"method": "perturbed", "noise_samples": z, "temperature": 0.3}),
        (smoothed_kth_value, (4,), {"noise_samples": z, "temperature": 0.3}),
        (softtopk.relaxed_subset, (4,), {"gumbel": z[0], "temperature": 0.3}),
    ]
    for fn, args, kw in cases:
        (yc, gc), (yg, gg) = both(fn, x, *args, **kw)
        torch.testing.assert_close(yg, yc, atol=1e-9, rtol=0)
        torch.testing.assert_close(gg, gc, atol=1e-9, rtol=0)
    target = torch.zeros(3, n, dtype=torch.float64)
    target[:, :4] = 1.0
    (yc, gc), (yg, gg) = both(fenchel_young_topk_loss, x, target, noise_samples=z, reduction="none")
    torch.testing.assert_close(yg, yc, atol=1e-9, rtol=0)
    torch.testing.assert_close(gg, gc, atol=1e-9, rtol=0)


def test_generator_on_cuda_replays_its_draws():
    x = torch.randn(2, 300, device="cuda", requires_grad=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    y = softtopk.topk_mask(x, 5, method="perturbed", generator=gen, num_samples=20)
    y.backward(torch.ones_like(y))
    z = torch.randn(20, 2, 300, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    x2 = x.detach().clone().requires_grad_()
    y2 = softtopk.topk_mask(x2, 5, method="perturbed", noise_samples=z)
    y2.backward(torch.ones_like(y2))
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("method", ["soft", "neuralsort", "softsort", "odd_even", "bitonic"])
def test_indicators_match_cpu(method):
    x = torch.randn(3, 40, dtype=torch.float64)
    (yc, gc), (yg, gg) = both(softtopk.topk_indicators, x, 5, method=method, temperature=0.5)
    torch.testing.assert_close(yg, yc, atol=1e-9, rtol=0)
    torch.testing.assert_close(gg, gc, atol=1e-8, rtol=0)

"""Documented results at the edges: k = 0, k = n, ties, constant rows, -inf, +inf, NaN, scale."""

from __future__ import annotations

import math

import pytest
import torch

import softtopk

SOFT = [("sparse", 2.0), ("sparse", 4.0 / 3.0), ("entropic", 2.0), ("lapsum", 2.0)]
ALL = SOFT + [("hard", 2.0)]


def mask(x, k, method, p, **kw):
    return softtopk.topk_mask(x, k, method=method, p=p, **kw)


@pytest.mark.parametrize("method,p", ALL)
@pytest.mark.parametrize("n", [1, 5, 300, 5000])
def test_k_zero_and_k_n(method, p, n):
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.equal(mask(x, 0, method, p), torch.zeros_like(x))
    assert torch.equal(mask(x, n, method, p), torch.ones_like(x))


@pytest.mark.parametrize("method,p", SOFT)
def test_constant_rows_split_the_budget_equally(method, p):
    x = torch.full((2, 8), 3.0, dtype=torch.float64)
    torch.testing.assert_close(mask(x, 3, method, p), torch.full_like(x, 3 / 8))


@pytest.mark.parametrize("method,p", SOFT)
def test_ties_get_equal_mass(method, p):
    x = torch.tensor([[0.0, 0.0, -5.0, 5.0, 0.0]], dtype=torch.float64)
    y = mask(x, 2, method, p, temperature=0.05)
    torch.testing.assert_close(y[0, [0, 1, 4]], y[0, [1, 4, 0]])


@pytest.mark.parametrize("method,p", ALL)
@pytest.mark.parametrize("n", [6, 600])
def test_minus_inf_is_padding(method, p, n):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, n, dtype=torch.float64, generator=gen)
    padded = torch.cat([x, torch.full((2, 7), -math.inf, dtype=torch.float64)], -1)
    y = mask(x, 3.0, method, p, temperature=0.2)
    yp = mask(padded, 3.0, method, p, temperature=0.2)
    torch.testing.assert_close(yp[:, :n], y, atol=1e-12, rtol=0)
    assert torch.equal(yp[:, n:], torch.zeros(2, 7, dtype=torch.float64))


@pytest.mark.parametrize("method,p", ALL)
def test_fewer_finite_entries_than_k_get_one(method, p):
    x = torch.tensor([[1.0, -math.inf, 0.5, -math.inf, -math.inf], [-math.inf] * 5], dtype=torch.float64)
    y = mask(x, 3, method, p)
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0] * 5], dtype=torch.float64))


@pytest.mark.parametrize("method,p", SOFT)
def test_plus_inf_entries(method, p):
    x = torch.tensor([[math.inf, 0.0, math.inf, 1.0, math.inf]], dtype=torch.float64)
    torch.testing.assert_close(
        mask(x, 2, method, p), torch.tensor([[2 / 3, 0, 2 / 3, 0, 2 / 3]], dtype=torch.float64)
    )
    y = mask(x, 3.5, method, p, temperature=0.1)
    assert torch.equal(y[0, [0, 2, 4]], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(y.sum(), torch.tensor(3.5, dtype=torch.float64))


@pytest.mark.parametrize("method,p", ALL)
@pytest.mark.parametrize("n", [5, 700])
def test_nan_is_confined_to_its_row(method, p, n):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen)
    clean = mask(x, 2, method, p)
    x[1, n // 2] = math.nan
    xr = x.clone().requires_grad_()
    y = mask(xr, 2, method, p)
    assert torch.isnan(y[1]).all()
    torch.testing.assert_close(y[[0, 2]], clean[[0, 2]])
    (g,) = torch.autograd.grad((y[[0, 2]]).sum() + 0 * y[1].nan_to_num().sum(), xr)
    assert torch.isfinite(g[[0, 2]]).all()
    if method != "hard":  # (the hard mask's gradient is zero everywhere)
        assert torch.isnan(g[1]).all()  # a NaN row's gradient is NaN, whatever its cotangent


@pytest.mark.parametrize("method,p", SOFT)
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_huge_and_tiny_scales(method, p, scale):
    """y(c x; c t) = y(x; t): the temperature carries the units of x."""
    x = torch.randn(2, 50, dtype=torch.float64)
    y = mask(x, 4.5, method, p, temperature=0.3)
    ys = mask(x * scale, 4.5, method, p, temperature=0.3 * scale)
    torch.testing.assert_close(ys, y, atol=1e-9, rtol=0)


@pytest.mark.parametrize("method,p", SOFT)
def test_shift_invariance(method, p):
    x = torch.randn(2, 50, dtype=torch.float64)
    torch.testing.assert_close(mask(x + 1e3, 4.5, method, p), mask(x, 4.5, method, p), atol=1e-9, rtol=0)


@pytest.mark.parametrize("method,p", ALL)
def test_empty_dimensions(method, p):
    assert mask(torch.zeros(3, 0), 0, method, p).shape == (3, 0)
    assert mask(torch.zeros(0, 5), 2, method, p).shape == (0, 5)
    assert mask(torch.zeros(2, 0, 5), 2, method, p).shape == (2, 0, 5)


EMPTY_OPS = {
    "topk_mask": lambda x, k: softtopk.topk_mask(x, k),
    "entropic": lambda x, k: softtopk.topk_mask(x, k, method="entropic"),
    "neuralsort": lambda x, k: softtopk.permutation_topk_mask(x, k),
    "subset": lambda x, k: softtopk.relaxed_subset(x, k, generator=torch.Generator().manual_seed(0)),
    "sinkhorn": lambda x, k: softtopk.soft_sinkhorn_mask(x, k),
    "magnitude": lambda x, k: softtopk.topk_mag(x, 0),
}


@pytest.mark.parametrize("name", list(EMPTY_OPS))
@pytest.mark.parametrize("shape", [(3, 0), (0, 5)])
def test_empty_dimensions_keep_the_graph(name, shape):
    """An empty result stays in the graph: backward gives x (and a k tensor) gradients."""
    x = torch.zeros(shape, requires_grad=True)
    k = torch.zeros(shape[0], requires_grad=name not in ("magnitude", "sinkhorn"))  # no k gradient there
    y = EMPTY_OPS[name](x, k)
    assert y.shape == shape and y.requires_grad
    (y.sum() + 0.0).backward()
    assert x.grad is not None and x.grad.shape == shape
    if k.requires_grad:
        assert k.grad is not None and (k.grad == 0).all()


@pytest.mark.parametrize("method,p", ALL)
def test_per_row_k_shapes(method, p):
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    k = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    y = mask(x, k, method, p)
    torch.testing.assert_close(y.sum(-1), k)
    torch.testing.assert_close(mask(x, k.unsqueeze(-1), method, p), y)  # keepdim form
    torch.testing.assert_close(
        mask(x, torch.tensor(2.0), method, p).sum(-1), torch.full((2, 3), 2.0, dtype=torch.float64)
    )
    torch.testing.assert_close(mask(x, torch.tensor([1.0, 2.0, 3.0]), method, p).sum(-1), k[0].expand(2, 3))
    # Along dim=1 the batch shape is (2, 10).
    k1 = torch.randint(0, 4, (2, 10)).to(torch.float64)
    torch.testing.assert_close(mask(x, k1, method, p, dim=1).sum(1), k1)


def test_k_as_integer_tensor_and_python_int():
    x = torch.randn(4, 9)
    torch.testing.assert_close(
        softtopk.topk_mask(x, torch.tensor([1, 2, 3, 4])).sum(-1), torch.tensor([1.0, 2.0, 3.0, 4.0])
    )
    torch.testing.assert_close(softtopk.topk_mask(x, 3).sum(-1), torch.full((4,), 3.0))


@pytest.mark.parametrize("method,p", SOFT)
def test_float64_beyond_the_solver_range_is_refused(method, p):
    # x / t overflowed float64: the largest entry got 0 (p = 4/3 at 1.8e308, t = 0.1).
    x = torch.tensor([[1.7976931348623157e308, 8.988465674311579e307, -5.99e307]], dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 range"):
        mask(x, 1, method, p, temperature=0.1)

"""topk_indicators: the (k, n) API shared by every method (shapes, dims, edges, errors)."""

from __future__ import annotations

import math

import pytest
import torch

import softtopk

METHODS = ["soft", "perturbed", "neuralsort", "softsort", "odd_even", "bitonic"]


def ind(x, k, method, **kw):
    if method == "perturbed":
        kw.setdefault("generator", torch.Generator().manual_seed(0))
    return softtopk.topk_indicators(x, k, method=method, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_shape_and_dim(method):
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    y = ind(x, 4, method, dim=1, temperature=0.3)
    assert y.shape == (2, 4, 7, 3) and y.dtype == torch.float64
    ref = ind(x.movedim(1, -1), 4, method, temperature=0.3)  # (2, 3, 4, 7)
    torch.testing.assert_close(y, ref.permute(0, 2, 3, 1))
    torch.testing.assert_close(y.sum(2), torch.ones(2, 4, 3, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(method, dtype):
    x = torch.randn(3, 12).to(dtype)
    y = ind(x, 3, method, temperature=0.5)
    assert y.dtype == dtype
    ref = ind(x.float(), 3, method, temperature=0.5)
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_gather_use_and_hard_limit(method):
    """Y @ x gathers the k largest values in decreasing order as t -> 0."""
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0, 5.0, 4.0]], dtype=torch.float64)
    t = 0.01 if method == "soft" else 1e-4
    kw = {"max_iter": 20_000, "tol": 1e-8} if method == "soft" else {}
    y = ind(x, 3, method, temperature=t, **kw)
    torch.testing.assert_close(
        y @ x[0], torch.tensor([[5.0, 4.0, 3.0]], dtype=torch.float64), atol=0.05, rtol=0
    )
    torch.testing.assert_close(y.argmax(-1), x.topk(3).indices)


@pytest.mark.parametrize("method", METHODS)
def test_edges(method):
    x = torch.tensor(
        [
            [1.0, 2.0, 0.0, -1.0],
            [1.0, math.nan, 0.0, 2.0],
            [1.0, math.inf, 0.0, 2.0],
            [1.0, -math.inf, -math.inf, 2.0],
        ],
        dtype=torch.float64,
    )
    y = ind(x, 3, method, temperature=0.3)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isfinite(y[2]).all()
    # +inf takes the first row; the other rows are the indicators of the rest with k - 1.
    torch.testing.assert_close(y[2, 0], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    rest = torch.tensor([[1.0, -math.inf, 0.0, 2.0]], dtype=torch.float64)
    if method != "perturbed":  # another call draws other noise
        torch.testing.assert_close(y[2, 1:], ind(rest, 2, method, temperature=0.3)[0])
    torch.testing.assert_close(y[2, 1:].sum(-1), torch.ones(2, dtype=torch.float64))
    assert (y[3, 2] == 0).all() and (y[3, :, 1:3] == 0).all()  # two entries: the third row is empty
    torch.testing.assert_close(y[3, :2].sum(-1), torch.ones(2, dtype=torch.float64))
    assert ind(x, 0, method).shape == (4, 0, 4)
    assert ind(torch.zeros(0, 5), 2, method).shape == (0, 2, 5)


def test_validation():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 5\], got 6"):
        softtopk.topk_indicators(x, 6)
    with pytest.raises(TypeError, match="k must be an int, got float 2.5"):
        softtopk.topk_indicators(x, 2.5)
    with pytest.raises(TypeError, match="k must be an int for topk_indicators"):
        softtopk.topk_indicators(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="max_iter applies to method='soft' only"):
        softtopk.topk_indicators(x, 2, method="perturbed", max_iter=5)
    with pytest.raises(ValueError, match="num_samples applies to method='perturbed' only"):
        softtopk.topk_indicators(x, 2, method="soft", num_samples=5)
    with pytest.raises(ValueError, match="power applies to the permutation methods only"):
        softtopk.topk_indicators(x, 2, method="soft", power=2.0)
    with pytest.raises(ValueError, match="backward must be one of 'implicit', 'unrolled'; got 'autograd'"):
        softtopk.topk_indicators(x, 2, backward="autograd")
    with pytest.raises(ValueError, match="method must be one of"):
        softtopk.topk_indicators(x, 2, method="sinkhorn")


def test_small_temperature_float32_rows_sum_to_one_and_do_not_depend_on_the_batch():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    y = softtopk.topk_indicators(x, 3, temperature=1e-8)
    torch.testing.assert_close(y.sum(-1), torch.ones(3, 3))
    alone = softtopk.topk_indicators(x[1:2], 3, temperature=1e-8)
    torch.testing.assert_close(y[1:2], alone, rtol=0, atol=0)
    torch.testing.assert_close(y.argmax(-1), x.topk(3).indices)


def test_empty_rows():
    # A length-0 dim: reshape(-1, 0) was ambiguous (RuntimeError).
    assert softtopk.topk_indicators(torch.zeros(1, 0), 0).shape == (1, 0, 0)
    assert softtopk.topk_indicators(torch.zeros(3, 0, 2), 0, dim=1).shape == (3, 0, 0, 2)

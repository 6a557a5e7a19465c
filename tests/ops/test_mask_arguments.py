"""Bad arguments raise ValueError/TypeError naming the argument and the value received."""

from __future__ import annotations

import math

import pytest
import torch

import softtopk


@pytest.fixture
def x():
    return torch.randn(3, 6)


@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, None])
def test_x_must_be_a_tensor(bad):
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got (list|float|NoneType)"):
        softtopk.topk_mask(bad, 1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_x_must_be_floating(dtype):
    with pytest.raises(TypeError, match=rf"x must have a floating dtype.*got {dtype}"):
        softtopk.topk_mask(torch.zeros(3, dtype=dtype), 1)
    with pytest.raises(TypeError, match=rf"x must have a floating dtype.*got {dtype}"):
        softtopk.topk_mag(torch.zeros(3, dtype=dtype), 1)


def test_x_zero_dim():
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        softtopk.topk_mask(torch.tensor(1.0), 1)


@pytest.mark.parametrize("k", [-1, 7, 6.5, math.nan, math.inf])
def test_k_out_of_range(x, k):
    with pytest.raises(ValueError, match=rf"k must lie in \[0, n\] = \[0, 6\].*got {k}"):
        softtopk.topk_mask(x, k)


@pytest.mark.parametrize("k", ["2", True, [1, 2]])
def test_k_wrong_type(x, k):
    with pytest.raises(TypeError, match="k must be a real number"):
        softtopk.topk_mask(x, k)


def test_k_tensor_out_of_range(x):
    with pytest.raises(ValueError, match=r"k must lie in \[0, n\] = \[0, 6\].*got values in \[-1.0, 2.0\]"):
        softtopk.topk_mask(x, torch.tensor([-1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"got values in \[0.0, 9.0\]"):
        softtopk.topk_mask(x, torch.tensor([0.0, 9.0, 1.0]))


def test_k_tensor_wrong_shape(x):
    with pytest.raises(ValueError, match=r"broadcastable to the batch shape \(3,\).*got shape \(4,\)"):
        softtopk.topk_mask(x, torch.ones(4))
    with pytest.raises(ValueError, match=r"got shape \(3, 2\)"):
        softtopk.topk_mask(x, torch.ones(3, 2))


def test_k_bool_tensor(x):
    with pytest.raises(
        TypeError, match="k must be a real number or a real tensor, got a tensor of torch.bool"
    ):
        softtopk.topk_mask(x, torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("t", [0.0, -1.0, math.nan, math.inf])
def test_temperature_positive(x, t):
    with pytest.raises(ValueError, match=rf"temperature must be a positive finite number, got {t}"):
        softtopk.topk_mask(x, 2, temperature=t)
    with pytest.raises(ValueError, match=rf"temperature must be a positive finite number, got {t}"):
        softtopk.topk_mag(x, 2, temperature=t)


@pytest.mark.parametrize("t", ["0.1", None, True])
def test_temperature_type(x, t):
    with pytest.raises(TypeError, match="temperature must be a positive number"):
        softtopk.topk_mask(x, 2, temperature=t)


@pytest.mark.parametrize("p", [1.0, 0.5, 2.5, 3.0, math.nan])
def test_p_range(x, p):
    with pytest.raises(ValueError, match=rf"p must be in \(1, 2\], got {p}"):
        softtopk.topk_mask(x, 2, p=p)


def test_p_only_for_sparse(x):
    with pytest.raises(
        ValueError, match="p applies to method='sparse' only, got p=1.5 with method='entropic'"
    ):
        softtopk.topk_mask(x, 2, method="entropic", p=1.5)


@pytest.mark.parametrize("dim", [2, -3, 5])
def test_dim_out_of_range(x, dim):
    with pytest.raises(IndexError, match=rf"expected a dim in \[-2, 1\] for a 2-d input, got {dim}"):
        softtopk.topk_mask(x, 2, dim=dim)


@pytest.mark.parametrize("dim", [1.0, "0", None])
def test_dim_type(x, dim):
    with pytest.raises(TypeError, match="dim must be an int"):
        softtopk.topk_mask(x, 2, dim=dim)


def test_unknown_method_and_solver(x):
    with pytest.raises(ValueError, match="method must be one of .*'sparse'.*got 'sprase'"):
        softtopk.topk_mask(x, 2, method="sprase")
    with pytest.raises(ValueError, match="solver must be one of .*got 'sort'"):
        softtopk.topk_mask(x, 2, method="entropic", solver="sort")
    with pytest.raises(ValueError, match="solver='sort' needs p = 2"):
        softtopk.topk_mask(x, 2, p=1.5, solver="sort")


def test_topk_mag_arguments(x):
    with pytest.raises(ValueError, match=r"k must be integer-valued for topk_mag, got 2.5"):
        softtopk.topk_mag(x, 2.5)
    with pytest.raises(ValueError, match=r"topk_mag implements p = 2 and p = 4/3, got p=1.5"):
        softtopk.topk_mag(x, 2, p=1.5)
    with pytest.raises(TypeError, match="debias must be a bool, got int 1"):
        softtopk.topk_mag(x, 2, debias=1)
    with pytest.raises(ValueError, match="not differentiable in k"):
        softtopk.topk_mag(x, torch.tensor(2.0, requires_grad=True))


@pytest.mark.parametrize("method", ["sparse", "entropic", "lapsum", "hard", "dftopk"])
def test_largest_false_selects_the_smallest(method):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    y = softtopk.topk_mask(x, 2.5, method=method, largest=False)
    z = softtopk.topk_mask(-x, 2.5, method=method)
    torch.testing.assert_close(y, z)
    w = torch.randn_like(y)
    (gy,) = torch.autograd.grad((y * w).sum(), x)
    (gz,) = torch.autograd.grad((z * w).sum(), x)
    torch.testing.assert_close(gy, gz)
    with pytest.raises(TypeError, match="largest"):
        softtopk.topk_mask(x, 2, largest=1)

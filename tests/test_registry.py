"""One conformance suite for every operator of the registry (DESIGN 4).

Adding an operator to ``softtopk.registry.OPERATORS`` runs it through all of these:
shape/dtype/device, range and sum (rows and columns of an indicators operator),
permutation equivariance, batch == loop, any dim,
-inf padding, hard limit t -> 0, uniform limit t -> inf, fp16/bf16 vs fp32,
torch.compile == eager, torch.func.vmap == loop, float64 gradcheck, module round trip.
"""

from __future__ import annotations

import math

import pytest
import torch

from softtopk.registry import OPERATORS

NAMES = list(OPERATORS)
MASKS = [name for name in NAMES if OPERATORS[name].kind == "mask"]
# Operators whose output is a (k, n) soft assignment per row (k an int).
INDICATORS = [name for name in NAMES if OPERATORS[name].kind == "indicators"]
# Stochastic operators run on their seeded view (the same draws on every call), but the
# noise is tied to positions and to the batch shape: these properties hold for them only
# in distribution.
DETERMINISTIC = [name for name in NAMES if not OPERATORS[name].stochastic]


def run(name, x, k, dim=-1, **kw):
    return OPERATORS[name].seeded()(x, k, dim, **kw)


def hard_reference(name, x, k):
    """What t -> 0 must give on rows x (B, n) with a positive k-th gap."""
    kind = OPERATORS[name].kind
    if kind == "indicators":
        return torch.nn.functional.one_hot(x.topk(k, dim=-1).indices, x.shape[-1]).to(x.dtype)
    if kind == "mask":
        return torch.zeros_like(x).scatter_(-1, x.topk(k, dim=-1).indices, 1.0)
    return torch.zeros_like(x).scatter_(-1, x.abs().topk(k, dim=-1).indices, 1.0) * x


def gapped(rows: int, n: int, gap: float = 1.0, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Rows of distinct values at least ``gap`` apart, in random order."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(n, dtype=dtype) * gap
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(rows)])
    return base[perm] + 0.1 * gap * torch.rand(rows, n, generator=gen, dtype=dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "shape,dim", [((7,), 0), ((3, 9), -1), ((3, 9), 0), ((2, 5, 4), 1), ((2, 3, 4, 6), 2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_any_dim(name, shape, dim, dtype):
    x = torch.randn(shape, dtype=dtype)
    y = run(name, x, 2, dim=dim)
    d = dim % x.dim()
    if OPERATORS[name].kind == "indicators":
        # The size n at dim becomes (k, n).
        assert y.shape == x.shape[:d] + (2,) + x.shape[d:]
        y = y.movedim((d, d + 1), (-2, -1))
    else:
        assert y.shape == x.shape
        y = y.movedim(d, -1)
    assert y.dtype == dtype and y.device == x.device
    # Same result as moving dim last by hand.
    torch.testing.assert_close(y, run(name, x.movedim(dim, -1), 2))


@pytest.mark.parametrize("name", MASKS)
def test_range_and_sum(name):
    x = torch.randn(16, 40, dtype=torch.float64)
    for k in (1, 5, 17.5):
        y = run(name, x, k)
        assert (y >= 0).all()
        if OPERATORS[name].bounded:
            assert (y <= 1).all()
        if OPERATORS[name].sums_to_k:
            torch.testing.assert_close(y.sum(-1), torch.full((16,), float(k), dtype=torch.float64))


@pytest.mark.parametrize("name", INDICATORS)
def test_indicator_rows_and_columns(name):
    """Every row of the (k, n) assignment sums to 1; every column to at most 1."""
    x = torch.randn(16, 40, dtype=torch.float64)
    for k in (1, 5, 17):
        y = run(name, x, k)
        assert y.shape == (16, k, 40) and (y >= 0).all()
        if OPERATORS[name].sums_to_k:
            torch.testing.assert_close(y.sum(-1), torch.ones(16, k, dtype=torch.float64))
        if OPERATORS[name].bounded:
            assert (y.sum(-2) <= 1 + 1e-9).all()


@pytest.mark.parametrize("name", [n for n in DETERMINISTIC if OPERATORS[n].equivariant])
def test_permutation_equivariance(name):
    x = gapped(4, 30, gap=0.05)
    perm = torch.randperm(30)
    torch.testing.assert_close(run(name, x[:, perm], 6), run(name, x, 6)[..., perm])


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("n", [12, pytest.param(3000, marks=pytest.mark.slow)])
def test_batch_equals_loop(name, n):
    x = torch.randn(5, n, dtype=torch.float64)
    k = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    if OPERATORS[name].kind == "indicators":
        k = torch.full((5,), 3.0, dtype=torch.float64)  # one k: it sets the output's size
        batched = run(name, x, 3)
    else:
        batched = run(name, x, k)
    loop = torch.stack([run(name, x[i], int(k[i])) for i in range(5)])
    torch.testing.assert_close(batched, loop)


@pytest.mark.parametrize(
    "name", [n for n in MASKS + INDICATORS if n in DETERMINISTIC and OPERATORS[n].exact_padding]
)
def test_minus_inf_padding(name):
    x = torch.randn(3, 20, dtype=torch.float64)
    padded = torch.cat([x, torch.full((3, 5), -math.inf, dtype=torch.float64)], -1).requires_grad_()
    y = run(name, padded, 4)
    torch.testing.assert_close(y[..., :20], run(name, x, 4))
    assert (y[..., 20:] == 0).all()
    if OPERATORS[name].name != "hard":
        (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), padded)
        assert (g[:, 20:] == 0).all()


@pytest.mark.parametrize("name", [n for n in NAMES if OPERATORS[n].hard_limit])
def test_hard_limit(name):
    """t -> 0 gives the torch.topk mask (x * topkmask(|x|), one-hot rows of the top k)."""
    x = gapped(6, 25, gap=1.0)
    x = x - x.mean(-1, keepdim=True)
    y = run(name, x, 5, temperature=1e-4)
    torch.testing.assert_close(y, hard_reference(name, x, 5), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name", [n for n in MASKS + INDICATORS if n != "hard" and OPERATORS[n].uniform_limit]
)
def test_uniform_limit(name):
    """t -> inf spreads the budget evenly: y -> k/n (1/n for each row of indicators)."""
    x = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # The distance to k/n shrinks like n max|x| / t (NeuralSort's row scores (n + 1 - 2i) x
    # are the widest): t = 1e7 puts every operator within 1e-5.
    y = run(name, x, 4, temperature=1e7)
    level = 0.1 if OPERATORS[name].kind == "indicators" else 0.4
    torch.testing.assert_close(y, torch.full_like(y, level), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float32(name, dtype):
    x = torch.randn(4, 64).to(dtype)
    y = run(name, x, 8, temperature=0.5)
    assert y.dtype == dtype
    ref = run(name, x.float(), 8, temperature=0.5)
    scale = x.float().abs().max().item() if OPERATORS[name].kind == "magnitude" else 1.0
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(y.float(), ref, atol=tol * scale, rtol=0)
    xr = x.clone().requires_grad_()
    run(name, xr, 8, temperature=0.5).float().pow(2).sum().backward()
    assert xr.grad.dtype == dtype and torch.isfinite(xr.grad.float()).all()


@pytest.mark.parametrize("name", [n for n in NAMES if OPERATORS[n].exact_gradient])
def test_gradcheck(name):
    x = torch.randn(2, 15, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: run(name, a, 4, temperature=0.5), (x,))


@pytest.mark.parametrize("name", [n for n in NAMES if OPERATORS[n].k_grad])
def test_gradcheck_in_k(name):
    x = torch.randn(2, 15, dtype=torch.float64)
    k = torch.tensor([3.5, 6.25], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda kk: run(name, x, kk, temperature=0.5), (k,))


@pytest.mark.parametrize("name", [n for n in NAMES if OPERATORS[n].vmaps])
def test_vmap_equals_loop(name):
    x = torch.randn(4, 20, dtype=torch.float64)
    vm = torch.func.vmap(lambda row: run(name, row, 3))(x)
    torch.testing.assert_close(vm, torch.stack([run(name, row, 3) for row in x]))
    grads = torch.func.vmap(torch.func.grad(lambda row: run(name, row, 3).pow(2).sum()))(x)
    xr = x.clone().requires_grad_()
    run(name, xr, 3).pow(2).sum().backward()
    torch.testing.assert_close(grads, xr.grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if OPERATORS[n].compiles])
def test_compile_equals_eager(name):
    torch._dynamo.reset()
    x = torch.randn(3, 40)
    compiled = torch.compile(lambda a: run(name, a, 5, temperature=0.3), fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = run(name, xe, 5, temperature=0.3), compiled(xc)
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=0)
    v = torch.randn_like(ye)  # the output's shape ((..., k, n) for the indicators)
    ye.backward(v)
    yc.backward(v)
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [n for n in NAMES if OPERATORS[n].stochastic])
def test_stochastic_operators_draw_fresh_noise_unless_seeded(name):
    op, x = OPERATORS[name], torch.randn(3, 20)
    torch.manual_seed(1)
    a = op(x, 4)
    torch.manual_seed(2)
    b = op(x, 4)
    assert not torch.equal(a, b)
    torch.testing.assert_close(op.seeded(5)(x, 4), op.seeded(5)(x, 4), rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.testing.assert_close(op(x, 4, generator=g1), op(x, 4, generator=g2), rtol=0, atol=0)

"""soft_rank, soft_sort and permutahedron_projection against independent oracles and torchsort.

* Blondel et al.'s reduction evaluated by scipy (tests/reference/oracles), and a generic
  QP over the permutahedron's 2^n facets for tiny n;
* torchsort 0.1.10 (peer): outputs and gradients, l2 and kl, strengths 0.1, 1, 10, to
  1e-6 in float64; and torchsort's NaN at strength 1e-4 where ours stays finite;
* gradcheck in float64; gradients at ties equal central finite differences;
* limits, any dim and rank, dtypes, the fused CPU route against the tensor-op route.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import softtopk
from softtopk import _backend
from softtopk.isotonic import _pav_cpu as _pav
from softtopk.isotonic._permutahedron import _fused_buffers
from tests.conftest import cuda_available
from tests.reference import oracles

STRENGTHS = (0.1, 1.0, 10.0)


def rows_with_ties(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    x = rng.normal(size=(rows, n))
    tied = rng.random(rows) < 0.3
    x[tied] = np.round(x[tied] * 2) / 2
    return x


@pytest.fixture(params=["fused", "tensor-ops"])
def route(request, monkeypatch):
    """The fused numba route (CPU default) and the tensor-op route (CUDA, no numba)."""
    if request.param == "tensor-ops":
        monkeypatch.setenv("SOFTTOPK_BACKEND", "torch")
    return request.param


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("descending", [False, True])
def test_soft_rank_equals_oracle(rng, route, reg, descending):
    x = rows_with_ties(rng, 200, 23)
    for eps in (0.01, *STRENGTHS, 100.0):
        got = softtopk.soft_rank(
            torch.from_numpy(x), temperature=eps, regularization=reg, descending=descending
        )
        ref = np.stack([oracles.soft_rank(r, eps, reg, descending) for r in x])
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("descending", [False, True])
def test_soft_sort_equals_oracle(rng, route, reg, descending):
    x = rows_with_ties(rng, 200, 23)
    for eps in (0.01, *STRENGTHS, 100.0):
        got = softtopk.soft_sort(
            torch.from_numpy(x), temperature=eps, regularization=reg, descending=descending
        )
        ref = np.stack([oracles.soft_sort(r, eps, reg, descending) for r in x])
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_projection_equals_oracle(rng, route, reg):
    for _ in range(50):
        n = int(rng.integers(1, 30))
        z = rng.normal(size=n) * rng.choice([0.1, 1.0, 10.0])
        w = rng.uniform(0.1, 3.0, size=n)
        got = softtopk.permutahedron_projection(torch.from_numpy(z), torch.from_numpy(w), regularization=reg)
        np.testing.assert_allclose(got.numpy(), oracles.permutahedron_projection(z, w, reg), atol=1e-10)


def test_projection_equals_generic_qp(rng):
    for _ in range(12):
        n = int(rng.integers(2, 7))
        z = rng.normal(size=n) * 2.0
        w = rng.uniform(-1.0, 3.0, size=n)
        got = softtopk.permutahedron_projection(torch.from_numpy(z), torch.from_numpy(w))
        np.testing.assert_allclose(got.numpy(), oracles.permutahedron_projection_qp(z, w), atol=1e-6)


def test_projection_per_row_w_and_dim(rng):
    z = torch.from_numpy(rng.normal(size=(4, 6, 3)))
    w = torch.from_numpy(rng.uniform(0.1, 2.0, size=(4, 6, 3)))
    got = softtopk.permutahedron_projection(z, w, dim=1, regularization="kl")
    for a in range(4):
        for c in range(3):
            ref = oracles.permutahedron_projection(z[a, :, c].numpy(), w[a, :, c].numpy(), "kl")
            np.testing.assert_allclose(got[a, :, c].numpy(), ref, atol=1e-10)
    # a (n,) vector w applies to every row
    w1 = torch.tensor([3.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    got = softtopk.permutahedron_projection(z, w1, dim=1)
    np.testing.assert_allclose(
        got[1, :, 2].numpy(), oracles.permutahedron_projection(z[1, :, 2].numpy(), w1.numpy())
    )


# ------------------------------------------------------------------------ torchsort (peer)


@pytest.mark.peer
@pytest.mark.parametrize("op", ["soft_rank", "soft_sort"])
@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("eps", STRENGTHS)
def test_equals_torchsort_outputs_and_gradients(rng, route, op, reg, eps):
    torchsort = pytest.importorskip("torchsort")
    x = torch.from_numpy(rows_with_ties(rng, 128, 40))
    ours_x = x.clone().requires_grad_()
    theirs_x = x.clone().requires_grad_()
    ours = getattr(softtopk, op)(ours_x, temperature=eps, regularization=reg)
    theirs = getattr(torchsort, op)(theirs_x, regularization=reg, regularization_strength=eps)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    v = torch.randn_like(ours)
    ours.backward(v)
    theirs.backward(v)
    # Rows with exact ties (rounded to 0.5) sit on kinks of the operators: a tie in x (soft
    # sort), or two adjacent blocks of the isotonic problem with exactly equal values (on
    # the lattice of rho / eps - x/eps), where we split (strict pooling) and torchsort
    # pools; the one-sided derivatives differ there, so any choice is a valid one. The
    # gradients must agree on the rows away from kinks (outputs agree on every row).
    generic = torch.tensor([torch.unique(r).numel() == r.numel() for r in x])
    assert 0 < int(generic.sum()) < x.shape[0]
    torch.testing.assert_close(ours_x.grad[generic], theirs_x.grad[generic], atol=1e-6, rtol=0)
    # descending = torchsort on -x (rank) / minus torchsort on -x (sort)
    down = getattr(softtopk, op)(x, temperature=eps, regularization=reg, descending=True)
    ref = getattr(torchsort, op)(-x, regularization=reg, regularization_strength=eps)
    torch.testing.assert_close(down, ref if op == "soft_rank" else -ref, atol=1e-6, rtol=0)


@pytest.mark.peer
def test_kl_small_temperature_finite_where_torchsort_is_nan(rng):
    torchsort = pytest.importorskip("torchsort")
    x = torch.from_numpy(rng.normal(size=(8, 50)))
    theirs_x = x.clone().requires_grad_()
    torchsort.soft_rank(theirs_x, regularization="kl", regularization_strength=1e-4).sum().backward()
    assert torch.isnan(theirs_x.grad).any()  # torchsort issue #63: exp without max shift
    ours_x = x.clone().requires_grad_()
    r = softtopk.soft_rank(ours_x, temperature=1e-4, regularization="kl")
    r.backward(torch.randn_like(r))
    assert torch.isfinite(r).all() and torch.isfinite(ours_x.grad).all()


@pytest.mark.parametrize("op", ["soft_rank", "soft_sort"])
@pytest.mark.slow
def test_kl_small_temperature_is_finite_and_hard(rng, route, op):
    x = torch.from_numpy(rng.normal(size=(8, 50)))
    for dtype in (torch.float64, torch.float32):
        xr = x.to(dtype).detach().clone().requires_grad_()
        y = getattr(softtopk, op)(xr, temperature=1e-4, regularization="kl")
        y.backward(torch.randn_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(xr.grad).all()
        hard = (x.argsort(-1).argsort(-1) + 1.0) if op == "soft_rank" else x.sort(-1).values
        torch.testing.assert_close(
            y.double(), hard.double(), atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=0
        )


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("op", ["soft_rank", "soft_sort"])
@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.slow
def test_gradcheck(route, op, reg, descending):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g).requires_grad_()
    for eps in (0.3, 3.0):
        fn = getattr(softtopk, op)
        assert torch.autograd.gradcheck(
            lambda x: fn(x, temperature=eps, regularization=reg, descending=descending), (x,)
        )


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_projection_gradcheck_in_x_and_w(route, reg):
    g = torch.Generator().manual_seed(8)
    z = torch.randn(2, 6, dtype=torch.float64, generator=g).requires_grad_()
    w = (torch.rand(2, 6, dtype=torch.float64, generator=g) + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z, w: softtopk.permutahedron_projection(z, w, regularization=reg), (z, w)
    )


def central_difference(fn, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    jac = torch.zeros(fn(x).numel(), x.numel(), dtype=x.dtype)
    flat = x.reshape(-1)
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = h
        jac[:, j] = (fn((flat + e).reshape(x.shape)) - fn((flat - e).reshape(x.shape))).reshape(-1) / (2 * h)
    return jac


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("eps", [1e-3, 0.5, 5.0])
def test_soft_rank_gradient_at_ties_equals_finite_differences(route, reg, eps):
    # Exact ties, saturated (eps small: the tied pair pools, everything else is hard) or not.
    x = torch.tensor([0.3, 1.0, 1.0, -2.0, 1.0, 4.0], dtype=torch.float64)

    def fn(x):
        return softtopk.soft_rank(x, temperature=eps, regularization=reg)

    jac = torch.autograd.functional.jacobian(fn, x)
    torch.testing.assert_close(jac, central_difference(fn, x), atol=1e-6, rtol=1e-6)
    if eps == 1e-3:
        # entries not tied with anything are saturated: zero derivative
        assert jac[0].abs().max() == 0 and jac[:, 5].abs().max() == 0


def test_soft_sort_gradient_at_ties_is_symmetric_where_differentiable(route):
    # The sorted outputs at a tie are a kink; their sum is smooth.
    x = torch.tensor([0.3, 1.0, 1.0, -2.0], dtype=torch.float64)

    def fn(x):
        y = softtopk.soft_sort(x, temperature=0.01)
        return torch.stack([y[0], y[1], y[2] + y[3]])

    jac = torch.autograd.functional.jacobian(fn, x)
    torch.testing.assert_close(jac, central_difference(fn, x), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ limits, shapes, dtypes


def test_limits_and_invariants(rng):
    x = torch.from_numpy(rng.normal(size=(20, 30)))
    n = x.shape[-1]
    hard = x.argsort(-1).argsort(-1).double() + 1
    for reg in ("l2", "kl"):
        torch.testing.assert_close(softtopk.soft_rank(x, temperature=1e-6, regularization=reg), hard)
        torch.testing.assert_close(
            softtopk.soft_rank(x, temperature=1e-6, regularization=reg, descending=True), n + 1 - hard
        )
        torch.testing.assert_close(
            softtopk.soft_sort(x, temperature=1e-6, regularization=reg), x.sort(-1).values
        )
        big = softtopk.soft_rank(x, temperature=1e6, regularization=reg)
        torch.testing.assert_close(big, torch.full_like(x, (n + 1) / 2), atol=1e-3, rtol=0)
        r = softtopk.soft_rank(x, temperature=1.0, regularization=reg)
        torch.testing.assert_close(r.sum(-1), torch.full((20,), n * (n + 1) / 2, dtype=x.dtype))
    s = softtopk.soft_sort(x, temperature=1e6)
    torch.testing.assert_close(s, x.mean(-1, keepdim=True).expand_as(x), atol=1e-3, rtol=0)
    s = softtopk.soft_sort(x, temperature=1.0)
    assert (s[:, 1:] >= s[:, :-1]).all()
    torch.testing.assert_close(s.sum(-1), x.sum(-1))


def test_sorted_soft_topk(rng):
    x = torch.from_numpy(rng.normal(size=(5, 3, 40)))
    full = softtopk.soft_sort(x, dim=-1, temperature=0.5, descending=True)
    top = softtopk.soft_sort(x, dim=-1, temperature=0.5, descending=True, k=4)
    assert top.shape == (5, 3, 4)
    torch.testing.assert_close(top, full[..., :4])
    torch.testing.assert_close(
        softtopk.soft_sort(x, temperature=1e-6, descending=True, k=4), x.topk(4).values
    )
    assert softtopk.soft_sort(x, k=0).shape == (5, 3, 0)


@pytest.mark.parametrize("op", ["soft_rank", "soft_sort"])
def test_any_dim_and_rank_equal_rows(rng, op):
    x = torch.from_numpy(rng.normal(size=(2, 9, 3, 4)))
    fn = getattr(softtopk, op)
    got = fn(x, dim=1, temperature=0.7, regularization="kl")
    ref = fn(x.movedim(1, -1).reshape(-1, 9), temperature=0.7, regularization="kl")
    torch.testing.assert_close(got, ref.reshape(2, 3, 4, 9).movedim(-1, 1))
    one = fn(x[0, :, 0, 0], temperature=0.7, regularization="kl")
    torch.testing.assert_close(one, got[0, :, 0, 0])


@pytest.mark.parametrize("op", ["soft_rank", "soft_sort"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(rng, op, dtype):
    x = torch.from_numpy(rng.normal(size=(6, 20))).to(dtype)
    xr = x.clone().requires_grad_()
    y = getattr(softtopk, op)(xr, temperature=0.5)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert xr.grad.dtype == dtype
    ref = getattr(softtopk, op)(x.double(), temperature=0.5)
    tol = {torch.float16: 2e-2, torch.bfloat16: 0.1, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(y.double(), ref, atol=tol * 20, rtol=tol)


def test_nan_rows_stay_in_their_row():
    x = torch.tensor([[1.0, float("nan"), 0.0], [3.0, 1.0, 2.0], [0.0, float("-inf"), 1.0]])
    for op in (softtopk.soft_rank, softtopk.soft_sort):
        y = op(x, temperature=0.01)
        assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 17, 1000, 4095, 4096, 30_000])
def test_radix_argsort_is_a_stable_sort(rng, dtype, n):
    """The fused route's radix sort equals numpy's stable argsort, special values included."""
    finfo = np.finfo(dtype)
    x = rng.normal(size=n) * rng.choice([1e-3, 1.0, 1e3], size=n)
    tied = rng.random(n) < 0.3
    x[tied] = np.round(x[tied] * 2) / 2
    specials = [0.0, -0.0, finfo.tiny / 4, -finfo.tiny / 4, finfo.max, -finfo.max, finfo.tiny, 1.0, -1.0]
    x[: min(n, len(specials))] = specials[: min(n, len(specials))]
    x = rng.permutation(x).astype(dtype)
    t = torch.from_numpy(x.copy()).unsqueeze(0)
    f = _fused_buffers(t)
    for descending in (False, True):
        perm = np.empty((1, n), dtype=np.int32)
        got = _pav._sorted_row(f.x[0], f.bits[0], f.masks, descending, perm[0])
        # -0.0 sorts before +0.0 here (bit order); numpy treats them as equal: compare values
        # everywhere and the permutation itself with signed zeros made equal.
        key = np.where(x == 0, 0.0, x).astype(np.float64)
        ref = np.argsort(-key if descending else key, kind="stable")
        np.testing.assert_array_equal(got, x[ref].astype(np.float64))
        zero = x[perm[0]] == 0
        np.testing.assert_array_equal(perm[0][~zero], ref[~zero])
        assert sorted(perm[0].tolist()) == list(range(n))


def test_numba_follows_torch_threads():
    """numba's loops use torch's thread count, and the caller's numba setting comes back."""
    before = _pav.numba.get_num_threads()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with _backend.numba_threads():
            assert _pav.numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert _pav.numba.get_num_threads() == before


@pytest.mark.slow
def test_a_call_leaves_torch_threads_alone():
    """numba's OpenMP layer shares torch's pool; its first launch used to reset torch's count."""
    code = (
        "import torch, softtopk; x = torch.randn(8, 300, requires_grad=True); "
        "softtopk.soft_rank(x).sum().backward(); softtopk.isotonic_regression(x.detach()); "
        "print(torch.get_num_threads())"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "1"


def test_dykstra_route_matches(rng):
    x = torch.from_numpy(rng.normal(size=(30, 12)))
    for op in (softtopk.soft_rank, softtopk.soft_sort):
        torch.testing.assert_close(
            op(x, temperature=0.3, solver="dykstra"), op(x, temperature=0.3), atol=1e-10, rtol=0
        )


def test_validation():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        softtopk.soft_rank(x, temperature=0.0)
    with pytest.raises(ValueError, match="regularization must be one of"):
        softtopk.soft_sort(x, regularization="l1")
    with pytest.raises(ValueError, match="k must lie in"):
        softtopk.soft_sort(x, k=5)
    with pytest.raises(TypeError, match="k must be an int"):
        softtopk.soft_sort(x, k=1.5)
    with pytest.raises(TypeError, match="descending must be a bool"):
        softtopk.soft_rank(x, descending="yes")
    with pytest.raises(ValueError, match="dykstra"):
        softtopk.soft_rank(x, regularization="kl", solver="dykstra")
    with pytest.raises(ValueError, match="w must be positive"):
        softtopk.permutahedron_projection(x, torch.zeros(4), regularization="kl")
    with pytest.raises(ValueError, match="w must have shape"):
        softtopk.permutahedron_projection(x, torch.ones(5))


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(rng):
    x = torch.from_numpy(rng.normal(size=(64, 300)))
    for reg in ("l2", "kl"):
        for op in (softtopk.soft_rank, softtopk.soft_sort):
            xc = x.cuda().requires_grad_()
            y = op(xc, temperature=0.5, regularization=reg)
            y.backward(torch.ones_like(y))
            xr = x.clone().requires_grad_()
            ref = op(xr, temperature=0.5, regularization=reg)
            ref.backward(torch.ones_like(ref))
            torch.testing.assert_close(y.cpu(), ref)
            torch.testing.assert_close(xc.grad.cpu(), xr.grad)


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("fn", ["soft_rank", "soft_sort"])
def test_double_backward_equals_two_j_jt_w(route, reg, fn):
    """d/dw ||J^T w||^2 = 2 J J^T w, on the fused numba route and the tensor-op route."""
    op = getattr(softtopk, fn)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    f = lambda a: op(a, temperature=0.7, regularization=reg)  # noqa: E731
    (gz,) = torch.autograd.grad((f(z) * w).sum(), z, create_graph=True)
    (gw,) = torch.autograd.grad((gz**2).sum(), w)
    J = torch.autograd.functional.jacobian(f, z.detach())  # (2, 9, 2, 9), block diagonal
    Jb = torch.stack([J[i, :, i] for i in range(2)])
    expected = 2.0 * torch.einsum("bij,bkj,bk->bi", Jb, Jb, w.detach())
    torch.testing.assert_close(gw, expected)
    assert torch.autograd.gradgradcheck(f, (z,))
    u = torch.randn_like(z)
    _, tangent = torch.func.jvp(f, (z.detach(),), (u,))
    torch.testing.assert_close(tangent, torch.einsum("bij,bj->bi", Jb, u))


@pytest.mark.parametrize("solver", ["auto", "dykstra"])
def test_soft_sort_rows_near_the_float64_limit(solver):
    """L2 soft sort is solved on x / c with t c (c a power of two) where block sums overflow."""
    m = torch.finfo(torch.float64).max
    x = torch.tensor([[m, m, 1e-300], [m, -m, -m], [3.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    y = softtopk.soft_sort(x, solver=solver)
    assert torch.isfinite(y).all(), y
    torch.testing.assert_close(y[0], torch.full((3,), 2 * (m / 3), dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(y[1], torch.full((3,), -(m / 3), dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(y[2], softtopk.soft_sort(x[2:].detach(), solver=solver)[0], rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.ones_like(g))  # sum(y) = sum(x): the block mean passes 1 on

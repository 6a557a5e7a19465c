"""softtopk.isotonic_regression against scipy, its own block Jacobian, and Dykstra against PAV.

* PAV (numba, and the tensor-op rounds used off the CPU) equals
  scipy.optimize.isotonic_regression, weighted, both directions, to 1e-10 in float64 on
  thousands of rows with ties and long pooled blocks; the KL loss equals scipy through an
  exact change of variables (tests/reference/oracles.isotonic_kl).
* Dykstra: certified rows equal PAV to 1e-10; uncertified rows are reported (info) or
  warned about; the iteration counts for large blocks are what they are (printed by
  ``test_dykstra_iterations_grow_with_block_size``).
* Gradients: gradcheck in float64, and the Jacobian equals the closed-form block matrix
  built from the partition the solver reports.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softtopk
from softtopk.isotonic._pav import pav_torch
from softtopk.isotonic._pav_cpu import pav_numba
from tests.reference import oracles


def hard_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Rows that make PAV work: ties, long pooled blocks (trends against the fit), plateaus."""
    kind = rng.integers(0, 6, size=rows)
    base = rng.normal(size=(rows, n))
    out = np.where(kind[:, None] == 0, base, 0.0)
    # a random walk pooled into long blocks in either direction
    out = np.where(kind[:, None] == 1, np.cumsum(base, -1), out)
    out = np.where(kind[:, None] == 2, -np.cumsum(base, -1), out)
    # rounded values: many exact ties
    out = np.where(kind[:, None] == 3, np.round(base * 2.0) / 2.0, out)
    # a strong trend against the fit plus noise: one or few huge blocks
    trend = np.linspace(3.0, -3.0, n)[None, :] * rng.choice([-1.0, 1.0], size=(rows, 1))
    out = np.where(kind[:, None] == 4, trend + 0.3 * base, out)
    # plateaus with ties across blocks
    out = np.where(
        kind[:, None] == 5, np.repeat(np.round(rng.normal(size=(rows, n // 4 + 1))), 4, -1)[:, :n], out
    )
    return out


SIZES = [(600, 2), (600, 7), (400, 33), (200, 300), (20, 3000)]


@pytest.mark.parametrize("rows,n", SIZES)
@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_pav_l2_equals_scipy(rng, rows, n, increasing, weighted):
    y = hard_rows(rng, rows, n)
    w = rng.uniform(0.05, 5.0, size=y.shape) if weighted else None
    wt = None if w is None else torch.from_numpy(w)
    got, info = softtopk.isotonic_regression(
        torch.from_numpy(y), wt, increasing=increasing, solver="pav", return_info=True
    )
    assert info.solver == "pav" and bool(info.converged.all())
    ref = np.stack([oracles.isotonic_l2(y[i], None if w is None else w[i], increasing) for i in range(rows)])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("rows,n", SIZES)
@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.slow
def test_pav_torch_rounds_equal_scipy(rng, rows, n, increasing):
    y = hard_rows(rng, rows, n)
    w = rng.uniform(0.05, 5.0, size=y.shape)
    rows_t = torch.from_numpy(y if not increasing else y[:, ::-1].copy())
    w_t = torch.from_numpy(w if not increasing else w[:, ::-1].copy())
    v, bid, aux, rounds = pav_torch(rows_t, w_t, "l2")
    v = v.numpy() if not increasing else v.numpy()[:, ::-1]
    ref = np.stack([oracles.isotonic_l2(y[i], w[i], increasing) for i in range(rows)])
    np.testing.assert_allclose(v, ref, atol=1e-10, rtol=0)
    assert 1 <= rounds <= n + 1


@pytest.mark.parametrize("rows,n", SIZES)
@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.slow
def test_pav_kl_equals_scipy_change_of_variables(rng, rows, n, increasing):
    y = hard_rows(rng, rows, n)
    y = np.clip(y, -30.0, 30.0)
    w = rng.uniform(0.05, 5.0, size=y.shape)
    got = softtopk.isotonic_regression(
        torch.from_numpy(y), torch.from_numpy(w), increasing=increasing, loss="kl"
    )
    ref = np.stack([oracles.isotonic_kl(y[i], w[i], increasing) for i in range(rows)])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10, rtol=0)
    # The tensor-op rounds on at most 40 rows and 6,000 entries: with KL's looser
    # prefix-statistic bounds they pool fewer runs per round (tens of rounds at n = 300,
    # about 1.5 s per row at n = 3000 on this 2-core CPU).
    m = max(1, min(rows, 40, 6000 // n))
    v, _, _, _ = pav_torch(torch.from_numpy(y[:m]), torch.from_numpy(np.log(w[:m])), "kl")
    ref_dec = np.stack([oracles.isotonic_kl(y[i], w[i], False) for i in range(m)])
    np.testing.assert_allclose(v.numpy(), ref_dec, atol=1e-10, rtol=0)


def test_numba_and_rounds_share_the_partition(rng):
    y = torch.from_numpy(hard_rows(rng, 500, 60))
    y = y + 1e-9 * torch.randn_like(y)  # no exact ties: the finest partition is unique
    for loss in ("l2", "kl"):
        v1, b1, a1 = pav_numba(y, None, loss)
        v2, b2, a2, _ = pav_torch(y, None, loss)
        assert torch.equal(b1, b2)
        torch.testing.assert_close(v1, v2, atol=1e-12, rtol=0)
        torch.testing.assert_close(a1, a2, atol=1e-12, rtol=1e-12)


def test_float32_and_half_inputs(rng):
    y = hard_rows(rng, 200, 50)
    ref = np.stack([oracles.isotonic_l2(y[i]) for i in range(200)])
    for dtype, atol in [(torch.float32, 1e-5), (torch.bfloat16, 0.1), (torch.float16, 2e-2)]:
        x = torch.from_numpy(y).to(dtype)
        got = softtopk.isotonic_regression(x)
        assert got.dtype == dtype
        ref_d = np.stack([oracles.isotonic_l2(r) for r in x.double().numpy()])
        np.testing.assert_allclose(got.double().numpy(), ref_d, atol=atol * max(1, np.abs(ref).max()), rtol=0)


def test_any_dim_equals_rows(rng):
    y = torch.from_numpy(rng.normal(size=(3, 11, 4)))
    w = torch.from_numpy(rng.uniform(0.5, 2, size=(3, 11, 4)))
    got = softtopk.isotonic_regression(y, w, dim=1, increasing=False)
    for a in range(3):
        for c in range(4):
            ref = oracles.isotonic_l2(y[a, :, c].numpy(), w[a, :, c].numpy(), False)
            np.testing.assert_allclose(got[a, :, c].numpy(), ref, atol=1e-12)


def test_nan_and_inf_rows_are_nan_and_stay_in_their_row():
    y = torch.tensor(
        [[1.0, float("nan"), 0.0], [3.0, 1.0, 2.0], [1.0, float("inf"), 0.0]], dtype=torch.float64
    )
    got = softtopk.isotonic_regression(y)
    assert torch.isnan(got[0]).all() and torch.isnan(got[2]).all()
    torch.testing.assert_close(got[1], torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))


# ------------------------------------------------------------------------------ Dykstra


@pytest.mark.parametrize("rows,n", [(300, 7), (200, 40), (50, 300)])
@pytest.mark.slow
def test_dykstra_equals_pav_when_certified(rng, rows, n):
    y = torch.from_numpy(hard_rows(rng, rows, n))
    w = torch.from_numpy(rng.uniform(0.5, 2.0, size=(rows, n)))
    for weights in (None, w):
        got, info = softtopk.isotonic_regression(
            y, weights, increasing=False, solver="dykstra", max_iter=3000, return_info=True
        )
        ref, ref_info = softtopk.isotonic_regression(
            y, weights, increasing=False, solver="pav", return_info=True
        )
        ok = info.converged
        np.testing.assert_allclose(got[ok].numpy(), ref[ok].numpy(), atol=1e-10, rtol=0)
        # Rows whose largest pooled block is small (2 B^2 << max_iter) must certify.
        largest = torch.stack([torch.bincount(b).max() for b in ref_info.blocks])
        assert ok[largest <= 12].all()
        assert ok.any()
        # Uncertified rows really are not exact (the certificate is not pessimistic), and
        # their iteration count is the budget.
        if (~ok).any():
            assert ((got[~ok] - ref[~ok]).abs().amax(-1) > 1e-12).all()
        assert (info.iterations[ok] <= 3000).all() and (info.iterations[~ok] == 3000).all()


@pytest.mark.slow
def test_dykstra_iterations_grow_with_block_size(capsys):
    # One pooled block of B entries (an increasing row under a decreasing fit).
    counts = {}
    for B in (8, 16, 32, 64):
        y = torch.linspace(0.0, 1.0, B, dtype=torch.float64).unsqueeze(0)
        _, info = softtopk.isotonic_regression(
            y, increasing=False, solver="dykstra", max_iter=100_000, return_info=True
        )
        assert bool(info.converged.all())
        counts[B] = int(info.iterations)
    with capsys.disabled():
        print(f"\nDykstra iterations to a certified single block of B entries: {counts}")
    # Growth at least linear in B: Dykstra is not a fixed small number of passes.
    assert counts[64] > 2 * counts[16] > 0


def test_dykstra_unconverged_warns_or_reports():
    y = torch.linspace(0.0, 1.0, 200, dtype=torch.float64).unsqueeze(0).repeat(2, 1)
    with pytest.warns(UserWarning, match="did not reach a certified solution"):
        softtopk.isotonic_regression(y, increasing=False, solver="dykstra", max_iter=20)
    _, info = softtopk.isotonic_regression(
        y, increasing=False, solver="dykstra", max_iter=20, return_info=True
    )
    assert not bool(info.converged.any()) and bool((info.iterations == 20).all())


def test_dykstra_rejects_kl():
    with pytest.raises(ValueError, match="dykstra"):
        softtopk.isotonic_regression(torch.randn(3, 4), loss="kl", solver="dykstra")


def test_dykstra_tie_partition_is_split():
    # (2.9, 2.9) is already ordered: no pooling, so no coupling in the gradient.
    y = torch.tensor([[2.9, 2.9, 0.4, 0.2, -1.0]], dtype=torch.float64, requires_grad=True)
    for solver in ("pav", "dykstra"):
        v, info = softtopk.isotonic_regression(y, increasing=False, solver=solver, return_info=True)
        assert info.blocks.tolist() == [[0, 1, 2, 3, 4]]
        (g,) = torch.autograd.grad(v[0, 0], y)
        torch.testing.assert_close(g, torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("solver,loss", [("pav", "l2"), ("pav", "kl"), ("dykstra", "l2")])
@pytest.mark.slow
def test_gradcheck(loss, increasing, solver):
    """Dykstra is L2 only (a KL call is tested to raise)."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(4, 9, dtype=torch.float64, generator=g).cumsum(-1).requires_grad_()
    w = (torch.rand(4, 9, dtype=torch.float64, generator=g) + 0.5).requires_grad_()

    def fn(y, w):
        return softtopk.isotonic_regression(y, w, increasing=increasing, loss=loss, solver=solver)

    assert torch.autograd.gradcheck(fn, (y, w))


def test_pav_torch_gradcheck(monkeypatch):
    monkeypatch.setenv("SOFTTOPK_BACKEND", "torch")
    g = torch.Generator().manual_seed(4)
    y = torch.randn(3, 8, dtype=torch.float64, generator=g).cumsum(-1).requires_grad_()
    for loss in ("l2", "kl"):
        _, info = softtopk.isotonic_regression(y, loss=loss, return_info=True)
        assert info.solver == "pav-torch"
        assert torch.autograd.gradcheck(lambda y: softtopk.isotonic_regression(y, loss=loss), (y,))


@pytest.mark.parametrize("loss", ["l2", "kl"])
def test_jacobian_is_the_block_matrix(rng, loss):
    n = 12
    y = torch.from_numpy(hard_rows(rng, 1, n)[0])
    w = torch.from_numpy(rng.uniform(0.5, 2.0, size=n))
    v, info = softtopk.isotonic_regression(y, w, loss=loss, return_info=True)
    jac = torch.autograd.functional.jacobian(lambda y: softtopk.isotonic_regression(y, w, loss=loss), y)
    blocks = info.blocks
    same = blocks[:, None] == blocks[None, :]
    if loss == "l2":
        W = torch.zeros(n, dtype=y.dtype).index_add_(0, blocks, w)[blocks]
        expected = same * (w[None, :] / W[:, None])
    else:
        a = y + torch.log(w)
        lse = torch.stack([torch.logsumexp(a[blocks == b], 0) for b in range(int(blocks.max()) + 1)])[blocks]
        expected = same * torch.exp(a[None, :] - lse[:, None])
    torch.testing.assert_close(jac, expected, atol=1e-12, rtol=0)
    assert int(blocks.max()) + 1 < n  # the row really pooled something


def test_validation():
    y = torch.randn(3, 4)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        softtopk.isotonic_regression([1.0, 2.0])
    with pytest.raises(TypeError, match="floating dtype"):
        softtopk.isotonic_regression(torch.arange(4))
    with pytest.raises(ValueError, match="loss must be one of"):
        softtopk.isotonic_regression(y, loss="l1")
    with pytest.raises(ValueError, match="solver must be one of"):
        softtopk.isotonic_regression(y, solver="newton")
    with pytest.raises(ValueError, match="weights must be positive"):
        softtopk.isotonic_regression(y, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weights must broadcast"):
        softtopk.isotonic_regression(y, torch.ones(5))
    with pytest.raises(ValueError, match="max_iter must be at least 0"):
        softtopk.isotonic_regression(y, solver="dykstra", max_iter=-1)
    with pytest.raises(TypeError, match="increasing must be a bool"):
        softtopk.isotonic_regression(y, increasing=1)
    with pytest.raises(IndexError, match="dim out of range"):
        softtopk.isotonic_regression(y, dim=2)


def test_empty_and_single():
    assert softtopk.isotonic_regression(torch.empty(0, 5)).shape == (0, 5)
    torch.testing.assert_close(softtopk.isotonic_regression(torch.tensor([4.0])), torch.tensor([4.0]))


@pytest.mark.parametrize(
    "fn",
    [
        softtopk.isotonic_regression,
        softtopk.soft_rank,
        softtopk.soft_sort,
        lambda x: softtopk.permutahedron_projection(x, torch.ones(x.shape[-1])),
    ],
)
def test_empty_input_keeps_the_graph(fn):
    x = torch.empty(0, 5, requires_grad=True)
    y = fn(x)
    assert y.shape == (0, 5) and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 5)


@pytest.mark.parametrize("loss", ["l2", "kl"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.slow
def test_double_backward_and_forward_mode(monkeypatch, loss, backend):
    """Second derivatives by gradgradcheck (in y and the weights), first by forward mode."""
    monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
    g = torch.Generator().manual_seed(11)
    y = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(3, 7, dtype=torch.float64, generator=g) + 0.5).requires_grad_()

    def fn(y, w):
        return softtopk.isotonic_regression(y, w, loss=loss)

    assert torch.autograd.gradgradcheck(fn, (y, w))
    u, du = torch.randn_like(y), torch.randn_like(w)
    _, tangent = torch.func.jvp(fn, (y.detach(), w.detach()), (u, du))
    jy, jw = torch.autograd.functional.jacobian(fn, (y.detach(), w.detach()))
    expected = torch.einsum("bicj,cj->bi", jy, u) + torch.einsum("bicj,cj->bi", jw, du)
    torch.testing.assert_close(tangent, expected)


@pytest.mark.parametrize("loss", ["l2", "kl"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_forward_over_forward_equals_reverse_over_reverse(monkeypatch, loss, backend):
    """jacfwd(jacfwd) in y and in the weights: the block values in tensor ops on the
    solver's partition (torch.func does not run an outer jvp through the jvp rule)."""
    monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
    g = torch.Generator().manual_seed(12)
    y = torch.randn(2, 7, dtype=torch.float64, generator=g)
    w = torch.rand(2, 7, dtype=torch.float64, generator=g) + 0.5
    c = torch.randn(2, 7, dtype=torch.float64, generator=g)

    def fn(y, w):
        return (softtopk.isotonic_regression(y, w, loss=loss) * c).sum()

    fwd, rev = torch.func.jacfwd, torch.func.jacrev
    for arg in (0, 1):
        expected = rev(rev(fn, argnums=arg), argnums=arg)(y, w)
        assert expected.abs().max() > 1e-3 or (loss, arg) == ("l2", 0)  # (L2 is linear in y)
        torch.testing.assert_close(fwd(fwd(fn, argnums=arg), argnums=arg)(y, w), expected)
    mixed = rev(rev(fn, argnums=0), argnums=1)(y, w)
    torch.testing.assert_close(fwd(fwd(fn, argnums=0), argnums=1)(y, w), mixed)


def test_dykstra_does_not_certify_a_non_monotone_float32_fit():
    y = torch.tensor([[1, 1.0000002, 1.0000002, 0.9999995, 1.0000002]])
    v, info = softtopk.isotonic_regression(y, solver="dykstra", return_info=True)
    assert bool(info.converged.all())
    assert bool((v[:, 1:] >= v[:, :-1]).all())
    torch.testing.assert_close(v, softtopk.isotonic_regression(y, solver="pav"))


@pytest.mark.parametrize("solver", ["pav", "dykstra"])
def test_small_entries_next_to_a_huge_one_are_pooled(solver, monkeypatch):
    # The rounding margin of a comparison scales with the blocks compared, not the row.
    for backend in ("cpu", "torch"):
        monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
        y = torch.tensor([[1.1259e15, -0.1, 0.0]], dtype=torch.float64)
        v, info = softtopk.isotonic_regression(y, increasing=False, solver=solver, return_info=True)
        assert bool(info.converged.all())
        torch.testing.assert_close(v, torch.tensor([[1.1259e15, -0.05, -0.05]], dtype=torch.float64))


@pytest.mark.parametrize("solver", ["pav", "dykstra"])
def test_block_means_of_entries_near_the_float_limit_are_finite(solver):
    big = torch.finfo(torch.float64).max
    y = torch.tensor([[big, big, 1e-300], [big, -big, 1.0]], dtype=torch.float64)
    v = softtopk.isotonic_regression(y, increasing=True, solver=solver)
    expected = torch.tensor([[big * (2 / 3)] * 3, [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(v, expected)

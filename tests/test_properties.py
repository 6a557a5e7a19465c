"""The adversarial suite: property-based tests over every public operator (hypothesis).

Driven by :data:`softtopk.registry.OPERATORS` and each entry's contract flags
(``sums_to_k``, ``bounded``, ``sparse``, ``exact_padding``, ``stochastic``,
``equivariant``, ``k_grad``), plus a table of the public operators outside the
registry (isotonic family, indicators, SOFT's Sinkhorn mask, threshold-p routing).
Inputs reach the dtype's limits: huge and tiny magnitudes, large offsets, ties,
constant rows, rows of length 0 and 1, k at 0, n, fractional and per row, NaN and
+-inf entries. Stochastic operators run on their seeded view, where a property holds
per sample; the properties that hold only in distribution (batch == loop, -inf padding,
permutation equivariance) skip them, as the registry says.

The ``ci`` profile (tests/conftest.py) is derandomized and bounded; run
``pytest tests/test_properties.py --hypothesis-profile long`` for a long local search.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

import softtopk
from softtopk.ops import METHODS
from softtopk.registry import OPERATORS

from ._strategies import FLOATS, HALF, budget, k_for_row, k_tensor, rows, temperatures

SHAPED = [name for name, op in OPERATORS.items() if op.kind in ("mask", "magnitude")]
MASKS = [name for name in SHAPED if OPERATORS[name].kind == "mask"]
MAGNITUDES = [name for name in SHAPED if OPERATORS[name].kind == "magnitude"]
DETERMINISTIC = [name for name in SHAPED if not OPERATORS[name].stochastic]


def integer_k(name: str) -> bool:
    """topk_mag takes whole budgets only (a documented ValueError otherwise)."""
    return OPERATORS[name].kind == "magnitude"


def call(name: str, x: torch.Tensor, k, dim: int = -1, *, temperature: float | None = None, seed: int = 0):
    try:
        return OPERATORS[name].seeded(seed)(x, k, dim, temperature=temperature)
    except ValueError as err:
        # topk_mag and the threshold masks refuse float64 rows beyond their solver's range
        # (their documented contract).
        assume("float64 range" not in str(err))
        raise


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the dtype the operators compute in."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical (NaN equal to NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def same_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same rows computed in another batch: equal to the last bits (NaN equal to NaN).

    torch's element-wise CPU kernels round a value differently in their vectorised body and
    in their scalar tail, so a row moved to another place of a batch can change in its last
    bit (``torch.sigmoid`` does, about one row in fifteen); a row coupled to its neighbours
    differs by far more than 4 ulps of the tensor's scale.
    """
    e = torch.finfo(a.dtype).eps
    finite = b[torch.isfinite(b)]
    top = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=4 * e, atol=4 * e * top, equal_nan=True)


def scale(x: torch.Tensor) -> float:
    """Largest finite magnitude of x (1 for an empty or all-zero x)."""
    xf = x.detach().double()
    xf = xf[torch.isfinite(xf)]
    return max(1.0, xf.abs().max().item()) if xf.numel() else 1.0


def condition(x: torch.Tensor, t: float) -> float:
    """|x| / t: how many ulps of x the mask's slope amplifies (its sensitivity to rounding)."""
    return scale(x) / t


def check_mask_contract(name: str, x: torch.Tensor, k, y: torch.Tensor, t: float) -> None:
    """Range, sum and order of a mask of finite rows x (B, n)."""
    op = OPERATORS[name]
    n = x.shape[-1]
    assert (y >= 0).all(), y
    if op.bounded:
        assert (y <= 1).all(), y
    if op.sums_to_k and n:
        kk = k_tensor(k, x.shape[0])
        s = y.double().sum(-1)
        # Rounding: n eps, plus the threshold's own rounding (eps64 |x|) amplified by 1/t.
        tol = 64 * (n + 1) * eps(x.dtype) * max(1.0, float(kk.max()))
        tol += 32 * n * torch.finfo(torch.float64).eps * condition(x, t)
        if y.dtype in HALF:
            tol += n * torch.finfo(y.dtype).eps
        assert (s - kk).abs().max() <= tol, (s, kk)
    if op.equivariant and not op.stochastic and op.bounded:
        # Order: x_i > x_j implies y_i >= y_j (the threshold family and DFTopK).
        xi, yi = x.double().unsqueeze(-1), y.double().unsqueeze(-1)
        bigger = xi > xi.transpose(-1, -2)
        assert (~bigger | (yi >= yi.transpose(-1, -2))).all(), (x, y)


def check_magnitude_contract(x: torch.Tensor, k, y: torch.Tensor) -> None:
    """y keeps or shrinks each entry of x towards 0, and keeps the order of |x|."""
    xd, yd = x.double(), y.double()
    assert ((yd == 0) | (torch.sign(yd) == torch.sign(xd))).all(), (x, y)
    assert (yd.abs() <= xd.abs() * (1 + 4 * eps(x.dtype))).all(), (x, y)
    kk = k_tensor(k, x.shape[0])
    # At most k entries are kept whole; k = 0 keeps nothing, k = n keeps everything.
    assert (y[kk == 0] == 0).all()
    full = kk == x.shape[-1]
    torch.testing.assert_close(yd[full], xd[full], rtol=4 * eps(x.dtype), atol=0)


def check_contract(name: str, x: torch.Tensor, k, y: torch.Tensor, t: float) -> None:
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), (x, k, y)
    if OPERATORS[name].kind == "mask":
        check_mask_contract(name, x, k, y, t)
    else:
        check_magnitude_contract(x, k, y)


# ---------------------------------------------------------------- finite rows: values


@st.composite
def case(draw, name: str, dtypes=FLOATS, *, min_n: int = 0, max_n: int = 10, extreme: bool = True):
    dtype = draw(st.sampled_from(dtypes))
    x = draw(rows(dtype, min_n=min_n, max_n=max_n, extreme=extreme))
    k = draw(budget(x, integer=integer_k(name)))
    t = draw(temperatures(OPERATORS[name].temperature))
    return x, k, t


@pytest.mark.parametrize("name", SHAPED)
@given(data=st.data())
def test_contract_on_finite_rows(name, data):
    """Finite rows give finite values in range, summing to k, in the order of x."""
    x, k, t = data.draw(case(name))
    note(f"x={x.dtype} {x.tolist()!r} k={k!r} t={t}")
    y = call(name, x, k, temperature=t)
    check_contract(name, x, k, y, t)


@pytest.mark.parametrize("name", SHAPED)
@given(data=st.data())
def test_gradients_finite_on_finite_rows(name, data):
    """Finite rows give finite gradients, in x and (where differentiable) in a k tensor."""
    x, k, t = data.draw(case(name))
    op = OPERATORS[name]
    if isinstance(k, torch.Tensor) and op.k_grad:
        k = k.to(x.dtype).requires_grad_()
    xr = x.clone().requires_grad_()
    y = call(name, xr, k, temperature=t)
    w = data.draw(st.sampled_from(["ones", "alternating", "y"]))
    if w == "ones":
        v = torch.ones_like(y)
    elif w == "alternating":
        v = (torch.arange(y.numel()).reshape(y.shape) % 3 - 1).to(y.dtype)
    else:
        v = y.detach()
    note(f"x={x.dtype} {x.tolist()!r} k={k!r} t={t} cotangent={w}")
    y.backward(v)
    assert xr.grad is not None and xr.grad.dtype == x.dtype
    assert torch.isfinite(xr.grad).all(), (x, k, xr.grad)
    if isinstance(k, torch.Tensor) and k.requires_grad:
        assert k.grad is not None and torch.isfinite(k.grad).all(), k.grad


# -------------------------------------------------------------------- the row rules


@st.composite
def ruled_batch(draw, name: str):
    """Rows each under one rule of the table (regular, NaN, k = 0, +inf, few finite).

    Returns the rows with the rules applied, the same rows with the NaN entries put
    back to their finite values, the per-row budgets and the rule of each row.
    """
    dtype = draw(st.sampled_from(FLOATS))
    x = draw(rows(dtype, min_n=1, max_n=8, min_b=2, max_b=5))
    n, b = x.shape[-1], x.shape[0]
    magnitude = OPERATORS[name].kind == "magnitude"
    kinds = draw(st.lists(st.sampled_from(["regular", "nan", "zero", "pos", "ones"]), min_size=b, max_size=b))
    k = k_tensor(draw(budget(x, integer=integer_k(name), per_row=True)), b).clone()
    ruled = x.clone()
    for i, kind in enumerate(kinds):
        cols = draw(st.permutations(range(n)))
        if kind == "nan":
            ruled[i, cols[0]] = math.nan
        elif kind == "zero":
            k[i] = 0.0
        elif kind == "pos":
            # m >= k entries +inf (magnitude: at most k infinite entries, kept as they are).
            m = draw(st.integers(1, n))
            if magnitude:
                k[i] = draw(st.integers(m, n))
                signs = draw(st.lists(st.sampled_from([math.inf, -math.inf]), min_size=m, max_size=m))
                for c, s in zip(cols[:m], signs, strict=True):
                    ruled[i, c] = s
            else:
                k[i] = draw(st.floats(0.0, float(m))) if not integer_k(name) else draw(st.integers(0, m))
                ruled[i, list(cols[:m])] = math.inf
        elif kind == "ones":
            if magnitude:
                k[i] = float(n)
            else:
                # At most k entries above -inf.
                m = draw(st.integers(0, n))
                ruled[i, list(cols[:m])] = -math.inf
                k[i] = draw(st.floats(float(n - m), float(n))) if n - m < n else float(n)
    clean = torch.where(torch.isnan(ruled), x, ruled)
    return ruled, clean, k, kinds


#: The threshold family takes its budgets in float64 (``topk_mask``'s ``k_dtype``), so its
#: share k / n_pos of a row with +inf entries is rounded once to the output's dtype.
FLOAT64_BUDGETS = {"sparse", "sparse-p4/3", "sparse-pav", "sparse-dykstra", "entropic", "lapsum"}


@pytest.mark.parametrize("name", SHAPED)
@given(data=st.data())
def test_row_rules(name, data):
    """Each rule row gets the table's value; NaN stays in its row, the others bit-identical."""
    ruled, clean, k, kinds = data.draw(ruled_batch(name))
    note(f"x={ruled!r} k={k!r} kinds={kinds}")
    xr, xc = ruled.clone().requires_grad_(), clean.clone().requires_grad_()
    y, yc = call(name, xr, k), call(name, xc, k)
    nan_rows = torch.tensor([kind == "nan" for kind in kinds])
    assert torch.isnan(y[nan_rows]).all()
    same(y[~nan_rows], yc[~nan_rows])
    magnitude = OPERATORS[name].kind == "magnitude"
    for i, kind in enumerate(kinds):
        row = ruled[i]
        if kind == "zero":
            assert (y[i] == 0).all(), y[i]
        elif kind == "pos" and name == "hard":
            # The hard mask breaks ties as torch.topk does, +inf ties included (its contract).
            inf = row == math.inf
            assert (y[i][~inf] == 0).all() and ((y[i] >= 0) & (y[i] <= 1)).all(), y[i]
            torch.testing.assert_close(y[i].double().sum(), k[i], rtol=0, atol=4 * eps(y.dtype))
        elif kind == "pos" and not magnitude:
            n_pos = int((row == math.inf).sum())
            if name in FLOAT64_BUDGETS:
                share = (k[i].double() / n_pos).to(y.dtype)  # rounded once
            else:
                share = k[i].to(y.dtype) / n_pos  # in the dtype the operator computes in
            same(y[i], torch.where(row == math.inf, share, 0.0).to(y.dtype))
        elif kind == "pos" and magnitude:
            inf = torch.isinf(row)
            same(y[i][inf], row[inf])
        elif kind == "ones" and not magnitude:
            same(y[i], (row > -math.inf).to(y.dtype))
        elif kind == "ones" and magnitude:
            same(y[i], row)
    g = torch.where(torch.isfinite(y), y, 0.0).detach() + 1.0
    (gx,) = torch.autograd.grad(y, xr, g)
    (gc,) = torch.autograd.grad(yc, xc, g)
    same(gx[~nan_rows], gc[~nan_rows])
    # Rule rows other than NaN rows get no gradient.
    rule = torch.tensor([kind in ("zero", "pos", "ones") for kind in kinds])
    if not magnitude:
        assert (gx[rule] == 0).all(), gx


@pytest.mark.parametrize("name", [n for n in MASKS if OPERATORS[n].exact_padding and n in DETERMINISTIC])
@given(data=st.data())
def test_minus_inf_padding(name, data):
    """-inf entries get 0 and no gradient; the others equal the row without them."""
    dtype = data.draw(st.sampled_from(FLOATS))
    x = data.draw(rows(dtype, min_n=1, max_n=8, max_b=1))
    n = x.shape[-1]
    pads = data.draw(st.integers(1, 4))
    where = sorted(data.draw(st.lists(st.integers(0, n), min_size=pads, max_size=pads)))
    cols, padded_cols = [], []
    src = list(x[0])
    out, j = [], 0
    for pos in range(n + 1):
        while where and where[0] == pos:
            padded_cols.append(len(out))
            out.append(-math.inf)
            where.pop(0)
        if pos < n:
            cols.append(len(out))
            out.append(float(src[j]))
            j += 1
    if name == "hard":
        # torch.topk breaks ties by position, which the padding shifts (documented).
        assume(len(set(x[0].tolist())) == n)
    padded = torch.tensor([out], dtype=dtype).requires_grad_()
    k = data.draw(budget(x, integer=integer_k(name), per_row=False))
    t = data.draw(temperatures(OPERATORS[name].temperature))
    note(f"x={padded!r} k={k!r} t={t}")
    y = call(name, padded, k, temperature=t)
    ref = call(name, x, k, temperature=t)
    assert (y[0, padded_cols] == 0).all(), y
    tol = 64 * eps(dtype) * min(condition(x, t), 1 / eps(dtype)) + 16 * eps(dtype)
    torch.testing.assert_close(y[:, cols], ref, rtol=0, atol=tol)
    if not math.isclose(k, 0.0) and name != "hard":
        (g,) = torch.autograd.grad(y, padded, torch.randn_like(y))
        assert (g[0, padded_cols] == 0).all(), g
        assert torch.isfinite(g).all(), g


# ------------------------------------------------------------------ shape properties


@pytest.mark.parametrize("name", [n for n in DETERMINISTIC])
@given(data=st.data())
def test_batch_equals_loop(name, data):
    """A batch with per-row budgets gives each row's result alone, bit for bit."""
    x, k, t = data.draw(case(name, min_n=1))
    y = call(name, x, k, temperature=t)
    loop = torch.stack([call(name, x[i], k_for_row(k, i), temperature=t) for i in range(x.shape[0])])
    note(f"x={x.dtype} {x.tolist()!r} k={k!r} t={t}")
    same_rows(y, loop)


@pytest.mark.parametrize("name", SHAPED)
@given(data=st.data())
def test_layout_independence(name, data):
    """Any dim, any batch shape, any strides: the same values as contiguous rows along -1."""
    dtype = data.draw(st.sampled_from(FLOATS))
    x = data.draw(rows(dtype, min_n=0, max_n=6, min_b=1, max_b=6))
    b, n = x.shape
    a = data.draw(st.sampled_from([d for d in (1, 2, 3) if b % d == 0]))
    k = data.draw(budget(x, integer=integer_k(name), per_row=True))
    t = data.draw(temperatures(OPERATORS[name].temperature))
    ref = call(name, x, k, temperature=t)
    # (a, b / a, n) rows moved to dim `d`, stored non-contiguously.
    kb = k.reshape(a, b // a) if isinstance(k, torch.Tensor) else k
    d = data.draw(st.integers(0, 2))
    x3 = x.reshape(a, b // a, n).movedim(-1, d)
    store = data.draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if store == "contiguous":
        x3 = x3.contiguous()
    elif store == "strided":
        big = torch.zeros(*(2 * s for s in x3.shape), dtype=dtype)
        big[::2, ::2, ::2] = x3
        x3 = big[::2, ::2, ::2]
    note(f"x={x!r} k={k!r} t={t} dim={d} store={store}")
    op = OPERATORS[name]
    if op.stochastic and store != "contiguous":
        # The noise is drawn in the row layout, so only the storage may change.
        y3 = call(name, x3, kb, d, temperature=t)
        same(y3, call(name, x3.contiguous(), kb, d, temperature=t))
        return
    y3 = call(name, x3, kb, d, temperature=t)
    assume(not op.stochastic)
    same(y3.movedim(d, -1).reshape(b, n), ref)


@pytest.mark.parametrize("name", [n for n in DETERMINISTIC if OPERATORS[n].equivariant])
@given(data=st.data())
def test_permutation_equivariance(name, data):
    """Permuting a row permutes its result (ties included, except for the hard mask)."""
    x, k, t = data.draw(case(name, min_n=1))
    perm = torch.tensor(data.draw(st.permutations(range(x.shape[-1]))), dtype=torch.long)
    if name == "hard":
        # torch.topk breaks ties by position (documented in hard_mask).
        assume(all(len(set(r.tolist())) == len(r) for r in x))
    y = call(name, x, k, temperature=t)
    yp = call(name, x[:, perm], k, temperature=t)
    note(f"x={x!r} k={k!r} t={t} perm={perm}")
    tol = 64 * eps(x.dtype) * min(condition(x, t), 1 / eps(x.dtype)) + 16 * eps(x.dtype)
    tol *= scale(x) if OPERATORS[name].kind == "magnitude" else 1.0
    torch.testing.assert_close(yp, y[:, perm], rtol=0, atol=tol)


@pytest.mark.parametrize("name", SHAPED)
@given(data=st.data())
def test_half_precision_matches_float32(name, data):
    """float16/bfloat16 rows give the float32 result of the same values, to the dtype's rounding."""
    dtype = data.draw(st.sampled_from(HALF))
    x = data.draw(rows(dtype, min_n=0, max_n=10))
    k = data.draw(budget(x, integer=integer_k(name)))
    t = data.draw(temperatures(OPERATORS[name].temperature))
    note(f"x={x.dtype} {x.tolist()!r} k={k!r} t={t}")
    y = call(name, x, k, temperature=t)
    ref = call(name, x.float(), k, temperature=t)
    assert y.dtype == dtype and torch.isfinite(y).all(), y
    check_contract(name, x, k, y, t)
    # Rounding to the dtype is relative (entries of unbounded masks can exceed 1), and
    # absolute among its subnormals, spaced smallest_normal * eps apart (5.96e-8 in float16:
    # a magnitude output of 6.24e-8 rounds to 5.96e-8).
    unit = ref.abs() if OPERATORS[name].kind == "magnitude" else ref.abs().clamp(min=1.0)
    info = torch.finfo(dtype)
    err = (y.float() - ref).abs()
    assert (err <= info.eps * unit + info.smallest_normal * info.eps).all(), (y, ref)


# ------------------------------------------------------------------ solver routes


SOLVER_CASES = [
    (method, solver, p)
    for method, spec in METHODS.items()
    for p in ((2.0, 4.0 / 3.0) if spec.uses_p else (2.0,))
    for solver in spec.solvers
    if solver != "auto" and not (p != 2.0 and solver in ("sort", "pav", "dykstra"))
]


@pytest.mark.parametrize("method,solver,p", SOLVER_CASES)
@given(data=st.data())
def test_solvers_agree_with_default(method, solver, p, data):
    """Every solver= route of topk_mask gives the default route's mask (both exact)."""
    dtype = data.draw(st.sampled_from(FLOATS))
    x = data.draw(rows(dtype, min_n=0, max_n=10))
    k = data.draw(budget(x))
    t = data.draw(st.sampled_from([0.1, 1e-6, 1e-3, 1.0, 1e4]))
    opts = {"p": p} if METHODS[method].uses_p else {}
    note(f"x={x.dtype} {x.tolist()!r} k={k!r} t={t}")
    try:
        ref = softtopk.topk_mask(x, k, method=method, temperature=t, **opts)
    except ValueError as err:
        assume("float64 range" not in str(err))  # refused beyond the solver's range (documented)
        raise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = softtopk.topk_mask(x, k, method=method, temperature=t, solver=solver, **opts)
    if solver == "dykstra" and caught:
        return  # Dykstra says when it is not certified (its documented contract).
    assert torch.isfinite(y).all() and (y >= 0).all() and (y <= 1).all(), y
    # Both routes are exact up to rounding of x, which the mask's slope 1/t amplifies.
    tol = 64 * eps(dtype) * min(condition(x, t), 1 / eps(dtype)) + 16 * eps(dtype)
    torch.testing.assert_close(y, ref, rtol=0, atol=tol)


@contextlib.contextmanager
def backend(value: str) -> Iterator[None]:
    """SOFTTOPK_BACKEND set to ``value`` for the block (read at each call)."""
    before = os.environ.get("SOFTTOPK_BACKEND")
    os.environ["SOFTTOPK_BACKEND"] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ["SOFTTOPK_BACKEND"]
        else:
            os.environ["SOFTTOPK_BACKEND"] = before


@pytest.mark.parametrize("name", DETERMINISTIC)
@given(data=st.data())
def test_backends_agree(name, data):
    """SOFTTOPK_BACKEND=torch (tensor ops) and =cpu (numba) give the same values and gradients."""
    x, k, t = data.draw(case(name))
    note(f"x={x.dtype} {x.tolist()!r} k={k!r} t={t}")
    out = {}
    for route in ("torch", "cpu"):
        with backend(route):
            xr = x.clone().requires_grad_()
            y = call(name, xr, k, temperature=t)
            (g,) = torch.autograd.grad(y, xr, torch.ones_like(y) + y.detach())
            out[route] = (y.detach(), g)
    tol = 64 * eps(x.dtype) * min(condition(x, t), 1 / eps(x.dtype)) + 16 * eps(x.dtype)
    unit = scale(x) if OPERATORS[name].kind == "magnitude" else 1.0
    torch.testing.assert_close(out["cpu"][0], out["torch"][0], rtol=0, atol=tol * unit)
    gt = out["torch"][1]
    gtol = tol * max(1.0, gt.abs().max().item() if gt.numel() else 1.0)
    torch.testing.assert_close(out["cpu"][1], gt, rtol=0, atol=gtol)


# --------------------------------------------------- public operators outside the registry


@dataclass(frozen=True)
class Extra:
    """A public operator outside the registry: fn(x, k, dim) and its contract check."""

    name: str
    fn: Callable[..., torch.Tensor]
    check: Callable[[torch.Tensor, object, torch.Tensor], None]
    takes_k: bool = True
    integer_k: bool = False
    nan_rows: bool = True  # a NaN row gives NaN in that row
    half: bool = True
    extreme: bool = True  # magnitudes up to the dtype's limits (else |x| <= 1e7)


def _sorted_check(x, k, y):
    assert (y[..., 1:] >= y[..., :-1] - 8 * eps(x.dtype) * scale(x)).all(), y


def _rank_check(x, k, y):
    n = x.shape[-1]
    assert (y >= 1 - 1e-3).all() and (y <= n + 1e-3).all(), y
    torch.testing.assert_close(
        y.double().sum(-1),
        torch.full((x.shape[0],), n * (n + 1) / 2.0, dtype=torch.float64),
        rtol=1e-4,
        atol=1e-4,
    )


def _sum_check(x, k, y):
    # Sums in units of the largest entry: rows near the float64 limit overflow otherwise.
    unit = scale(x)
    tol = 1e-4 * max(1, x.shape[-1])
    torch.testing.assert_close((y.double() / unit).sum(-1), (x.double() / unit).sum(-1), rtol=0, atol=tol)


def _iso_check(x, k, y):
    _sorted_check(x, k, y)
    _sum_check(x, k, y)


def _mask_check(x, k, y):
    assert (y >= 0).all() and (y <= 1).all(), y
    kk = k_tensor(k, x.shape[0])
    torch.testing.assert_close(y.double().sum(-1), kk, rtol=0, atol=1e-3 * max(1, x.shape[-1]))


def _indicator_check(x, k, y):
    kk = int(k)
    assert y.shape == (*x.shape[:-1], kk, x.shape[-1]), y.shape
    assert (y >= 0).all() and (y <= 1 + 1e-4).all(), y
    if kk:
        torch.testing.assert_close(
            y.double().sum(-1), torch.ones(y.shape[:-1], dtype=torch.float64), rtol=0, atol=1e-3
        )
        assert (y.double().sum(-2) <= 1 + 1e-3).all(), y


def _threshold_check(x, k, y):
    same(y, (x >= k).to(y.dtype))


def _soft_threshold_check(x, k, y):
    assert (y >= 0).all() and (y <= 1).all(), y
    count = (x >= k).double().sum(-1)
    torch.testing.assert_close(y.double().sum(-1), count, rtol=0, atol=1e-3 * max(1, x.shape[-1]))


def _gate_check(x, k, y):
    same(y, torch.where(x >= k, x, torch.zeros_like(x)))


def _w(x):
    return torch.arange(x.shape[-1], 0, -1, dtype=x.dtype)


def _perm_check(x, k, y):
    w = _w(x).double()
    torch.testing.assert_close(
        y.double().sum(-1),
        torch.full((x.shape[0],), w.sum().item(), dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )


EXTRAS = {
    e.name: e
    for e in [
        Extra(
            "soft_rank",
            lambda x, k, d: softtopk.soft_rank(x, dim=d),
            _rank_check,
            takes_k=False,
            extreme=False,
        ),
        Extra(
            "soft_rank-kl",
            lambda x, k, d: softtopk.soft_rank(x, dim=d, regularization="kl"),
            _rank_check,
            takes_k=False,
            extreme=False,
        ),
        Extra(
            "soft_sort",
            lambda x, k, d: softtopk.soft_sort(x, dim=d),
            lambda x, k, y: (_sorted_check(x, k, y), _sum_check(x, k, y)),
            takes_k=False,
        ),
        Extra(
            "soft_sort-kl",
            lambda x, k, d: softtopk.soft_sort(x, dim=d, regularization="kl"),
            _sorted_check,
            takes_k=False,
        ),
        Extra("isotonic", lambda x, k, d: softtopk.isotonic_regression(x, dim=d), _iso_check, takes_k=False),
        Extra(
            "permutahedron",
            lambda x, k, d: softtopk.permutahedron_projection(x, _w(x.movedim(d, -1)), dim=d),
            _perm_check,
            takes_k=False,
            extreme=False,
        ),
        Extra("soft_sinkhorn_mask", lambda x, k, d: softtopk.soft_sinkhorn_mask(x, k, d), _mask_check),
        Extra(
            "indicators",
            lambda x, k, d: softtopk.topk_indicators(x, int(k), d),
            _indicator_check,
            integer_k=True,
        ),
        Extra(
            "threshold_p_mask",
            lambda x, k, d: softtopk.threshold_p_mask(x.movedim(d, -1), k).movedim(-1, d),
            _threshold_check,
            nan_rows=False,
        ),
        Extra(
            "threshold_p_gate",
            lambda x, k, d: softtopk.threshold_p_gate(x.movedim(d, -1), k).movedim(-1, d),
            _gate_check,
            nan_rows=False,
        ),
        Extra(
            "soft_threshold_p_mask",
            lambda x, k, d: softtopk.soft_threshold_p_mask(x, k, d),
            _soft_threshold_check,
        ),
    ]
}


@st.composite
def extra_case(draw, e: Extra, dtypes=FLOATS, *, min_n: int = 0, max_n: int = 8):
    dtype = draw(st.sampled_from(dtypes))
    x = draw(rows(dtype, min_n=min_n, max_n=max_n, extreme=e.extreme))
    if e.name.startswith(("threshold_p", "soft_threshold_p")):
        # The scores are compared with the threshold in their dtype (documented).
        p = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0, -1.0]), st.floats(-4, 4)))
        k = torch.tensor(p, dtype=dtype).item()
    elif e.takes_k:
        k = draw(budget(x, integer=e.integer_k, per_row=not e.integer_k))
    else:
        k = None
    return x, k


def run_extra(e: Extra, x, k, dim=-1):
    """Runs the operator; an iterative solver that warns it stopped short is its contract."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            y = e.fn(x, k, dim)
        except ValueError as err:
            # soft_threshold_p_mask runs topk_mask, which refuses float64 rows beyond the
            # threshold solver's range (documented).
            assume("float64 range" not in str(err))
            raise
    stopped = [w for w in caught if "stopped" in str(w.message) or "converge" in str(w.message)]
    assume(not stopped)
    assert not caught, [str(w.message) for w in caught]
    return y


@pytest.mark.parametrize("name", list(EXTRAS))
@given(data=st.data())
def test_extra_contract_and_gradients(name, data):
    """Finite rows: finite values satisfying the operator's contract, finite gradients."""
    e = EXTRAS[name]
    x, k = data.draw(extra_case(e))
    note(f"x={x!r} k={k!r}")
    xr = x.clone().requires_grad_()
    y = run_extra(e, xr, k)
    assert torch.isfinite(y).all(), (x, y)
    e.check(x, k, y.detach())
    if y.requires_grad:
        # A cotangent of size 1: the isotonic backward sums the cotangent over blocks in the
        # input's dtype (documented), so a cotangent near the dtype's limit may overflow.
        v = 1.0 + y.detach() / max(1.0, scale(y))
        (g,) = torch.autograd.grad(y, xr, v)
        assert torch.isfinite(g).all(), (x, g)


@pytest.mark.parametrize("name", [n for n, e in EXTRAS.items() if e.nan_rows])
@given(data=st.data())
def test_extra_nan_row_confined(name, data):
    """A NaN row gives NaN in that row; the other rows are bit-identical."""
    e = EXTRAS[name]
    x, k = data.draw(extra_case(e, min_n=1))
    assume(x.shape[0] >= 2)
    i = data.draw(st.integers(0, x.shape[0] - 1))
    j = data.draw(st.integers(0, x.shape[-1] - 1))
    bad = x.clone()
    bad[i, j] = math.nan
    note(f"x={bad!r} k={k!r}")
    y, ref = run_extra(e, bad, k), run_extra(e, x, k)
    assert torch.isnan(y[i]).all(), y
    keep = torch.arange(x.shape[0]) != i
    same(y[keep], ref[keep])


@pytest.mark.parametrize("name", list(EXTRAS))
@given(data=st.data())
def test_extra_batch_and_layout(name, data):
    """Batch == loop, and the same values along any dim and for strided storage."""
    e = EXTRAS[name]
    x, k = data.draw(extra_case(e, min_n=1))
    y = run_extra(e, x, k)
    note(f"x={x!r} k={k!r}")
    ki = (lambda i: k_for_row(k, i)) if isinstance(k, torch.Tensor) else (lambda i: k)
    loop = torch.stack([run_extra(e, x[i], ki(i)) for i in range(x.shape[0])])
    same_rows(y, loop)
    if isinstance(k, torch.Tensor) or y.shape != x.shape:
        return
    xt = x.t()  # non-contiguous, rows along dim 0
    same(run_extra(e, xt, k, 0), y.t())


@pytest.mark.parametrize("name", [n for n, e in EXTRAS.items() if e.half])
@given(data=st.data())
def test_extra_half_precision(name, data):
    """float16/bfloat16 rows give the float32 result of the same values, to the dtype's rounding."""
    e = EXTRAS[name]
    x, k = data.draw(extra_case(e, dtypes=HALF))
    note(f"x={x!r} k={k!r}")
    y = run_extra(e, x, k)
    ref = run_extra(e, x.float(), k)
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all(), y
    ulp = torch.finfo(x.dtype).eps
    err = (y.float() - ref).abs()
    assert (err <= ulp * ref.abs().clamp(min=1.0)).all(), (y, ref)

"""softtopk.topk against torch.topk and an independent brute-force oracle."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softtopk
from softtopk.ops._topk import topk_rows_impl

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def oracle_indices(row: list[float], k: int, largest: bool, sorted: bool) -> list[int]:
    """Brute force: NaN above every number, -0.0 equal to 0.0, ties by lowest index."""

    def order(i: int) -> tuple:
        v = row[i]
        if math.isnan(v):
            return (0 if largest else 1, 0.0, i)
        return (1 if largest else 0, -v if largest else v, i)

    chosen = sorted_(range(len(row)), key=order)[:k]
    return chosen if sorted else sorted_(chosen)


sorted_ = sorted  # the argument name shadows the builtin inside the tests


def check_against_oracle(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    got = softtopk.topk(x, k, dim, largest=largest, sorted=sorted)
    rows = x.movedim(dim, -1).reshape(-1, x.shape[dim]).double().tolist()
    want = torch.tensor([oracle_indices(r, k, largest, sorted) for r in rows], dtype=torch.int64)
    want = want.reshape(*x.movedim(dim, -1).shape[:-1], k).movedim(-1, dim)
    assert torch.equal(got.indices, want)
    bits = INT_VIEW[x.element_size()]
    # the values are the entries themselves, bit for bit (signed zeros, NaN payloads)
    assert torch.equal(got.values.view(bits), x.gather(dim, want).view(bits))
    return got


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as numbers, NaN equal to NaN (signed zeros compare equal, as in torch)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_matches_torch_topk_on_distinct_values():
    torch.manual_seed(0)
    for shape, k in [((8192, 8), 2), ((256, 1000), 10), ((3, 70000), 300), ((2, 9000), 17), ((5, 20000), 3)]:
        x = torch.randn(*shape, dtype=torch.float64)  # distinct: no ties to break
        for largest in (True, False):
            got = softtopk.topk(x, k, largest=largest)
            want = torch.topk(x, k, largest=largest)
            assert torch.equal(got.values, want.values) and torch.equal(got.indices, want.indices)
            unsorted = softtopk.topk(x, k, largest=largest, sorted=False)
            assert torch.equal(unsorted.indices, want.indices.sort(-1).values)


def test_values_equal_torch_and_ties_go_to_the_lowest_index():
    torch.manual_seed(1)
    x = torch.randint(-2, 3, (6, 5000)).float()
    got = check_against_oracle(x, 700)
    assert same_values(got.values, torch.topk(x, 700).values)
    # every kept 2 comes before the kept 1s, and the 1s kept are the first ones of each row
    zeros = torch.zeros(3, 100)
    assert torch.equal(softtopk.topk(zeros, 5).indices, torch.arange(5).expand(3, 5))
    assert torch.equal(softtopk.topk(zeros, 5, largest=False).indices, torch.arange(5).expand(3, 5))


def test_nan_inf_and_signed_zeros_ordered_as_torch():
    nan, inf = math.nan, math.inf
    x = torch.tensor([1.0, 3.0, nan, inf, -inf, -0.0, 0.0, nan, -1.0, 3.0])
    for dtype in DTYPES:
        xd = x.to(dtype)
        for largest in (True, False):
            for k in range(11):
                got = check_against_oracle(xd, k, largest=largest)
                assert same_values(got.values, torch.topk(xd, k, largest=largest).values)
    got = softtopk.topk(x, 4)
    assert got.indices.tolist() == [2, 7, 3, 1]  # NaN above +inf, ties by index
    assert softtopk.topk(x, 10, largest=False).indices.tolist()[-2:] == [2, 7]  # NaN last
    # -0.0 and 0.0 are equal: the first of them is taken, with its own sign
    z = torch.tensor([-0.0, 0.0, -0.0])
    assert torch.equal(torch.signbit(softtopk.topk(z, 1).values), torch.tensor([True]))
    assert torch.equal(torch.signbit(softtopk.topk(z[1:], 1).values), torch.tensor([False]))
    # NaN with the sign bit set (the x86 default NaN) is a NaN like any other
    negnan = torch.tensor([0.0, 1.0]).view(torch.int32)
    negnan[0] = -4194304  # 0xFFC00000
    y = negnan.view(torch.float32)
    assert softtopk.topk(y, 1).indices.tolist() == [0]
    assert softtopk.topk(y, 1, largest=False).indices.tolist() == [1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_take_the_sampled_route_exactly(dtype):
    torch.manual_seed(2)
    n = 20000
    rows = [
        torch.randn(n),
        torch.arange(n, dtype=torch.float32),  # ascending: every entry beats the last k-th
        torch.arange(n, 0, -1, dtype=torch.float32),
        torch.zeros(n),
        torch.randint(0, 4, (n,)).float(),
        torch.where(torch.rand(n) < 0.3, math.nan, torch.randn(n)),  # many NaN
        torch.where(torch.rand(n) < 0.5, -math.inf, torch.randn(n)),
        torch.randn(n).repeat_interleave(1).reshape(100, 200).t().reshape(n),  # periodic
    ]
    x = torch.stack(rows).to(dtype)
    bits = INT_VIEW[x.element_size()]
    values = x.double().tolist()
    for largest in (True, False):
        order = torch.tensor([oracle_indices(r, n, largest, True) for r in values])
        for k in (1, 16, 17, 300, 4096, n):
            for s in (True, False):
                got = softtopk.topk(x, k, largest=largest, sorted=s)
                want = order[:, :k] if s else order[:, :k].sort(-1).values
                assert torch.equal(got.indices, want)
                assert torch.equal(got.values.view(bits), x.gather(-1, want).view(bits))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    n=st.integers(1, 300),
    data=st.data(),
)
def test_random_shapes_dims_k_dtypes(shape, n, data):
    dim = data.draw(st.integers(-len(shape) - 1, len(shape)))
    dtype = data.draw(st.sampled_from(DTYPES))
    largest = data.draw(st.booleans())
    sort = data.draw(st.booleans())
    k = data.draw(st.integers(0, n))
    pool = data.draw(st.sampled_from(["randn", "ties", "special"]))
    full = list(shape)
    full.insert(dim % (len(shape) + 1), n)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    if pool == "randn":
        x = torch.randn(full, generator=g)
    elif pool == "ties":
        x = torch.randint(-2, 3, full, generator=g).float()
    else:
        choices = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 65504.0])
        x = choices[torch.randint(0, len(choices), full, generator=g)]
    x = x.to(dtype)
    got = check_against_oracle(x, k, dim, largest=largest, sorted=sort)
    if sort:
        assert same_values(got.values, torch.topk(x, k, dim, largest=largest).values)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 140), rows=st.integers(1, 9), k=st.integers(1, 2), data=st.data())
def test_top_one_and_two_of_short_rows(n, rows, k, data):
    # the routers' case: k <= 2 on short rows, where the CPU kernel packs key and index
    k = min(k, n)
    dtype = data.draw(st.sampled_from(DTYPES))
    largest, sort = data.draw(st.booleans()), data.draw(st.booleans())
    choices = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = choices[torch.randint(0, len(choices), (rows, n), generator=g)]
    if data.draw(st.booleans()):
        x = torch.randn(rows, n, generator=g)
    check_against_oracle(x.to(dtype), k, largest=largest, sorted=sort)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), rows=st.integers(1, 4), data=st.data())
def test_torch_route_puts_ties_in_index_order(n, rows, data):
    # The route of devices without a kernel (torch.topk, then its ties in index order)
    # against the brute-force oracle, on tie-heavy rows with NaN, +-inf and signed zeros.
    k = data.draw(st.integers(0, n))
    largest, sort = data.draw(st.booleans()), data.draw(st.booleans())
    choices = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = choices[torch.randint(0, len(choices), (rows, n), generator=g)]
    before = os.environ.get("SOFTTOPK_BACKEND")
    os.environ["SOFTTOPK_BACKEND"] = "torch"
    try:
        check_against_oracle(x, k, largest=largest, sorted=sort)
    finally:
        if before is None:
            del os.environ["SOFTTOPK_BACKEND"]
        else:
            os.environ["SOFTTOPK_BACKEND"] = before


def test_cpu_and_torch_routes_agree(monkeypatch):
    torch.manual_seed(3)
    x = torch.randint(-5, 5, (7, 9000)).float()
    x[0, ::7] = math.nan
    for k in (3, 40):
        for largest in (True, False):
            for s in (True, False):
                cpu = topk_rows_impl(x, k, largest, s)
                monkeypatch.setenv("SOFTTOPK_BACKEND", "torch")
                ref = topk_rows_impl(x, k, largest, s)
                monkeypatch.delenv("SOFTTOPK_BACKEND")
                assert torch.equal(cpu[1], ref[1])
                assert torch.equal(cpu[0].view(torch.int32), ref[0].view(torch.int32))


def test_gradient_is_scattered_to_the_indices():
    x = torch.randn(4, 30, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: softtopk.topk(v, 5, dim=1).values, (x,))
    torch.autograd.gradgradcheck(lambda v: softtopk.topk(v, 5, dim=1).values, (x,))
    w = torch.randn(4, 5, dtype=torch.float64)
    (g,) = torch.autograd.grad((softtopk.topk(x, 5).values * w).sum(), x)
    (want,) = torch.autograd.grad((torch.topk(x, 5).values * w).sum(), x)
    assert torch.equal(g, want)
    xt = torch.randn(6, 3, 20, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: softtopk.topk(v, 2, dim=0, largest=False, sorted=False).values, (xt,))


@pytest.mark.parametrize("dim", [-1, 0])
def test_forward_mode_takes_the_tangent_at_the_selected_entries(dim):
    """torch.func.jvp, jacfwd and eager dual tensors (which need not require grad) give
    the input's tangent at the selected entries, as torch.topk's forward mode does; the
    eager dual case returned no tangent at all before."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, dtype=torch.float64, generator=gen)
    u = torch.randn(5, 9, dtype=torch.float64, generator=gen)

    def f(a):
        return softtopk.topk(a, 3, dim=dim).values

    expected = u.gather(dim, softtopk.topk(x, 3, dim=dim).indices)
    torch.testing.assert_close(torch.func.jvp(f, (x,), (u,))[1], expected, rtol=0.0, atol=0.0)
    torch.testing.assert_close(torch.func.jacfwd(f)(x), torch.func.jacrev(f)(x))
    with fwAD.dual_level():
        out = softtopk.topk(fwAD.make_dual(x, u), 3, dim=dim)
        reference = torch.topk(fwAD.make_dual(x, u), 3, dim=dim)
        tangent = fwAD.unpack_dual(out.values).tangent
        torch_tangent = fwAD.unpack_dual(reference.values).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, expected, rtol=0.0, atol=0.0)
    torch.testing.assert_close(tangent, torch_tangent, rtol=0.0, atol=0.0)


def test_hard_mask_forward_mode_is_zero():
    """The hard mask's derivative in x is zero almost everywhere, in forward mode too (it
    raised NotImplementedError before); a tangent in k is refused, as a k that requires
    grad is."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    k = torch.full((4,), 2.5, dtype=torch.float64)

    def f(a, kk=2):
        return softtopk.topk_mask(a, kk, method="hard")

    _, ju = torch.func.jvp(f, (x,), (torch.ones_like(x),))
    assert ju.shape == x.shape and not ju.any()
    assert not torch.func.jacfwd(f)(x).any()
    with pytest.raises(ValueError, match="not differentiable in k"):  # as in reverse mode
        torch.func.jvp(lambda kk: f(x, kk), (k,), (torch.ones_like(k),))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, torch.ones_like(x)))).tangent
    assert tangent is not None and tangent.shape == x.shape and not tangent.any()


def test_meta_vmap_and_compile():
    m = torch.empty(2, 50, 100, device="meta")
    v, i = softtopk.topk(m, 7, dim=1)
    assert v.shape == (2, 7, 100) and i.shape == (2, 7, 100) and i.dtype == torch.int64 and v.is_meta
    x = torch.randn(3, 4, 50)
    vm = torch.func.vmap(lambda r: softtopk.topk(r, 3).values)(x)
    assert torch.equal(vm, softtopk.topk(x, 3).values)
    gx = torch.func.grad(lambda r: softtopk.topk(r, 3).values.sum())(x[0])
    assert torch.equal(gx, torch.zeros_like(x[0]).scatter(-1, torch.topk(x[0], 3).indices, 1.0))


@pytest.mark.slow
def test_compile_fullgraph_sees_one_op():
    x = torch.randn(4, 300)
    fn = torch.compile(lambda v: softtopk.topk(v, 5).values * 2, fullgraph=True)
    assert torch.equal(fn(x), torch.topk(x, 5).values * 2)


def test_scalar_empty_and_k_zero():
    s = torch.tensor(2.5)
    v, i = softtopk.topk(s, 1)
    assert v.shape == () and v.item() == 2.5 and i.item() == 0
    assert softtopk.topk(torch.randn(3, 4), 0).values.shape == (3, 0)
    assert softtopk.topk(torch.randn(0, 4), 2).indices.shape == (0, 2)
    assert softtopk.topk(torch.randn(3, 0), 0).indices.shape == (3, 0)


def test_errors():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="k must be an int"):
        softtopk.topk(x, 2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        softtopk.topk(x, True)
    with pytest.raises(ValueError, match=r"k must lie in \[0, n\] = \[0, 4\]"):
        softtopk.topk(x, 5)
    with pytest.raises(ValueError, match="got -1"):
        softtopk.topk(x, -1)
    with pytest.raises(IndexError, match="dim out of range"):
        softtopk.topk(x, 1, dim=2)
    with pytest.raises(TypeError, match="floating dtype"):
        softtopk.topk(torch.arange(4), 1)
    with pytest.raises(TypeError, match="largest must be a bool"):
        softtopk.topk(x, 1, largest=1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        softtopk.topk([1.0, 2.0], 1)


def test_hard_mask_takes_ties_by_lowest_index():
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0, -math.inf], [0.0, 0.0, 0.0, 0.0, 0.0]])
    y = softtopk.topk_mask(x, 2, method="hard")
    assert torch.equal(y, torch.tensor([[0.0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]))
    y = softtopk.topk_mask(x, 2.5, method="hard")
    assert torch.equal(y, torch.tensor([[0.0, 1, 1, 0.5, 0], [1, 1, 0.5, 0, 0]]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 150), rows=st.integers(1, 6), data=st.data())
def test_hard_mask_kernel_against_a_stable_sort(n, rows, data):
    # weight clip(k - j, 0, 1) on the j-th largest (ties by index), 0 on -inf, NaN rows NaN
    from softtopk.ops._hard import hard_mask

    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    choices = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.0])
    x = choices[torch.randint(0, len(choices), (rows, n), generator=g)]
    if data.draw(st.booleans()):
        x = torch.where(torch.isnan(x), 0.5, x)
    x = x.to(dtype)
    k = torch.tensor(data.draw(st.lists(st.floats(0.0, n), min_size=rows, max_size=rows)), dtype=dtype)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices  # NaN sorts first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n).expand(rows, n))
    want = (k[:, None] - rank.to(dtype)).clamp(0.0, 1.0)
    want = torch.where(x == -math.inf, 0.0, want)
    want = torch.where(torch.isnan(x).any(-1, keepdim=True), math.nan, want)
    for route in ("cpu", "torch"):
        before = os.environ.get("SOFTTOPK_BACKEND")
        os.environ["SOFTTOPK_BACKEND"] = route
        try:
            got = hard_mask(x, k)
        finally:
            if before is None:
                del os.environ["SOFTTOPK_BACKEND"]
            else:
                os.environ["SOFTTOPK_BACKEND"] = before
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=route)

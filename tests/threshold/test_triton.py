"""The Triton route of the threshold family against the numba (cpu) and tensor-op (torch) routes.

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set here before triton builds the kernels) with
``SOFTTOPK_BACKEND=triton``; the interpreter is slow, so rows are short and few. The
CUDA tests run the compiled kernels under ``torch.cuda.set_sync_debug_mode("error")``
(any host synchronisation fails them) and skip without a GPU; they need a process
without ``TRITON_INTERPRET`` (benchmarks/gpu_check.sh runs them).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import triton.language as triton_language  # noqa: E402

import softtopk  # noqa: E402
from softtopk.threshold import _ops, link_of_code  # noqa: E402
from softtopk.threshold import _triton as tri  # noqa: E402
from tests.conftest import random_rows  # noqa: E402
from tests.reference import oracles  # noqa: E402

LINKS = [("sparse", 2.0, 0), ("sparse", 4.0 / 3.0, 1), ("entropic", 2.0, 2), ("lapsum", 2.0, 3)]
LINK_IDS = ["sparse", "sparse-4/3", "entropic", "lapsum"]

interpreter = pytest.mark.skipif(not tri.interpreted(), reason="needs TRITON_INTERPRET=1 before triton loads")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or tri.interpreted(),
    reason="needs a CUDA device and the compiled kernels (TRITON_INTERPRET unset)",
)


def _route(monkeypatch, backend, fn, *args):
    monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
    try:
        return fn(*args)
    finally:
        monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")


def _forward(monkeypatch, backend, x, k, t, code, p):
    return _route(monkeypatch, backend, _ops.forward_impl, x, k, t, code, p, 0)


def _backward(monkeypatch, backend, y, tau, t, v, code, p, x):
    return _route(monkeypatch, backend, _ops.backward_impl, y, tau, t, v, code, p, x)


def _batch(rng, rows, n, dtype):
    x = torch.from_numpy(random_rows(rng, rows, n)).to(dtype)
    k = rng.uniform(0.0, n, size=rows)
    k[::3] = np.floor(k[::3])
    k[1] = min(1.0, n)
    t = rng.choice([0.05, 0.5, 2.0], size=rows)
    return x, torch.from_numpy(k), torch.from_numpy(t)


def _rule_rows(dtype):
    """Rows set by every rule, and regular rows with ties, infinities and padding."""
    inf = math.inf
    x = torch.tensor(
        [
            [0.3, math.nan, 1.0, 2.0, 0.1, -1.0],  # NaN row
            [0.3, 0.2, 1.0, 2.0, 0.1, -1.0],  # k = 0
            [0.3, 0.2, 1.0, 2.0, 0.1, -1.0],  # k = n
            [inf, 0.2, inf, 2.0, inf, -1.0],  # +inf entries share k = 2
            [inf, 0.2, 1.0, 2.0, -inf, -1.0],  # one +inf among k = 2.5
            [-inf, 0.5, -inf, 2.0, -inf, -inf],  # fewer finite entries than k = 3
            [-inf, 0.5, -inf, 2.0, 1.0, -inf],  # -inf padding, regular
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied
            [1.0, 1.0, 0.0, 0.0, 1.0, -2.0],  # ties at the threshold
            [0.3, 0.2, 1.0, 2.0, 0.1, -1.0],  # NaN k
            [0.3, 0.2, 1.0, 2.0, 0.1, -1.0],  # k > n
            [-inf, -inf, -inf, -inf, -inf, -inf],  # all padding, k = 1
        ],
        dtype=dtype,
    )
    k = torch.tensor([2.0, 0.0, 6.0, 2.0, 2.5, 3.0, 1.5, 2.0, 2.0, math.nan, 7.0, 1.0], dtype=torch.float64)
    t = torch.full((x.shape[0],), 0.5, dtype=torch.float64)
    return x, k, t


def _close(a, b, atol):
    torch.testing.assert_close(a, b, atol=atol, rtol=atol, equal_nan=True)


def _check_tau(tau, ref, y, sparse, atol):
    """tau agrees where it is well defined: every dense row, sparse rows with y in (1e-6, 1 - 1e-6).

    A sparse row without a fractional entry has a whole interval of roots; one whose only
    fractional entries are tiny (a root on an entry's value, where G = z^a is flat) fixes
    tau only to about y^(1/a) t.
    """
    if sparse:
        unique = ((y > 1e-6) & (y < 1 - 1e-6)).any(-1)
    else:
        unique = torch.ones_like(tau, dtype=torch.bool)
    unique = unique | ~torch.isfinite(ref)
    _close(tau[unique], ref[unique], atol)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,p,code", LINKS, ids=LINK_IDS)
def test_forward_and_backward_equal_cpu_and_torch(rng, monkeypatch, method, p, code, dtype):
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    atol = 1e-6 if dtype == torch.float32 else 1e-10
    for n in (1, 37):
        x, k, t = _batch(rng, 5, n, dtype)
        y, tau = _ops.forward_impl(x, k, t, code, p, 0)
        assert y.dtype == dtype and tau.dtype == torch.float64
        v = torch.from_numpy(rng.normal(size=x.shape)).to(dtype)
        gx, gk = _ops.backward_impl(y, tau, t, v, code, p, x)
        for backend in ("cpu", "torch"):
            y_ref, tau_ref = _forward(monkeypatch, backend, x, k, t, code, p)
            _close(y, y_ref, atol)
            _check_tau(tau, tau_ref, y_ref, code <= 1, atol)
            gx_ref, gk_ref = _backward(monkeypatch, backend, y_ref, tau_ref, t, v, code, p, x)
            # the Triton and cpu backwards accumulate in float64; the torch route's vjp runs in
            # the rows' dtype, whose rounding of v - c is scaled by h/t (up to 3/t for p = 4/3)
            scale = 3.0 / float(t.min()) if backend == "torch" and dtype == torch.float32 else 1.0
            rows = torch.ones_like(tau, dtype=torch.bool)
            if backend == "torch":
                # The torch route's tau is not exact where a root sits on an entry's value
                # (flat G): it leaves y ~ 1e-17 there, whose slope carries c = <h, v>/sum h
                # of an otherwise hard row. Compared on rows whose slopes sum above 1e-6.
                h = link_of_code(code, p).slope_from_value(y_ref.double()).sum(-1)
                rows = (h > 1e-6) | ~torch.isfinite(tau_ref)
            _close(gx[rows], gx_ref[rows], atol * scale)
            _close(gk[rows], gk_ref[rows], atol * scale)


def _split(monkeypatch, tile, tiles=128):
    """Sends rows longer than ``tile`` through the split route, in chunks of ``tile`` entries,
    at most ``tiles`` programs a row (more chunks a program beyond)."""
    monkeypatch.setattr(tri, "ONCHIP_MAX", tile)
    monkeypatch.setattr(tri, "SPLIT_BLOCK", tile)
    monkeypatch.setattr(tri, "SPLIT_TILES", tiles)
    monkeypatch.setattr(tri, "CHUNK", tile)


def _split_phases(x, k, t, code, p):
    """The phase of every row after the split route's steps (tri.DONE where they solved it)."""
    a_hi, a_lo = tri._exponent(code, p)
    y, tau = torch.empty_like(x), torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    low = triton_language.float64 if x.dtype == torch.float64 else triton_language.float32
    k, t = k.to(x.device, torch.float64), t.to(x.device, torch.float64)
    return tri._split_forward(x, k, t, y, tau, code, a_hi, a_lo, low)


@interpreter
@pytest.mark.parametrize("route", ["one program", "split"])
@pytest.mark.parametrize("method,p,code", LINKS, ids=LINK_IDS)
def test_row_rules_equal_cpu_route(monkeypatch, method, p, code, route):
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    x, k, t = _rule_rows(torch.float32)
    if route == "split":
        _split(monkeypatch, 4)
        assert (_split_phases(x, k, t, code, p) == tri.DONE.value).all()
    y, tau = _ops.forward_impl(x, k, t, code, p, 0)
    y_ref, tau_ref = _forward(monkeypatch, "cpu", x, k, t, code, p)
    _close(y, y_ref, 1e-6)
    _check_tau(tau, tau_ref, y_ref, code <= 1, 1e-6)
    assert (
        torch.isnan(y[0]).all()
        and torch.isnan(tau[0])
        and torch.isnan(y[9]).all()
        and torch.isnan(y[10]).all()
    )
    assert (y[1] == 0).all() and tau[1] == math.inf
    assert (y[2] == 1).all() and tau[2] == -math.inf
    assert y[3].tolist() == pytest.approx([2 / 3, 0, 2 / 3, 0, 2 / 3, 0]) and tau[3] == math.inf
    assert y[5].tolist() == [0, 1, 0, 1, 0, 0] and tau[5] == -math.inf
    assert (y[11] == 0).all() and tau[11] == -math.inf
    assert torch.isfinite(tau[[4, 6, 7, 8]]).all()
    torch.testing.assert_close(y[[4, 6, 7, 8]].double().sum(-1), k[[4, 6, 7, 8]], atol=1e-6, rtol=0)
    v = torch.linspace(-1.0, 1.0, x.numel()).reshape(x.shape)
    gx, gk = _ops.backward_impl(y, tau, t, v, code, p, x)
    gx_ref, gk_ref = _backward(monkeypatch, "cpu", y_ref, tau_ref, t, v, code, p, x)
    _close(gx, gx_ref, 1e-6)
    _close(gk, gk_ref, 1e-6)
    assert torch.isnan(gx[0]).all() and (gx[[1, 2, 3, 5, 11]] == 0).all()


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows(rng, monkeypatch, dtype):
    """float16/bfloat16 rows are read as they are and solved in float32 then float64."""
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    x, k, t = _batch(rng, 4, 24, dtype)
    for code, p in ((0, 2.0), (2, 2.0)):
        y, tau = _ops.forward_impl(x, k, t, code, p, 0)
        assert y.dtype == dtype
        y_ref, tau_ref = _forward(monkeypatch, "cpu", x.float(), k, t, code, p)
        _close(y.float(), y_ref, 1e-3 if dtype == torch.float16 else 8e-3)
        _check_tau(tau, tau_ref, y_ref, code == 0, 1e-6)
    # the public function computes in float32 and returns the input's dtype
    xg = x.clone().requires_grad_()
    y = softtopk.topk_mask(xg, 3.0, temperature=0.5)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    monkeypatch.setenv("SOFTTOPK_BACKEND", "cpu")
    xc = x.clone().requires_grad_()
    yc = softtopk.topk_mask(xc, 3.0, temperature=0.5)
    yc.float().square().sum().backward()
    _close(y.float(), yc.float(), 0.0)
    _close(xg.grad.float(), xc.grad.float(), 1e-2)


@interpreter
@pytest.mark.parametrize("onchip_max", [16, 64])
@pytest.mark.parametrize("method,p,code", LINKS, ids=LINK_IDS)
def test_rows_longer_than_the_chip_are_read_in_chunks(rng, monkeypatch, method, p, code, onchip_max):
    """One program reads its row in chunks: the forward where the split route leaves a row
    (here every regular row, after its single step), the backward of rows up to ONCHIP_MAX."""
    monkeypatch.setattr(tri, "ONCHIP_MAX", onchip_max)
    monkeypatch.setattr(tri, "CHUNK", 16)
    monkeypatch.setattr(tri, "SPLIT_STEPS", 1)
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    x, k, t = _batch(rng, 3, 50, torch.float32)
    x[0, 7] = math.inf
    y, tau = _ops.forward_impl(x, k, t, code, p, 0)
    v = torch.from_numpy(rng.normal(size=x.shape)).to(x.dtype)
    gx, gk = _ops.backward_impl(y, tau, t, v, code, p, x)
    y_ref, tau_ref = _forward(monkeypatch, "cpu", x, k, t, code, p)
    gx_ref, gk_ref = _backward(monkeypatch, "cpu", y_ref, tau_ref, t, v, code, p, x)
    _close(y, y_ref, 1e-6)
    _check_tau(tau, tau_ref, y_ref, code <= 1, 1e-6)
    _close(gx, gx_ref, 1e-6)
    _close(gk, gk_ref, 1e-6)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,p,code", LINKS, ids=LINK_IDS)
def test_split_route_equals_cpu_route(rng, monkeypatch, method, p, code, dtype):
    """Rows split over 3 programs each (float32), or 2 of 2 chunks (float64), solved by the
    split steps alone (every row done)."""
    _split(monkeypatch, 16, tiles=3 if dtype == torch.float32 else 2)
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    x, k, t = _batch(rng, 4, 40, dtype)
    x[0, 7] = math.inf
    assert (_split_phases(x, k, t, code, p) == tri.DONE.value).all()
    y, tau = _ops.forward_impl(x, k, t, code, p, 0)
    v = torch.from_numpy(rng.normal(size=x.shape)).to(x.dtype)
    gx, gk = _ops.backward_impl(y, tau, t, v, code, p, x)
    y_ref, tau_ref = _forward(monkeypatch, "cpu", x, k, t, code, p)
    gx_ref, gk_ref = _backward(monkeypatch, "cpu", y_ref, tau_ref, t, v, code, p, x)
    atol = 1e-6 if dtype == torch.float32 else 1e-9
    _close(y, y_ref, atol)
    _check_tau(tau, tau_ref, y_ref, code <= 1, atol)
    _close(gx, gx_ref, atol)
    _close(gk, gk_ref, atol)


@interpreter
@pytest.mark.parametrize("method,p,code", LINKS, ids=LINK_IDS)
def test_split_route_leaves_unsolved_rows_to_one_program(rng, monkeypatch, method, p, code):
    """With too few split steps, the rows still being solved are finished one program per row."""
    _split(monkeypatch, 16)
    monkeypatch.setattr(tri, "SPLIT_STEPS", 3)
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    x, k, t = _batch(rng, 4, 40, torch.float32)
    k[2] = 0.0  # a ruled row, done at the first step
    phases = _split_phases(x, k, t, code, p)
    assert phases[2] == tri.DONE.value and (phases != tri.DONE.value).any()
    y, tau = _ops.forward_impl(x, k, t, code, p, 0)
    y_ref, tau_ref = _forward(monkeypatch, "cpu", x, k, t, code, p)
    _close(y, y_ref, 1e-6)
    _check_tau(tau, tau_ref, y_ref, code <= 1, 1e-6)


@interpreter
def test_public_function_and_autograd_on_the_triton_route(rng, monkeypatch):
    x, k, _ = _batch(rng, 3, 12, torch.float64)
    k = k.clamp(0.5, 11.5).requires_grad_()
    results = {}
    for backend in ("triton", "cpu"):
        monkeypatch.setenv("SOFTTOPK_BACKEND", backend)
        xs = x.clone().requires_grad_()
        ks = k.detach().clone().requires_grad_()
        y = softtopk.topk_mask(xs, ks, method="sparse", p=1.5, temperature=0.3)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
        results[backend] = (y.detach(), xs.grad, ks.grad)
    for a, b in zip(results["triton"], results["cpu"], strict=True):
        _close(a, b, 1e-10)


@interpreter
@pytest.mark.parametrize("method,p", [("sparse", 4.0 / 3.0), ("entropic", 2.0)])
def test_gradcheck_float64(monkeypatch, method, p):
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    x = torch.tensor([[0.3, -0.2, 0.9, 0.5, 0.1]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda a, b: softtopk.topk_mask(a, b, method=method, p=p, temperature=0.5),
        (x, k),
        eps=1e-6,
        atol=1e-6,
    )


class _SyncCounter:
    """Counts host reads of tensor values: item, bool, tolist, float, int, numpy."""

    NAMES = ("item", "__bool__", "tolist", "__float__", "__int__", "numpy")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return counted


@interpreter
@pytest.mark.parametrize("route", ["one program", "split"])
@pytest.mark.parametrize("method,p,code", LINKS, ids=LINK_IDS)
def test_no_host_sync_in_forward_and_backward(rng, monkeypatch, method, p, code, route):
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    if route == "split":
        _split(monkeypatch, 8)
    x, k, t = _batch(rng, 3, 20, torch.float32)
    v = torch.from_numpy(rng.normal(size=x.shape)).to(x.dtype)
    counter = _SyncCounter(monkeypatch)
    y, tau = _ops.forward_impl(x, k, t, code, p, 0)
    _ops.backward_impl(y, tau, t, v, code, p, x)
    assert counter.calls == []
    # the whole public call, k a number: front end, op and autograd
    xs = x.clone().requires_grad_()
    softtopk.topk_mask(xs, 4.0, method=method, p=p, temperature=0.5).backward(v)
    assert counter.calls == []


@interpreter
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(tri, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tri.forward(torch.zeros(2, 3), torch.ones(2), torch.ones(2), 0, 2.0)


@interpreter
@pytest.mark.slow
@pytest.mark.parametrize(
    "method,p,link",
    [
        ("sparse", 2.0, "sparse"),
        ("sparse", 1.5, "sparse"),
        ("entropic", 2.0, "logistic"),
        ("lapsum", 2.0, "laplace"),
    ],
)
@pytest.mark.parametrize("route", ["one program", "split"])
def test_float64_oracles(rng, monkeypatch, method, p, link, route):
    """Independent float64 oracles: bisection for every link, the isotonic route for p = 2."""
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    if route == "split":
        _split(monkeypatch, 16, tiles=2)  # rows of 20 and 64 entries: 2 programs of 1 and 2 chunks
    for n in (3, 20, 64):
        x, k, t = _batch(rng, 8, n, torch.float64)
        for temperature in (0.05, 1.0):
            y = softtopk.topk_mask(x, k, method=method, p=p, temperature=temperature).numpy()
            xs, ks = x.numpy(), k.numpy()
            ref = np.stack(
                [
                    oracles.bisection_mask(xs[i], float(ks[i]), t=temperature, link=link, p=p)
                    for i in range(len(xs))
                ]
            )
            np.testing.assert_allclose(y, ref, atol=1e-10, rtol=0)
            if p == 2.0 and link == "sparse":
                iso = np.stack(
                    [oracles.isotonic_sparse_mask(xs[i], float(ks[i]), l=temperature) for i in range(len(xs))]
                )
                np.testing.assert_allclose(y, iso, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [8, 1000, 40_000, 600_000])
@pytest.mark.parametrize("method,p,code", LINKS, ids=LINK_IDS)
def test_cuda_equals_cpu_route_without_sync(rng, monkeypatch, method, p, code, n, dtype):
    pytest.importorskip("numba")
    x, k, t = _batch(rng, 6, n, dtype)
    v = torch.from_numpy(rng.normal(size=x.shape)).to(dtype)
    xg, kg, tg, vg = x.cuda(), k.cuda(), t.cuda(), v.cuda()
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    torch.cuda.set_sync_debug_mode("error")
    try:
        if n > tri._onchip_max(dtype):
            # the split steps solve every row (the one-program fallback would hide a failure)
            phases = _split_phases(xg, kg, tg, code, p)
        y, tau = _ops.forward_impl(xg, kg, tg, code, p, 0)
        gx, gk = _ops.backward_impl(y, tau, tg, vg, code, p, xg)
        xs = xg.clone().requires_grad_()
        softtopk.topk_mask(xs, 3.0, method=method, p=p, temperature=0.5).backward(vg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if n > tri._onchip_max(dtype):
        left = (phases.cpu() != tri.DONE.value).nonzero().flatten().tolist()
        assert not left, f"rows {left} were left to the one-program fallback after {tri.SPLIT_STEPS} steps"
    atol = 1e-6 if dtype == torch.float32 else 1e-10
    y_ref, tau_ref = _forward(monkeypatch, "cpu", x, k, t, code, p)
    gx_ref, gk_ref = _backward(monkeypatch, "cpu", y_ref, tau_ref, t, v, code, p, x)
    _close(y.cpu(), y_ref, atol)
    _check_tau(tau.cpu(), tau_ref, y_ref, code <= 1, atol)
    _close(gx.cpu(), gx_ref, atol)
    _close(gk.cpu(), gk_ref, atol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,p,code", LINKS, ids=LINK_IDS)
def test_cuda_half_precision_and_rules_without_sync(monkeypatch, method, p, code, dtype):
    pytest.importorskip("numba")
    x, k, t = _rule_rows(torch.float32)
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, tau = _ops.forward_impl(x.to("cuda", dtype), k.cuda(), t.cuda(), code, p, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.dtype == dtype
    y_ref, tau_ref = _forward(monkeypatch, "cpu", x.to(dtype).float(), k, t, code, p)
    _close(y.cpu().float(), y_ref, 1e-3 if dtype == torch.float16 else 8e-3)
    _check_tau(tau.cpu(), tau_ref, y_ref, code <= 1, 1e-6)


def _near_hard_rows(rng, rows, dtype):  # noqa: ANN001
    """Rows of 40 entries with gaps of 0.3 to 3 between neighbours, shuffled; row 3 has
    a +inf and a -inf entry. At t = 0.05 to 1e-4 their entries saturate."""
    n = 40
    gaps = torch.from_numpy(rng.uniform(0.3, 3.0, size=(rows, n)))
    x = (gaps.cumsum(-1) - gaps.sum(-1, keepdim=True) / 2).to(dtype)
    x = x[:, torch.from_numpy(rng.permutation(n))]
    x[3, 5], x[3, 9] = math.inf, -math.inf
    return x


def _dense_gradients_close(gx, gk, gx_ref, gk_ref, rtol):  # noqa: ANN001
    """grad_k to rtol (O(1) on every row), grad_x to rtol of each row's largest."""
    assert gk_ref.abs().min() > 1e-3
    torch.testing.assert_close(gk, gk_ref, rtol=rtol, atol=1e-12)
    scale = gx_ref.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(gx_ref.dtype).tiny)
    torch.testing.assert_close(gx / scale, gx_ref / scale, rtol=0, atol=rtol)


@interpreter
@pytest.mark.parametrize("route", ["one program", "chunks", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("code", [2, 3], ids=["entropic", "lapsum"])
def test_dense_backward_near_the_hard_mask_equals_the_cpu_route(rng, monkeypatch, code, dtype, route):
    """Rows whose entries saturate (t = 0.05 to 1e-3 over gaps of 0.3 to 3): the slopes come
    from x, and c from slopes scaled by the row's largest, on every Triton route; on the
    last two rows every |z| exceeds 745, so every slope underflows in float64."""
    if route == "chunks":
        monkeypatch.setattr(tri, "CHUNK", 16)
    elif route == "split":
        _split(monkeypatch, 16, tiles=3)
    x = _near_hard_rows(rng, 4, dtype)
    k = torch.tensor([2.0, 5.0, 3.0, 4.0], dtype=torch.float64)
    t = torch.tensor([0.05, 0.02, 1e-3, 1e-4], dtype=torch.float64)
    v = torch.from_numpy(rng.normal(size=x.shape)).to(dtype)
    y, tau = _forward(monkeypatch, "cpu", x, k, t, code, 2.0)
    gx_ref, gk_ref = _backward(monkeypatch, "cpu", y, tau, t, v, code, 2.0, x)
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    gx, gk = _ops.backward_impl(y, tau, t, v, code, 2.0, x)
    _dense_gradients_close(gx, gk, gx_ref, gk_ref, 1e-6 if dtype == torch.float32 else 1e-9)


@interpreter
@pytest.mark.parametrize("route", ["one program", "chunks", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("code", [2, 3], ids=["entropic", "lapsum"])
def test_dense_forward_near_the_hard_mask_equals_the_cpu_route(rng, monkeypatch, code, dtype, route):
    """The Triton forward's tau on rows whose entries saturate, and the gradient in k from it.

    tau lies in a gap between two entries where sum G is within rounding of k; it is
    solved from (count above - k) + fractions, scaled by e^(smallest |z|), as on the CPU
    route, so it is exact there (a solve from sum G - k stops anywhere in the gap, and
    grad_k = c, a ratio of slopes e^(-|z|), is then off by O(1)). The last two rows have
    every |z| beyond 745 (every slope underflows in float64); whole and fractional k.
    """
    if route == "chunks":
        monkeypatch.setattr(tri, "ONCHIP_MAX", 16)
        monkeypatch.setattr(tri, "CHUNK", 16)
        monkeypatch.setattr(tri, "SPLIT_STEPS", 1)  # (a row left unsolved by one step: the chunks)
    elif route == "split":
        _split(monkeypatch, 16, tiles=3)
    x = _near_hard_rows(rng, 6, dtype)
    k = torch.tensor([2.0, 5.0, 3.0, 4.0, 7.0, 2.5], dtype=torch.float64)
    t = torch.tensor([0.05, 0.02, 1e-3, 1e-4, 2e-4, 1e-3], dtype=torch.float64)
    v = torch.from_numpy(rng.normal(size=x.shape)).to(dtype)
    y_ref, tau_ref = _forward(monkeypatch, "cpu", x, k, t, code, 2.0)
    gx_ref, gk_ref = _backward(monkeypatch, "cpu", y_ref, tau_ref, t, v, code, 2.0, x)
    monkeypatch.setenv("SOFTTOPK_BACKEND", "triton")
    y, tau = _ops.forward_impl(x, k, t, code, 2.0, 0)
    gx, gk = _ops.backward_impl(y, tau, t, v, code, 2.0, x)
    # tau within 8 ulps of the row's largest finite magnitude (and 1e-12 t)
    ulp = torch.finfo(torch.float64).eps * 8 * x.abs().masked_fill(~x.isfinite(), 0).amax(-1).double()
    assert ((tau - tau_ref).abs() <= ulp + 1e-12 * t).all(), ((tau - tau_ref) / t).tolist()
    _close(y, y_ref, 1e-6 if dtype == torch.float32 else 1e-12)
    _dense_gradients_close(gx, gk, gx_ref, gk_ref, 1e-5 if dtype == torch.float32 else 1e-8)

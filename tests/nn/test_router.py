"""TopKRouter / topk_route / moe_dispatch: V-MoE routing with any mask operator."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from softtopk.nn import TopKRouter
from softtopk.nn.functional import expert_capacity, moe_dispatch, topk_route
from softtopk.registry import OPERATORS

METHODS = ["sparse", "sparse-p4/3", "entropic", "lapsum", "hard"]


@pytest.mark.parametrize("method", METHODS)
def test_gates_are_softmax_times_the_mask(method):
    logits = torch.randn(5, 7, 8, dtype=torch.float64)
    out = topk_route(logits, 2, method=method, temperature=0.3)
    mask = OPERATORS[method](logits, 2, temperature=0.3)
    torch.testing.assert_close(out.mask, mask)
    torch.testing.assert_close(out.probs, torch.softmax(logits, -1))
    torch.testing.assert_close(out.gates, torch.softmax(logits, -1) * mask)
    torch.testing.assert_close(out.active, (out.gates > 0).sum(-1))
    assert out.gates.shape == logits.shape and out.active.shape == logits.shape[:-1]


def test_hard_router_is_vmoe_and_magnitude_operator_smooths_it():
    logits = torch.randn(50, 16)
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, 2, dim=-1)
    vmoe = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(topk_route(logits, 2, method="hard").gates, vmoe)
    # topk_mag of the probabilities tends to V-MoE's TOP_k as l -> 0.
    torch.testing.assert_close(topk_route(logits, 2, method="magnitude", temperature=1e-6).gates, vmoe)


def test_sparse_router_activates_k_experts_on_separated_logits():
    base = torch.arange(16, dtype=torch.float32)
    logits = torch.stack([base[torch.randperm(16)] for _ in range(64)])  # gaps of 1 > t
    out = topk_route(logits, 2, method="sparse", temperature=0.5)
    assert (out.active == 2).all()
    dense = topk_route(logits, 2, method="entropic", temperature=0.5)
    assert (dense.active == 16).all()  # a dense relaxation runs every expert


def test_normalize():
    out = topk_route(torch.randn(9, 6), 2, renormalize=True, temperature=0.3)
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(9))


@pytest.mark.parametrize("priority", ["gate", "position"])
def test_capacity(priority):
    torch.manual_seed(0)
    T, E, k, cf = 64, 4, 2, 0.5
    logits = torch.randn(T, E)
    logits[:, 0] += 3.0  # everyone wants expert 0
    free = topk_route(logits, k, method="hard")
    out = topk_route(logits, k, method="hard", capacity_factor=cf, priority=priority)
    C = expert_capacity(T, E, k, cf)
    assert C == 16
    per_expert = (out.gates > 0).sum(0)
    assert (per_expert <= C).all() and per_expert[0] == C
    assigned = free.gates > 0
    assert out.dropped.item() == int((assigned & (out.gates == 0)).sum())
    assert out.dropped.item() == int(((free.gates > 0).sum(0) - per_expert).sum())
    kept = out.gates[:, 0] > 0
    if priority == "position":  # the first C tokens that chose expert 0
        first = assigned[:, 0].nonzero().squeeze(-1)[:C]
        assert kept.nonzero().squeeze(-1).tolist() == first.tolist()
    else:  # the C largest gates of expert 0
        assert free.gates[kept, 0].min() >= free.gates[assigned[:, 0] & ~kept, 0].max()
    # Kept gates are unchanged.
    torch.testing.assert_close(out.gates[out.gates > 0], free.gates[out.gates > 0])


def test_aux_and_z_losses_against_loops():
    logits = torch.randn(40, 5, dtype=torch.float64)
    out = topk_route(logits, 2, method="sparse", temperature=0.5)
    probs = torch.softmax(logits, -1)
    counts = [sum(1 for t in range(40) if out.mask[t, e] > 0) for e in range(5)]
    f = [c / sum(counts) for c in counts]
    P = [probs[:, e].mean().item() for e in range(5)]
    assert out.aux_loss.item() == pytest.approx(5 * sum(a * b for a, b in zip(f, P, strict=True)))
    z = sum(torch.logsumexp(logits[t], 0).item() ** 2 for t in range(40)) / 40
    assert out.z_loss.item() == pytest.approx(z)
    # Perfect balance gives 1.
    balanced = topk_route(torch.zeros(8, 4), 1, method="hard")
    assert balanced.aux_loss.item() == pytest.approx(1.0) or balanced.aux_loss.item() >= 1.0
    eye = topk_route(torch.eye(4).repeat(2, 1) * 5, 1, method="hard")
    assert eye.aux_loss.item() == pytest.approx(1.0)


def _on_route(route, fn, *args, **kwargs):
    before = os.environ.get("SOFTTOPK_BACKEND")
    os.environ["SOFTTOPK_BACKEND"] = route
    try:
        return fn(*args, **kwargs)
    finally:
        if before is None:
            del os.environ["SOFTTOPK_BACKEND"]
        else:
            os.environ["SOFTTOPK_BACKEND"] = before


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("method", ["hard", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bookkeeping_kernel_equals_the_tensor_ops(score, method, dtype):
    """The CPU route's one-pass z-loss, aux loss, load and active against the torch route."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 6, generator=g, dtype=dtype) * 3
    logits[5] = -math.inf  # a token with no finite logit
    logits[7, 2] = math.inf
    logits[9, 1] = math.nan
    outs = [
        _on_route(r, topk_route, logits, 2, method=method, temperature=0.5, score=score)
        for r in ("cpu", "torch")
    ]
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for name in ("aux_loss", "z_loss", "load", "active", "dropped"):
        torch.testing.assert_close(getattr(outs[0], name), getattr(outs[1], name), equal_nan=True, **tol)
    finite = logits[10:]
    outs = [
        _on_route(r, topk_route, finite, 2, method=method, temperature=0.5, score=score)
        for r in ("cpu", "torch")
    ]
    assert torch.isfinite(outs[0].z_loss) and torch.isfinite(outs[0].aux_loss)
    for name in ("aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(outs[0], name), getattr(outs[1], name), **tol)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a batch this large runs in parallel chunks
    try:
        big = torch.randn(6000, 8, generator=g, dtype=dtype)
        outs = [
            _on_route(r, topk_route, big, 2, method=method, temperature=0.5, score=score)
            for r in ("cpu", "torch")
        ]
    finally:
        torch.set_num_threads(threads)
    for name in ("aux_loss", "z_loss", "load", "active"):
        torch.testing.assert_close(getattr(outs[0], name), getattr(outs[1], name), **tol)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bookkeeping_kernel_derivatives(score):
    """Gradients (first and second order) and forward mode of the losses on the CPU route."""
    from torch.autograd.forward_ad import dual_level, make_dual, unpack_dual

    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)

    def losses(v):
        out = topk_route(v, 2, method="sparse", temperature=0.7, score=score)
        return out.z_loss + 0.3 * out.aux_loss

    assert _on_route("cpu", torch.autograd.gradcheck, losses, (x,))
    assert _on_route("cpu", torch.autograd.gradgradcheck, losses, (x,))
    grads = [_on_route(r, lambda: torch.autograd.grad(losses(x), x)[0]) for r in ("cpu", "torch")]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    tangent = torch.randn_like(x)
    for route in ("cpu", "torch"):
        with dual_level():
            dual = _on_route(route, losses, make_dual(x.detach(), tangent))
            jvp = unpack_dual(dual).tangent
        torch.testing.assert_close(jvp, (grads[1] * tangent).sum(), rtol=1e-12, atol=1e-12)


def _with_specials(logits):
    """Logits with a NaN row, a +inf logit, a row of -inf and a -inf entry (padding)."""
    logits = logits.clone()
    logits[1, 2] = math.nan
    logits[3, 0] = math.inf
    logits[4] = -math.inf
    logits[6, 1] = -math.inf
    return logits


def _route_outputs(monkeypatch, fused, logits, k, **options):
    """(gates, probs, mask, aux_loss, z_loss) and their gradients, fused or composite (CPU route)."""
    from softtopk.nn import _router

    calls = []
    apply = _router._FusedGates.apply

    def counted(*args):
        calls.append(1)
        return apply(*args)

    with monkeypatch.context() as m:
        m.setenv("SOFTTOPK_BACKEND", "cpu")
        m.setattr(_router._FusedGates, "apply", counted)
        if not fused:
            m.setattr(_router, "_fused_gates", lambda *args: None)
        x = logits.clone().requires_grad_()
        kk = k.clone().requires_grad_() if isinstance(k, torch.Tensor) else k
        out = topk_route(x, kk, **options)
        weights = torch.linspace(-1.0, 2.0, logits.shape[-1], dtype=logits.dtype)
        loss = (
            (out.gates * weights).nansum() + (out.probs * weights.flip(0)).nansum() + (out.mask**2).nansum()
        )
        loss = loss + 0.3 * out.aux_loss.nan_to_num() + 0.1 * out.z_loss.nan_to_num()
        inputs = [x, kk] if isinstance(kk, torch.Tensor) else [x]
        grads = torch.autograd.grad(loss, inputs)
    assert len(calls) == (1 if fused else 0)
    return (out.gates, out.probs, out.mask, out.aux_loss, out.z_loss, *grads)


def _fused_equals_composite(monkeypatch, logits, k, tol, equal_nan=False, **options):  # noqa: ANN001
    """The fused and the composite route's outputs and gradients agree; returns the fused ones."""
    fused = _route_outputs(monkeypatch, True, logits, k, **options)
    composite = _route_outputs(monkeypatch, False, logits, k, **options)
    for a, b in zip(fused, composite, strict=True):
        torch.testing.assert_close(a, b, equal_nan=equal_nan, **tol)
    return fused


@pytest.mark.parametrize("method", ["sparse", "sparse-p4/3", "entropic", "lapsum"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("experts", [8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_gates_equal_the_composite(monkeypatch, method, score, experts, dtype):
    """The one-pass gates (scores, mask and product in one kernel) against the composite ops.

    Both run the same threshold kernel on the same selection scores, so masks agree to
    rounding; 8 experts take the kernel's softmax, 40 torch's. Rows with NaN, +inf and
    -inf logits follow torch.softmax and the row rules.
    """
    g = torch.Generator().manual_seed(experts)
    logits = _with_specials(torch.randn(70, experts, generator=g, dtype=dtype) * 2)
    bias = torch.randn(experts, generator=g, dtype=dtype) * 0.3
    k = torch.rand(70, generator=g, dtype=torch.float64) * 3 + 0.5  # per-token budgets, in the gradient
    tol = {"rtol": 2e-6, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    for options in ({}, {"expert_bias": bias}):
        options = {"method": method, "temperature": 0.4, "score": score, **options}
        fused = _fused_equals_composite(monkeypatch, logits, k, tol, equal_nan=True, **options)
        assert torch.isnan(fused[0][1]).all() and torch.isfinite(fused[0][2:]).all() == (score == "sigmoid")
    # parallel chunks (a batch this large runs on two threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        from softtopk._backend import SERIAL_ELEMENTS

        big = torch.randn(SERIAL_ELEMENTS // experts + 100, experts, generator=g, dtype=dtype)
        fused = _route_outputs(monkeypatch, True, big, 2, method=method, temperature=0.4, score=score)
        composite = _route_outputs(monkeypatch, False, big, 2, method=method, temperature=0.4, score=score)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(fused, composite, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("method", ["sparse", "sparse-p4/3", "entropic"])
def test_fused_gates_of_more_experts_than_the_block_scan_equal_the_composite(monkeypatch, method):
    """Rows beyond BLOCK_SCAN entries take the backward's block scan, which needs the power
    link's scratch for its support (a router once passed an empty one there)."""
    from softtopk.threshold._cpu import BLOCK_SCAN

    g = torch.Generator().manual_seed(7)
    for experts in (BLOCK_SCAN + 1, 2 * BLOCK_SCAN + 37):
        logits = torch.randn(3, experts, generator=g, dtype=torch.float64) * 3
        tol = {"rtol": 1e-11, "atol": 1e-11}
        _fused_equals_composite(monkeypatch, logits, 8, tol, method=method, temperature=0.5)


@pytest.mark.parametrize("method", ["entropic", "lapsum"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("experts", [8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_dense_gates_near_the_hard_mask_equal_the_composite(monkeypatch, method, score, experts, dtype):
    """Whole per-token budgets at t = 0.005: most rows' mask entries saturate.

    The dense links' backward takes its slopes from u = logits (+ bias), recomputed in
    the fused kernel: the gradient in k there is the composite's (which
    tests/threshold/test_function.py checks against a 40-digit oracle), not the one a
    slope read off the rounded mask would give.
    """
    g = torch.Generator().manual_seed(experts + 1)
    logits = torch.randn(64, experts, generator=g, dtype=dtype) * 3
    bias = torch.randn(experts, generator=g, dtype=dtype) * 0.3
    k = torch.randint(1, 4, (64,), generator=g).to(torch.float64)
    tol = {"rtol": 2e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    for options in ({}, {"expert_bias": bias}):
        options = {"method": method, "temperature": 0.005, "score": score, **options}
        fused = _fused_equals_composite(monkeypatch, logits, k, tol, **options)
        grad_k = fused[-1]
        assert grad_k.abs().max() > 0.1  # not vacuous: the budgets' gradient is O(1)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("method", ["sparse", "sparse-p4/3", "entropic"])
def test_fused_gates_derivatives(score, method):
    """gradcheck and gradgradcheck of the one-pass gates in x and a per-token k; forward mode."""
    from torch.autograd.forward_ad import dual_level, make_dual, unpack_dual

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    k = torch.tensor(
        [1.3, 2.2, 2.5, 1.5, 2.8, 0.7], dtype=torch.float64, requires_grad=True
    )  # (not whole: no kinks)
    bias = torch.randn(7, generator=g, dtype=torch.float64) * 0.2

    def outputs(v, kk):
        out = topk_route(v, kk, method=method, temperature=0.6, score=score, expert_bias=bias)
        return out.gates, out.probs, out.mask

    assert _on_route("cpu", torch.autograd.gradcheck, outputs, (x, k))
    assert _on_route("cpu", torch.autograd.gradgradcheck, outputs, (x, k))
    tangent = torch.randn_like(x)
    weights = [torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(3)]

    def scalar(v):
        return sum((o * w).sum() for o, w in zip(outputs(v, k.detach()), weights, strict=True))

    grad = _on_route("cpu", lambda: torch.autograd.grad(scalar(x), x)[0])
    with dual_level():
        jvp = unpack_dual(_on_route("cpu", scalar, make_dual(x.detach(), tangent))).tangent
    torch.testing.assert_close(jvp, (grad * tangent).sum(), rtol=1e-12, atol=1e-12)


def test_fused_gates_differentiated_again_keep_the_bias_of_their_forward(monkeypatch):
    """An in-place update of the bias (TopKRouter.update_bias) between the forward and a
    create_graph backward leaves the second derivatives those of the forward's bias."""
    from softtopk.nn import _router

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(20, 6, generator=g, dtype=torch.float64)
    w = torch.randn(20, 6, generator=g, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            m.setenv("SOFTTOPK_BACKEND", "cpu")
            if not fused:
                m.setattr(_router, "_fused_gates", lambda *args: None)
            bias = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64)
            x = logits.clone().requires_grad_()
            out = topk_route(x, 2, method="sparse-p4/3", temperature=0.5, expert_bias=bias)
            bias += torch.linspace(0.0, 3.0, 6, dtype=torch.float64)  # the layer's buffer, in place
            (gx,) = torch.autograd.grad((out.gates * w).sum(), x, create_graph=True)
            (ggx,) = torch.autograd.grad(gx.square().sum(), x)
            grads.append((gx.detach(), ggx))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("x_grad,k_grad", [(True, False), (False, True), (True, True), (False, False)])
def test_fused_gates_require_grad_as_the_composite(monkeypatch, x_grad, k_grad):
    """Which outputs require grad follows the composite ops: the scores depend on the logits only."""
    from softtopk.nn import _router

    flags = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            m.setenv("SOFTTOPK_BACKEND", "cpu")
            if not fused:
                m.setattr(_router, "_fused_gates", lambda *args: None)
            x = torch.randn(10, 6).requires_grad_(x_grad)
            k = torch.full((10,), 2.5, dtype=torch.float64).requires_grad_(k_grad)
            out = topk_route(x, k, method="sparse", temperature=0.5)
            outputs = (out.gates, out.probs, out.mask, out.aux_loss, out.z_loss)
            flags.append([t.requires_grad for t in outputs])
    assert flags[0] == flags[1]


def test_dispatch_runs_only_experts_with_nonzero_gates():
    torch.manual_seed(0)
    T, D, E = 30, 6, 8
    experts = [torch.nn.Linear(D, 3) for _ in range(E)]
    calls: list[tuple[int, int]] = []
    for e, ex in enumerate(experts):
        ex.register_forward_hook(lambda mod, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    x = torch.randn(T, D)
    out = topk_route(torch.randn(T, E), 2, method="sparse", temperature=0.2)
    y = moe_dispatch(x, out.gates, experts)
    # Each expert ran once, on exactly its tokens; experts with no token never ran.
    rows = dict(calls)
    assert len(calls) == len(rows)
    for e in range(E):
        assert rows.get(e, 0) == int((out.gates[:, e] > 0).sum())
    assert sum(rows.values()) == int(out.active.sum())
    reference = sum(out.gates[:, e : e + 1] * experts[e](x) for e in range(E))
    torch.testing.assert_close(y, reference)
    # Leading dims and the all-zero case.
    y3 = moe_dispatch(x.reshape(5, 6, D), out.gates.reshape(5, 6, E), experts)
    torch.testing.assert_close(y3, reference.reshape(5, 6, 3))
    calls.clear()
    assert (moe_dispatch(x, torch.zeros(T, E), experts) == 0).all() and not calls


def test_module_equals_function_state_dict_and_gradcheck():
    torch.manual_seed(0)
    router = TopKRouter(6, 5, k=2, method="lapsum", temperature=0.4, capacity_factor=2.0, bias=True)
    x = torch.randn(3, 4, 6)
    expected = topk_route(
        F.linear(x, router.proj.weight, router.proj.bias),
        2,
        method="lapsum",
        temperature=0.4,
        capacity_factor=2.0,
    )
    for got, want in zip(router(x), expected, strict=True):
        torch.testing.assert_close(got, want)
    restored = TopKRouter(6, 5, k=2, method="lapsum", temperature=0.4, capacity_factor=2.0, bias=True)
    restored.load_state_dict(router.state_dict())
    torch.testing.assert_close(restored(x).gates, router(x).gates)
    buffer = io.BytesIO()
    torch.save(router, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x).gates, router(x).gates)
    assert "method='lapsum'" in repr(router)
    # gradcheck through the module (float64, tiny), in the input and the router weight.
    r64 = TopKRouter(3, 4, k=2, method="sparse", temperature=1.0).double()
    x64 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: r64(z).gates, (x64,))
    w = r64.proj.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda weight: topk_route(x64.detach() @ weight.T, 2, method="sparse", temperature=1.0).gates, (w,)
    )


def test_noise_only_in_training():
    router = TopKRouter(4, 6, k=2, noise_std=1.0)
    x = torch.randn(10, 4)
    router.eval()
    torch.testing.assert_close(router(x).gates, router(x).gates)
    router.train()
    assert not torch.equal(router(x).gates, router(x).gates)


@pytest.mark.slow
def test_compile_equals_eager():
    torch.manual_seed(0)
    router = TopKRouter(8, 6, k=2, method="sparse", temperature=0.3, capacity_factor=1.5)
    x = torch.randn(32, 8)
    compiled = torch.compile(router, fullgraph=True)
    got, want = compiled(x), router(x)
    for name in ("gates", "probs", "mask", "z_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))
    # The counts are discontinuous where a mask entry is at the edge of the support: an
    # entry of 1e-8 in one and 0 in the other (rounding) changes them. Compare them where
    # no entry is that close to the edge.
    edge = ((want.mask > 0) & (want.mask < 1e-4)) | ((got.mask > 0) & (got.mask < 1e-4))
    if not edge.any():
        for name in ("active", "aux_loss", "dropped"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name))
    hard = TopKRouter(8, 6, k=2, method="hard", capacity_factor=1.5)
    hard.load_state_dict(router.state_dict())
    got, want = torch.compile(hard, fullgraph=True)(x), hard(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_small_training_run_keeps_fewer_than_k_plus_one_experts():
    """A sparse-router MoE trains and runs fewer than k + 1 experts per token on average."""
    torch.manual_seed(0)
    E, k, D = 8, 2, 16
    X = torch.randn(512, D)
    y = (X[:, :4].sum(-1) > 0).long() + 2 * (X[:, 4:8].sum(-1) > 0).long()
    embed, head = torch.nn.Linear(D, 32), torch.nn.Linear(32, 4)
    router = TopKRouter(32, E, k=k, method="sparse", temperature=0.1)
    experts = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
        for _ in range(E)
    )
    params = [*embed.parameters(), *head.parameters(), *router.parameters(), *experts.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    active, losses = [], []
    for step in range(60):
        idx = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(step))
        h = torch.relu(embed(X[idx]))
        route = router(h)
        h = h + moe_dispatch(h, route.gates, experts)
        loss = F.cross_entropy(head(h), y[idx]) + 0.01 * route.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        active.append(route.active.float().mean().item())
        losses.append(loss.item())
    mean_active = sum(active) / len(active)
    assert mean_active < k + 1, mean_active  # measured: 2.74 (last 20 steps: 2.56)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_bad_input():
    with pytest.raises(ValueError, match="num_experts"):
        TopKRouter(4, 0)
    with pytest.raises(ValueError, match="k must be"):
        TopKRouter(4, 3, k=4)
    with pytest.raises(ValueError, match="unknown method"):
        TopKRouter(4, 3, method="nope")
    with pytest.raises(ValueError, match="capacity_factor"):
        topk_route(torch.randn(3, 4), 1, capacity_factor=0.0)
    with pytest.raises(ValueError, match="priority"):
        topk_route(torch.randn(3, 4), 1, priority="random")
    with pytest.raises(ValueError, match="gates must have"):
        moe_dispatch(torch.randn(3, 2), torch.randn(4, 2), [math.sin, math.cos])
    with pytest.raises(ValueError, match="experts were given"):
        moe_dispatch(torch.randn(3, 2), torch.randn(3, 2), [math.sin])


# --- Routing options -------------------------------------------------------------------


def _mixtral(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Hand-written Mixtral router: softmax, top-k, renormalise over the chosen experts."""
    out = torch.zeros_like(logits)
    for t in range(logits.shape[0]):
        probs = [math.exp(v) for v in logits[t].tolist()]
        total = sum(probs)
        probs = [p / total for p in probs]
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:k]
        norm = sum(probs[e] for e in chosen)
        for e in chosen:
            out[t, e] = probs[e] / norm
    return out


def test_softmax_topk_renormalise_is_mixtral():
    logits = torch.randn(40, 8, dtype=torch.float64)
    out = topk_route(logits, 2, method="hard", renormalize=True)
    torch.testing.assert_close(out.gates, _mixtral(logits, 2))
    assert (out.active == 2).all()


def test_sigmoid_scores_with_bias_are_deepseek_v3():
    torch.manual_seed(0)
    logits = torch.randn(30, 8, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    out = topk_route(logits, 3, method="hard", score="sigmoid", expert_bias=bias, renormalize=True)
    s = torch.sigmoid(logits)
    for t in range(30):
        chosen = sorted(range(8), key=lambda e: -(s[t, e] + bias[e]).item())[:3]
        want = torch.zeros(8, dtype=torch.float64)
        want[chosen] = s[t, chosen] / s[t, chosen].sum()
        torch.testing.assert_close(out.gates[t], want)
    torch.testing.assert_close(out.probs, s)


@pytest.mark.parametrize("method", ["hard", "sparse", "entropic"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_never_enters_the_gate_values(method, score):
    logits = torch.randn(25, 6, dtype=torch.float64, requires_grad=True)
    bias = (3 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    out = topk_route(logits, 2, method=method, score=score, expert_bias=bias, temperature=0.3)
    plain = topk_route(logits, 2, method=method, score=score, temperature=0.3)
    # The gates are the unbiased scores times the (biased) selection.
    torch.testing.assert_close(out.gates, plain.probs * out.mask)
    assert not torch.equal(out.mask, plain.mask)  # the bias moved the selection
    out.gates.sum().backward()
    assert bias.grad is None  # outside the gradient


def test_update_bias_step_and_it_balances_a_skewed_router():
    router = TopKRouter(4, 4, k=1, method="hard", bias_rate=0.1)
    router.update_bias(torch.tensor([6.0, 2.0, 0.0, 4.0]))  # mean 3
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))
    router.update_bias(torch.tensor([3.0, 3.0, 3.0, 3.0]))  # balanced: no move
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))
    with pytest.raises(ValueError, match="load must have shape"):
        router.update_bias(torch.ones(3))
    # A router with a skewed projection balances itself through the forward updates.
    torch.manual_seed(0)
    router = TopKRouter(8, 8, k=2, method="hard", bias_rate=0.01)
    with torch.no_grad():
        router.proj.weight.add_(torch.linspace(0, 0.3, 8)[:, None])  # later experts favoured
    x = torch.randn(512, 8).abs()
    before = router(x).load
    for _ in range(200):
        out = router(x)
    after = out.load
    assert before.max() / before.mean() > 3.0  # measured: 496 / 128
    assert after.max() / after.mean() < 1.1, after  # measured: 133 / 128
    # Manual mode leaves the bias to the caller; eval never updates it.
    manual = TopKRouter(8, 8, k=2, bias_rate=0.1, bias_update="manual")
    manual(x)
    assert (manual.expert_bias == 0).all()
    router.eval()
    frozen = router.expert_bias.clone()
    router(x)
    torch.testing.assert_close(router.expert_bias, frozen)


def _group_limited_topk(u: torch.Tensor, k: int, n_groups: int, topk_groups: int, top2: bool) -> torch.Tensor:
    """Brute force: rank the groups, keep the best ``topk_groups``, then the top k inside."""
    T, E = u.shape
    size = E // n_groups
    out = torch.zeros_like(u)
    for t in range(T):
        row = u[t].tolist()
        scores = []
        for g in range(n_groups):
            members = sorted(row[g * size : (g + 1) * size], reverse=True)
            scores.append(sum(members[:2]) if top2 else members[0])
        chosen = sorted(range(n_groups), key=lambda g: (-scores[g], g))[:topk_groups]
        allowed = [e for e in range(E) if e // size in chosen]
        for e in sorted(allowed, key=lambda e: -row[e])[:k]:
            out[t, e] = 1.0
    return out


@pytest.mark.parametrize("group_score", ["max", "top2"])
def test_group_limited_routing_against_brute_force(group_score):
    torch.manual_seed(1)
    logits = torch.randn(60, 12, dtype=torch.float64)
    out = topk_route(logits, 3, method="hard", n_groups=4, topk_groups=2, group_score=group_score)
    want = _group_limited_topk(logits, 3, 4, 2, group_score == "top2")
    torch.testing.assert_close(out.mask, want)
    # A soft mask stays inside the chosen groups and still sums to k.
    soft = topk_route(
        logits, 3, method="sparse", temperature=2.0, n_groups=4, topk_groups=2, group_score=group_score
    )
    groups_used = (soft.mask.reshape(60, 4, 3) > 0).any(-1)
    allowed = (want.reshape(60, 4, 3) > 0).any(-1) | (
        _group_limited_topk(logits, 6, 4, 2, group_score == "top2").reshape(60, 4, 3) > 0
    ).any(-1)
    assert (groups_used.sum(-1) <= 2).all() and not (groups_used & ~allowed).any()
    torch.testing.assert_close(soft.mask.sum(-1), torch.full((60,), 3.0, dtype=torch.float64))
    # Differentiable through the soft mask (the group choice is a constant).
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: topk_route(z, 2, method="sparse", temperature=1.0, n_groups=3, topk_groups=2).gates, (x,)
    )


def test_relu_routing_gates_penalty_and_coefficient_steering():
    logits = torch.randn(20, 6, dtype=torch.float64)
    out = topk_route(logits, 2, routing="relu", l1_coef=0.5)
    torch.testing.assert_close(out.gates, torch.relu(logits))
    torch.testing.assert_close(out.active, (logits > 0).sum(-1))
    assert out.l1_loss.item() == pytest.approx(0.5 * torch.relu(logits).sum(-1).mean().item())
    router = TopKRouter(4, 6, k=2, routing="relu", l1_coef=1.0, l1_rate=1.5)
    router.update_l1(torch.tensor([3, 3, 4]))  # too many active: penalty up
    assert router.l1_coef.item() == pytest.approx(1.5)
    router.update_l1(torch.tensor([1, 2, 0]))  # too few: down
    assert router.l1_coef.item() == pytest.approx(1.0)
    router.update_l1(torch.tensor([2, 2]))  # on target: unchanged
    assert router.l1_coef.item() == pytest.approx(1.0)
    # In training the module updates its coefficient after each forward, from that call's count.
    router = TopKRouter(4, 6, k=1, routing="relu", l1_coef=1.0, l1_rate=2.0, bias=True)
    with torch.no_grad():
        router.proj.bias.fill_(5.0)  # every expert active: above k
    out = router(torch.randn(8, 4))
    assert (out.active == 6).all() and router.l1_coef.item() == pytest.approx(2.0)
    assert out.l1_loss.item() == pytest.approx(1.0 * out.gates.sum(-1).mean().item(), rel=1e-6)
    router.eval()
    assert (router(torch.randn(8, 4)).active == 1).all() and router.l1_coef.item() == pytest.approx(2.0)
    # The multiplicative steering brings the mean count of active experts to k: per-token
    # logits pulled up at expert-dependent rates w_e (a task that wants every expert) and
    # pushed down by the L1 penalty; the coefficient settles where about k stay active.
    torch.manual_seed(0)
    T, E = 64, 8
    free = torch.randn(T, E).requires_grad_()
    w = torch.linspace(0.1, 1.0, E)
    steer = TopKRouter(1, E, k=2, routing="relu", l1_coef=1e-3, l1_rate=1.2)
    opt = torch.optim.SGD([free], lr=0.5)
    counts = []
    for _ in range(400):
        step = topk_route(free, 2, routing="relu", l1_coef=steer.l1_coef.float())
        loss = -0.1 * (w * free).sum(-1).mean() + step.l1_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        steer.update_l1(step.active)
        counts.append(step.active.float().mean().item())
    assert counts[0] > 3.5  # measured: 4.05 at the start
    late = sum(counts[-100:]) / 100
    assert 1.7 < late < 2.3, late  # measured: 1.99
    # gradcheck through relu gates and the penalty.
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: topk_route(w, 2, routing="relu", l1_coef=0.3).l1_loss, (z,))


def test_expert_choice_and_its_causal_guard():
    torch.manual_seed(0)
    T, E, k = 32, 4, 1
    logits = torch.randn(T, E, dtype=torch.float64)
    out = topk_route(logits, k, method="hard", routing="expert", capacity_factor=1.0)
    C = expert_capacity(T, E, k, 1.0)
    probs = torch.softmax(logits, -1)
    # Zhou et al.: each expert takes its C tokens with the largest softmax probabilities.
    for e in range(E):
        want = set(sorted(range(T), key=lambda t: -probs[t, e].item())[:C])
        assert set(out.mask[:, e].nonzero().squeeze(-1).tolist()) == want
    torch.testing.assert_close(out.gates, probs * out.mask)
    assert (out.load == C).all()
    # Not causal: a later token changes the routing of an earlier one.
    changed = logits.clone()
    changed[-1] = 10.0 * torch.tensor([1.0, -1.0, -1.0, -1.0])
    changed[-2] = 10.0 * torch.tensor([1.0, -1.0, -1.0, -1.0])
    later = topk_route(changed, k, method="hard", routing="expert")
    assert not torch.equal(later.mask[:-2], out.mask[:-2])
    # The guard: a causal layer refuses it; decoding (hard=True) routes by token choice.
    with pytest.raises(ValueError, match="not causal"):
        topk_route(logits, k, routing="expert", causal=True)
    with pytest.raises(ValueError, match="not causal"):
        TopKRouter(4, E, k=1, routing="expert", causal=True)
    with pytest.raises(ValueError, match="not causal"):
        TopKRouter(4, E, k=1, routing="balanced", causal=True)
    decode = topk_route(logits, 2, routing="expert", causal=True, hard=True)
    assert (decode.active == 2).all()
    router = TopKRouter(6, E, k=2, routing="expert", method="sparse").eval()
    assert (router(torch.randn(10, 6)).active == 2).all()
    # A soft mask along the token axis: each expert's column sums to C.
    soft = topk_route(logits, k, method="entropic", routing="expert", temperature=0.05)
    torch.testing.assert_close(soft.mask.sum(0), torch.full((E,), float(C), dtype=torch.float64))


def _lp_assignment(scores: torch.Tensor, C: int) -> torch.Tensor:
    """k = 1 balanced assignment by scipy's Hungarian method on C copies of every expert."""
    from scipy.optimize import linear_sum_assignment

    T, E = scores.shape
    cost = -scores.repeat_interleave(C, dim=1).numpy()  # (T, E * C)
    rows, cols = linear_sum_assignment(cost)
    out = torch.zeros(T, E, dtype=scores.dtype)
    out[torch.as_tensor(rows), torch.as_tensor(cols) // C] = 1.0
    return out


@pytest.mark.parametrize("method", ["sparse", "sparse-p4/3", "entropic", "lapsum"])
def test_balanced_assignment_marginals(method):
    from softtopk.nn.functional import balanced_assignment

    torch.manual_seed(0)
    T, E, k = 48, 6, 2
    s = torch.randn(T, E, dtype=torch.float64)
    s[:, 0] += 2.0  # everyone prefers expert 0
    y = balanced_assignment(s, k, method=method, temperature=0.3, tol=1e-9)
    torch.testing.assert_close(y.sum(1), torch.full((T,), 2.0, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(y.sum(0), torch.full((E,), T * k / E, dtype=torch.float64), atol=1e-6, rtol=0)
    assert ((y >= 0) & (y <= 1)).all()
    hard = balanced_assignment(s, k, method=method, temperature=0.3, hard=True)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert (hard.sum(1) == k).all()
    assert ((hard.sum(0) - T * k / E).abs() <= 1).all()


def test_balanced_assignment_at_low_temperature_is_the_optimal_assignment():
    from softtopk.nn.functional import balanced_assignment

    torch.manual_seed(3)
    for T, E in [(12, 3), (20, 4), (30, 5)]:
        s = torch.randn(T, E, dtype=torch.float64)
        C = T // E
        want = _lp_assignment(s, C)
        hard = balanced_assignment(
            s, 1, method="sparse", temperature=1e-3, hard=True, tol=1e-10, max_iter=5000
        )
        torch.testing.assert_close(hard, want)
        soft = balanced_assignment(s, 1, method="sparse", temperature=1e-3, tol=1e-10, max_iter=5000)
        # The soft objective approaches the optimum from below (regularised transport).
        opt = (want * s).sum().item()
        assert opt - 0.05 <= (soft * s).sum().item() <= opt + 1e-9


@pytest.mark.parametrize("method", ["sparse", "entropic"])
def test_balanced_assignment_gradcheck(method):
    from softtopk.nn.functional import balanced_assignment

    torch.manual_seed(0)
    s = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: balanced_assignment(z, 1, method=method, temperature=1.0, tol=1e-12, max_iter=10000), (s,)
    )
    # Through the router: gates = probs * Y.
    out = topk_route(s, 1, method=method, routing="balanced", temperature=1.0)
    torch.testing.assert_close(out.mask.sum(0), torch.full((3,), 2.0, dtype=torch.float64))
    out.gates.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"score": "sigmoid", "renormalize": True},
        {"bias_rate": 0.01},
        {"n_groups": 8, "topk_groups": 3},
        {"routing": "expert"},
        {"routing": "balanced", "method": "entropic"},
        {"method": "entropic"},
    ],
)
def test_eval_gives_exactly_k_experts(options):
    torch.manual_seed(0)
    router = TopKRouter(16, 64, k=2, **options)
    x = torch.randn(128, 16)
    if options.get("bias_rate"):
        router(x)  # training forward moves the bias
    router.eval()
    out = router(x)
    assert (out.active == 2).all()
    assert (out.mask.sum(-1) == 2).all()
    router.inference = "soft"
    if options.get("method") == "entropic" and "routing" not in options:
        assert (router(x).active == 64).all()  # the soft routing keeps every expert


def test_option_validation():
    x = torch.randn(4, 6)
    cases = [
        (dict(score="relu"), ValueError, "score"),
        (dict(routing="tokens"), ValueError, "routing"),
        (dict(n_groups=4), ValueError, "n_groups and topk_groups"),
        (dict(n_groups=4, topk_groups=2), ValueError, "divisor"),
        (dict(n_groups=3, topk_groups=4), ValueError, "topk_groups"),
        (dict(n_groups=2.0, topk_groups=1), TypeError, "n_groups"),
        (dict(n_groups=6, topk_groups=1, k=2), ValueError, "exceeds"),
        (dict(group_score="sum"), ValueError, "group_score"),
        (dict(renormalize=1), TypeError, "renormalize"),
        (dict(routing="balanced", method="dftopk"), ValueError, "method"),
        (dict(routing="balanced", capacity_factor=1.0), ValueError, "capacity_factor"),
        (dict(routing="balanced", k=1.5), ValueError, "k must be an int"),
        (dict(routing="expert", n_groups=2, topk_groups=1), ValueError, "token choice"),
        (dict(expert_bias=torch.zeros(5)), ValueError, "expert_bias"),
        (dict(method="magnitude", expert_bias=torch.zeros(6)), ValueError, "magnitude"),
        (dict(hard="yes"), TypeError, "hard"),
        (dict(causal=1), TypeError, "causal"),
    ]
    for options, error, match in cases:
        opts = {"k": 1, **options}
        k = opts.pop("k")
        with pytest.raises(error, match=match):
            topk_route(x, k, **opts)
    module_cases = [
        (dict(inference="exact"), ValueError, "inference"),
        (dict(bias_rate=-1.0), ValueError, "bias_rate"),
        (dict(bias_update="step"), ValueError, "bias_update"),
        (dict(l1_rate=1.0), ValueError, "l1_rate"),
        (dict(l1_coef=0.0), ValueError, "l1_coef"),
        (dict(score="tanh"), ValueError, "score"),
        (dict(n_groups=4, topk_groups=1), ValueError, "divisor"),
        (dict(routing="balanced", method="soft"), ValueError, "method"),
        (dict(bias=1), TypeError, "bias"),
    ]
    for options, error, match in module_cases:
        with pytest.raises(error, match=match):
            TopKRouter(4, 6, k=1, **options)


def test_stochastic_methods_draw_fresh_noise_or_follow_a_generator():
    logits = torch.randn(16, 8)
    a = topk_route(logits, 2, method="perturbed").gates
    b = topk_route(logits, 2, method="perturbed").gates
    assert not torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    c = topk_route(logits, 2, method="perturbed", generator=g1).gates
    d = topk_route(logits, 2, method="perturbed", generator=g2).gates
    assert torch.equal(c, d)
    with pytest.raises(TypeError, match="generator"):
        topk_route(logits, 2, generator=5)
    with pytest.raises(TypeError, match="generator"):
        TopKRouter(4, 8, generator=5)
    router = TopKRouter(4, 8, method="perturbed", generator=torch.Generator().manual_seed(1))
    x = torch.randn(16, 4)
    assert not torch.equal(router(x).gates, router(x).gates)

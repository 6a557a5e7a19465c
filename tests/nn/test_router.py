"""TopKRouter / topk_route / moe_dispatch: V-MoE routing with any mask operator."""

from __future__ import annotations

import io
import math

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

"""DepthRouter / depth_route / depth_dispatch: mixture-of-depths with top-k capacity or threshold-p."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import softtopk
from softtopk.nn import DepthRouter
from softtopk.nn.functional import depth_dispatch, depth_route


def test_capacity_mode_is_mod_top_k_per_sequence():
    logits = torch.randn(4, 32, dtype=torch.float64)
    out = depth_route(logits, capacity=0.25)
    hard = softtopk.topk_mask(logits, 8, method="hard")
    torch.testing.assert_close(out.mask, hard)
    torch.testing.assert_close(out.scores, torch.sigmoid(logits))
    torch.testing.assert_close(out.weights, torch.sigmoid(logits) * hard)
    # The auxiliary loss is the BCE between sigmoid(logits) and the top-k choice.
    torch.testing.assert_close(
        out.aux_loss.double(), F.binary_cross_entropy_with_logits(logits, hard), rtol=1e-6, atol=1e-7
    )
    # Capacity rounds up: ceil(0.3 * 10) = 3.
    assert depth_route(torch.randn(2, 10), capacity=0.3).mask.sum(-1).tolist() == [3.0, 3.0]


def test_hard_selection_gradient_reaches_router_only_through_weights():
    logits = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    out = depth_route(logits, capacity=0.5)
    v = torch.randn(2, 12, dtype=torch.float64)
    (out.weights * v).sum().backward()
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, v * out.mask * s * (1 - s))


def test_soft_selection_is_sparse_and_passes_gradients_between_tokens():
    logits = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    out = depth_route(logits, capacity=0.25, method="sparse", temperature=0.5)
    torch.testing.assert_close(out.mask.sum(-1), torch.full((3,), 4.0, dtype=torch.float64))
    assert (out.mask == 0).sum() >= 3 * 16 - 3 * 8  # exact zeros: those tokens skip the block
    assert torch.autograd.gradcheck(
        lambda z: depth_route(z, capacity=0.25, method="sparse", temperature=0.5).weights, (logits,)
    )


def test_threshold_mode_and_per_token_inference():
    logits = torch.randn(3, 20, dtype=torch.float64)
    out = depth_route(logits, threshold=0.6)
    torch.testing.assert_close(out.mask, softtopk.threshold_p_mask(torch.sigmoid(logits), 0.6))
    assert out.aux_loss.item() == 0.0
    soft = depth_route(logits, threshold=0.6, method="sparse", temperature=1e-4)
    torch.testing.assert_close(soft.mask, out.mask, atol=1e-3, rtol=0)  # same budget, hard limit
    torch.testing.assert_close(soft.mask.sum(-1), out.mask.sum(-1))
    # per_token: each token is decided alone (s >= 1/2 in capacity mode, s >= p in threshold mode).
    torch.testing.assert_close(depth_route(logits, capacity=0.1, per_token=True).mask, (logits >= 0).double())
    torch.testing.assert_close(
        depth_route(logits, threshold=0.6, method="sparse", per_token=True).mask, out.mask
    )


def test_module_is_causal_at_inference():
    torch.manual_seed(0)
    router = DepthRouter(8, capacity=0.25)
    x = torch.randn(2, 16, 8)
    router.eval()
    full = router(x).mask
    for t in (1, 5, 16):  # decoding: a prefix gives the same decisions on its tokens
        torch.testing.assert_close(router(x[:, :t]).mask, full[:, :t])
    router.train()
    assert router(x).mask.sum(-1).tolist() == [4.0, 4.0]


def test_dispatch_runs_the_block_on_kept_tokens_in_order():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 4)
    logits = torch.randn(3, 10)
    logits[2] = -10.0  # a sequence that keeps nothing under p
    routing = depth_route(logits, threshold=0.5)
    seen = []

    def block(h):
        seen.append(h.clone())
        return torch.cumsum(h, 1)  # a causal block: position j sees positions <= j

    y = depth_dispatch(x, routing, block)
    assert len(seen) == 1 and seen[0].shape[1] == int(routing.mask.sum(-1).max())
    for b in range(3):
        kept = routing.mask[b].nonzero().squeeze(-1)
        expected = x[b].clone()
        if kept.numel():
            torch.testing.assert_close(seen[0][b, : kept.numel()], x[b, kept])  # kept tokens, in order
            expected[kept] += routing.weights[b, kept].unsqueeze(-1) * torch.cumsum(x[b, kept], 0)
        torch.testing.assert_close(y[b], expected)
    # Nothing kept anywhere: the block is not called.
    seen.clear()
    torch.testing.assert_close(
        depth_dispatch(x, depth_route(torch.full((3, 10), -9.0), threshold=0.5), block), x
    )
    assert not seen


def test_module_equals_function_state_dict_gradcheck():
    torch.manual_seed(0)
    router = DepthRouter(6, capacity=0.5, method="lapsum", temperature=0.3)
    x = torch.randn(2, 8, 6)
    expected = depth_route(
        F.linear(x, router.proj.weight, router.proj.bias).squeeze(-1),
        capacity=0.5,
        method="lapsum",
        temperature=0.3,
    )
    for got, want in zip(router(x), expected, strict=True):
        torch.testing.assert_close(got, want)
    restored = DepthRouter(6, capacity=0.5, method="lapsum", temperature=0.3)
    restored.load_state_dict(router.state_dict())
    torch.testing.assert_close(restored(x).weights, router(x).weights)
    buffer = io.BytesIO()
    torch.save(router, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x).weights, router(x).weights)
    r64 = DepthRouter(3, capacity=0.5, method="sparse", temperature=1.0).double()
    x64 = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: depth_dispatch(z, r64(z), torch.tanh), (x64,))


@pytest.mark.slow
def test_compile_equals_eager():
    torch.manual_seed(0)
    router = DepthRouter(8, capacity=0.25, method="sparse", temperature=0.5)
    x = torch.randn(2, 16, 8)
    compiled = torch.compile(router, fullgraph=True)
    for got, want in zip(compiled(x), router(x), strict=True):
        torch.testing.assert_close(got, want)


def test_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        depth_route(torch.randn(2, 4))
    with pytest.raises(ValueError, match="exactly one"):
        DepthRouter(4, capacity=0.5, threshold=0.5)
    with pytest.raises(ValueError, match="capacity"):
        depth_route(torch.randn(2, 4), capacity=1.5)
    with pytest.raises(ValueError, match="threshold must"):
        depth_route(torch.randn(2, 4), threshold=1.0)
    with pytest.raises(TypeError, match="per_token"):
        depth_route(torch.randn(2, 4), threshold=0.5, per_token=1)
    with pytest.raises(ValueError, match="x must have shape"):
        depth_dispatch(torch.randn(4, 3), depth_route(torch.randn(4, 3), threshold=0.5), math.sin)


def test_stochastic_methods_follow_a_generator():
    logits = torch.randn(2, 16)
    a = depth_route(logits, capacity=0.5, method="perturbed").weights
    b = depth_route(logits, capacity=0.5, method="perturbed").weights
    assert not torch.equal(a, b)
    c = depth_route(logits, capacity=0.5, method="perturbed", generator=torch.Generator().manual_seed(3))
    d = depth_route(logits, capacity=0.5, method="perturbed", generator=torch.Generator().manual_seed(3))
    assert torch.equal(c.weights, d.weights)
    with pytest.raises(TypeError, match="generator"):
        DepthRouter(8, capacity=0.5, generator="seed")

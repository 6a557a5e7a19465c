"""TopKSAE and its activations: TopK, BatchTopK + JumpReLU threshold, soft masks, AuxK, dead latents."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import softtopk
from softtopk.nn import TopKSAE
from softtopk.nn.functional import (
    auxk_loss,
    batch_topk_activation,
    fraction_of_variance_unexplained,
    jumprelu,
    topk_activation,
)


def test_topk_activation_is_relu_of_the_k_largest():
    pre = torch.randn(50, 40, dtype=torch.float64)
    pre[:5] = -pre[:5].abs()  # rows whose top-k are negative: ReLU zeroes them
    z = topk_activation(pre, 6)
    ref = np.zeros(pre.shape)
    for r, row in enumerate(pre.numpy()):
        top = np.argsort(-row, kind="stable")[:6]
        ref[r, top] = np.maximum(row[top], 0.0)
    assert torch.equal(z, torch.tensor(ref))
    assert (z[:5] == 0).all() and ((z != 0).sum(-1)[5:] <= 6).all()
    moved = topk_activation(pre.T.contiguous(), 6, 0)
    assert torch.equal(moved.T, z)


def test_hard_topk_gradient_reaches_the_kept_latents_only():
    pre = torch.randn(8, 20, dtype=torch.float64, requires_grad=True)
    z = topk_activation(pre, 3)
    v = torch.randn_like(z)
    (z * v).sum().backward()
    assert torch.equal(pre.grad, v * (z != 0))


@pytest.mark.parametrize("method", ["sparse", "entropic"])
def test_soft_variant_is_relu_times_the_registry_mask_and_gradchecks(method):
    pre = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    z = topk_activation(pre, 3, method=method, temperature=0.5)
    mask = softtopk.registry.OPERATORS[method](pre, 3, temperature=0.5)
    torch.testing.assert_close(z, torch.relu(pre) * mask)
    torch.autograd.gradcheck(lambda p: topk_activation(p, 3, method=method, temperature=0.5), (pre,))
    if method == "sparse":
        hard = topk_activation(pre, 3)
        # the sparse mask passes gradient to latents just outside the top k (where hard TopK gives 0)
        g = torch.autograd.grad(z.sum(), pre)[0]
        assert ((g != 0) & (hard == 0) & (pre > 0)).any()


def test_batch_topk_keeps_k_times_batch_over_the_flattened_batch():
    torch.manual_seed(0)
    pre = torch.randn(32, 50, dtype=torch.float64).abs() * torch.linspace(0.2, 3, 32)[:, None]
    out = batch_topk_activation(pre, 4)
    assert int((out.latents != 0).sum()) == 4 * 32
    flat = pre.flatten()
    kth = torch.sort(flat, descending=True).values[4 * 32 - 1]
    assert out.threshold.item() == kth.item()
    torch.testing.assert_close(out.latents, pre * (pre >= kth))
    counts = (out.latents != 0).sum(-1)
    assert counts.min() < 4 < counts.max()  # samples with large activations take more latents
    # the threshold reproduces the batch's selection with a JumpReLU (no ties here)
    torch.testing.assert_close(jumprelu(pre, kth - 1e-12), out.latents)
    assert not out.threshold.requires_grad
    soft = batch_topk_activation(pre, 4, method="sparse", temperature=0.05)
    assert abs(float((soft.latents / pre.clamp_min(1e-12)).sum()) - 128) < 1e-6  # the mask sums to k B


def test_jumprelu():
    x = torch.tensor([-1.0, 0.2, 0.5, 3.0])
    assert torch.equal(jumprelu(x, 0.5), torch.tensor([0.0, 0.0, 0.0, 3.0]))
    assert torch.equal(jumprelu(x, torch.tensor(0.1)), torch.tensor([0.0, 0.2, 0.5, 3.0]))
    assert not jumprelu(x, 0.5).signbit().any()


def test_auxk_loss_against_a_brute_force():
    torch.manual_seed(1)
    B, m, d, k_aux = 6, 12, 5, 3
    pre = torch.randn(B, m, dtype=torch.float64, requires_grad=True)
    D = torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=-1).requires_grad_()
    e = torch.randn(B, d, dtype=torch.float64)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[[1, 4, 5, 8, 11]] = True
    loss = auxk_loss(e, pre, dead, D, k_aux)
    num = 0.0
    for b in range(B):
        cand = sorted((float(pre[b, j].detach()), j) for j in range(m) if dead[j])[-k_aux:]
        e_hat = sum(max(v, 0.0) * D[j].detach().numpy() for v, j in cand)
        num += float(((e[b].numpy() - e_hat) ** 2).sum())
    assert loss.item() == pytest.approx(num / float((e**2).sum()), rel=1e-12)
    loss.backward()
    assert (pre.grad[:, ~dead] == 0).all() and (pre.grad[:, dead] != 0).any()
    assert (D.grad[~dead] == 0).all()
    assert auxk_loss(e, pre, torch.zeros(m, dtype=torch.bool), D, k_aux).item() == 0.0
    assert auxk_loss(e, pre, dead, D, 100).isfinite()  # k_aux above the number of dead latents


def test_fvu():
    x = torch.randn(100, 7)
    assert fraction_of_variance_unexplained(x, x).item() == 0.0
    assert fraction_of_variance_unexplained(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0)


def sparse_data(n, d=16, m=48, k=3, seed=0):
    """Samples that are k-sparse combinations of m unit directions (the same ones for every n)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)
    idx = torch.rand(n, m, generator=g).argsort(-1)[:, :k]
    z = torch.zeros(n, m).scatter(-1, idx, 0.5 + torch.rand(n, k, generator=g))
    return z @ D + 0.3


def train(sae, x, epochs=30, batch=128, lr=3e-3):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 4.0 * (1 - s / steps)))
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            out = sae(x[perm[i : i + batch]])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sched.step()
    return sae


@pytest.mark.parametrize(
    "activation, method",
    [
        ("topk", "hard"),
        ("batch_topk", "hard"),
        pytest.param("topk", "sparse", marks=pytest.mark.slow),
        pytest.param("batch_topk", "sparse", marks=pytest.mark.slow),
    ],
)
def test_training_reconstructs_and_the_threshold_reproduces_the_sparsity(activation, method):
    torch.manual_seed(0)
    data = sparse_data(3072)
    x, held_out = data[:2048], data[2048:]
    sae = TopKSAE(16, 64, 3, activation=activation, method=method, dead_after=2048)
    sae.init_pre_bias(x)
    torch.testing.assert_close(sae.pre_bias.detach(), x.mean(0))
    fvu_before = sae(held_out).fvu.item()
    train(sae, x, epochs=10)
    sae.eval()
    with torch.no_grad():
        out = sae(held_out)
    assert out.fvu.item() < 0.4 * fvu_before and out.fvu.item() < 0.3
    if activation == "batch_topk":
        assert math.isfinite(sae.threshold.item()) and sae.threshold.item() > 0
        assert abs(out.l0.item() / 3.0 - 1.0) < 0.05  # JumpReLU at inference: L0 within 5 % of k
        per_sample = (out.latents != 0).sum(-1)
        assert per_sample.min() < per_sample.max()
    elif method == "hard":
        assert ((out.latents != 0).sum(-1) <= 3).all()


def test_decoder_rows_are_unit_norm_and_their_gradient_is_orthogonal():
    sae = TopKSAE(6, 10, 2)
    with torch.no_grad():
        sae.decoder.mul_(torch.linspace(0.5, 3.0, 10)[:, None])
    torch.testing.assert_close(sae.dictionary.norm(dim=-1), torch.ones(10))
    out = sae(torch.randn(32, 6))
    out.loss.backward()
    assert (sae.decoder.grad * sae.decoder.detach()).sum(-1).abs().max() < 1e-5
    torch.testing.assert_close(out.recon, out.latents @ sae.dictionary + sae.pre_bias)
    fresh = TopKSAE(6, 10, 2)
    torch.testing.assert_close(fresh.encoder.detach(), fresh.dictionary.detach())  # W_enc = D^T at init


def test_dead_latents_are_counted_and_feed_the_auxk_loss():
    torch.manual_seed(0)
    sae = TopKSAE(8, 20, 2, dead_after=100, k_aux=4)
    x = torch.randn(64, 8)
    with torch.no_grad():
        sae.latent_bias[:10] = -100.0  # latents 0..9 can never fire
    sae(x)
    assert sae.dead_latents == 0  # 64 samples < dead_after
    out = sae(x)
    assert sae.dead_latents >= 10 and sae.dead_mask()[:10].all()
    assert out.aux_loss.item() > 0
    assert out.loss.item() == pytest.approx(out.fvu.item() + out.aux_loss.item() / 32)
    # AuxK works on the ReLU of the dead latents' pre-activations: with a milder bias some are
    # positive (yet outside the top 2), and AuxK's gradient reaches their encoder rows
    with torch.no_grad():
        sae.latent_bias[:10] = -1.5
    sae.since_fired[:10] = 10_000
    sae.zero_grad()
    out = sae(x)
    assert sae.dead_mask()[:10].any() and out.aux_loss.item() > 0
    out.aux_loss.backward()
    dead = sae.dead_mask()
    assert sae.encoder.grad[dead].abs().sum() > 0 and (sae.encoder.grad[~dead] == 0).all()
    off = TopKSAE(8, 20, 2, dead_after=1, aux_coefficient=0.0)
    assert off(x).aux_loss.item() == 0.0 and off(x).aux_loss.item() == 0.0
    sae.eval()
    assert sae(x).aux_loss.item() == 0.0


def test_threshold_is_exported_and_required_in_eval():
    sae = TopKSAE(8, 20, 2, activation="batch_topk")
    sae.eval()
    with pytest.raises(RuntimeError, match="threshold"):
        sae(torch.randn(4, 8))
    sae.train()
    sae(torch.randn(64, 8))
    assert math.isfinite(sae.threshold.item())
    buf = io.BytesIO()
    torch.save(sae.state_dict(), buf)
    buf.seek(0)
    other = TopKSAE(8, 20, 2, activation="batch_topk")
    other.load_state_dict(torch.load(buf))
    assert other.threshold.item() == sae.threshold.item()
    other.eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(other(x).latents, jumprelu(other.encode(x), sae.threshold))


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="activation"):
        TopKSAE(4, 8, 2, activation="relu")
    with pytest.raises(ValueError, match="unknown method"):
        TopKSAE(4, 8, 2, method="nope")
    with pytest.raises(ValueError, match="k"):
        TopKSAE(4, 8, 9)
    with pytest.raises(ValueError, match="k"):
        TopKSAE(4, 8, 0)
    with pytest.raises(TypeError, match="latents"):
        TopKSAE(4, 8.0, 2)
    with pytest.raises(ValueError, match="aux_coefficient"):
        TopKSAE(4, 8, 2, aux_coefficient=-1.0)
    with pytest.raises(ValueError, match="threshold_momentum"):
        TopKSAE(4, 8, 2, threshold_momentum=2.0)
    with pytest.raises(TypeError, match="generator"):
        TopKSAE(4, 8, 2, generator=1)
    with pytest.raises(ValueError, match="features"):
        TopKSAE(4, 8, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="k"):
        batch_topk_activation(torch.randn(3, 4), 0)

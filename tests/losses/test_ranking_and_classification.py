"""Top-k cross-entropy, cascade losses (DFTopK, LCRON) and LambdaLoss against independent oracles."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softtopk
from softtopk.losses import (
    CascadeLoss,
    TopKCrossEntropyLoss,
    dftopk_cascade_loss,
    lambda_loss,
    lcron_loss,
    topk_cross_entropy,
    uncertainty_weighted,
)
from softtopk.metrics import cascade_recall

EPS = 1e-7

# --------------------------------------------------------------------------- top-k CE


def _hard_topk_ce_oracle(logits: np.ndarray, target: np.ndarray, p_k, m=None) -> np.ndarray:
    """-log(p1 softmax_y + sum_k p_k 1[rank(y) <= k]) with ranks by a loop (hard mask, no ties)."""
    out = []
    for s, y in zip(logits, target, strict=True):
        if m is not None:
            others = sorted((v for j, v in enumerate(s) if j != y), reverse=True)[: m - 1]
            s, y = np.array([s[y], *others]), 0
        rank = 1 + sum(v > s[y] for v in s)
        soft = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        q = p_k[0] * soft[y] + sum(p for kappa, p in enumerate(p_k[1:], start=2) if rank <= kappa)
        out.append(-math.log(q * (1 - 2 * EPS) + EPS))
    return np.array(out)


@pytest.mark.parametrize("m", [None, 6])
@pytest.mark.parametrize("p_k", [(0.5, 0, 0, 0, 0.5), (0.2,) * 5, (0.25, 0.75)])
def test_topk_ce_with_the_hard_mask_matches_a_loop(rng, p_k, m):
    logits = rng.normal(size=(40, 12))
    target = rng.integers(0, 12, size=40)
    ours = topk_cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(target), p_k=p_k, method="hard", m=m, reduction="none"
    )
    np.testing.assert_allclose(ours.numpy(), _hard_topk_ce_oracle(logits, target, p_k, m), rtol=1e-12)


def test_topk_ce_with_p1_is_cross_entropy():
    logits, target = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 10, (8,))
    ours = topk_cross_entropy(logits, target, p_k=[1.0])
    expected = -torch.log(torch.softmax(logits, -1)[torch.arange(8), target] * (1 - 2 * EPS) + EPS).mean()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target), atol=1e-5, rtol=0)  # eps terms


@pytest.mark.parametrize("method", ["sparse", "sparse-p4/3", "entropic", "lapsum"])
def test_topk_ce_soft_masks_tend_to_the_hard_loss_and_gradcheck(rng, method):
    logits = torch.from_numpy(rng.normal(size=(10, 9)))
    target = torch.from_numpy(rng.integers(0, 9, size=10))
    hard = topk_cross_entropy(logits, target, method="hard", reduction="none")
    cold = topk_cross_entropy(logits, target, method=method, temperature=1e-4, reduction="none")
    torch.testing.assert_close(cold, hard, atol=1e-3, rtol=0)
    x = logits[:3, :6].clone().requires_grad_()
    y = target[:3] % 6
    assert torch.autograd.gradcheck(
        lambda z: topk_cross_entropy(z, y, p_k=[0.3, 0.3, 0.4], method=method, temperature=1.0), (x,)
    )


def test_topk_ce_top1_modes_and_any_shape():
    logits, target = torch.randn(2, 3, 7, dtype=torch.float64), torch.randint(0, 7, (2, 3))
    flat = topk_cross_entropy(logits.reshape(6, 7), target.reshape(6), reduction="none")
    torch.testing.assert_close(topk_cross_entropy(logits, target, reduction="none"), flat.reshape(2, 3))
    torch.testing.assert_close(topk_cross_entropy(logits, target, reduction="sum"), flat.sum())
    # "ce": P_K(1) * CE + (1 - P_K(1)) * the top-k term.
    pk = [0.4, 0.6]
    topk_term = -torch.log(
        0.6 * softtopk.topk_mask(logits, 2).gather(-1, target.unsqueeze(-1)).squeeze(-1) * (1 - 2 * EPS) + EPS
    )
    expected = 0.6 * topk_term + 0.4 * F.cross_entropy(
        logits.reshape(6, 7), target.reshape(6), reduction="none"
    ).reshape(2, 3)
    torch.testing.assert_close(
        topk_cross_entropy(logits, target, p_k=pk, top1="ce", reduction="none"), expected
    )
    # "mask": the K = 1 term is the mask too.
    q = 0.4 * softtopk.topk_mask(logits, 1) + 0.6 * softtopk.topk_mask(logits, 2)
    expected = -torch.log(q.gather(-1, target.unsqueeze(-1)).squeeze(-1) * (1 - 2 * EPS) + EPS)
    torch.testing.assert_close(
        topk_cross_entropy(logits, target, p_k=pk, top1="mask", reduction="none"), expected
    )


def test_topk_ce_half_precision():
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    ref = topk_cross_entropy(logits, target)
    for dtype in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(topk_cross_entropy(logits.to(dtype), target), ref, atol=2e-2, rtol=2e-2)


def test_topk_ce_module_equals_function_and_round_trips():
    crit = TopKCrossEntropyLoss([0.5, 0.5], method="lapsum", temperature=0.3, m=5, top1="softmax")
    logits, target = torch.randn(7, 9), torch.randint(0, 9, (7,))
    expected = topk_cross_entropy(logits, target, p_k=[0.5, 0.5], method="lapsum", temperature=0.3, m=5)
    torch.testing.assert_close(crit(logits, target), expected)
    restored = TopKCrossEntropyLoss()
    restored.load_state_dict(crit.state_dict())
    buffer = io.BytesIO()
    torch.save(crit, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(logits, target), expected)
    assert "method='lapsum'" in repr(loaded)


def test_topk_ce_bad_input():
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="sum to 1"):
        topk_cross_entropy(x, y, p_k=[0.5, 0.4])
    with pytest.raises(ValueError, match="only C = 5"):
        topk_cross_entropy(x, y, p_k=[1 / 6] * 6)
    with pytest.raises(TypeError, match="target"):
        topk_cross_entropy(x, y.float())
    with pytest.raises(ValueError, match="class indices"):
        topk_cross_entropy(x, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="m must be"):
        topk_cross_entropy(x, y, p_k=[0.5, 0.5], m=1)
    with pytest.raises(ValueError, match="top1"):
        topk_cross_entropy(x, y, top1="sm")
    with pytest.raises(ValueError, match="unknown method"):
        TopKCrossEntropyLoss(method="soft-sorted")


@pytest.mark.peer
@pytest.mark.parametrize("top1", [("softmax", "sm"), ("mask", "sort"), ("ce", "smce")])
@pytest.mark.parametrize("m", [None, 8])
def test_topk_ce_wiring_equals_difftopk(top1, m):
    """Fed difftopk's own NeuralSort top-k, our loss equals difftopk.TopKCrossEntropyLoss."""
    difftopk = pytest.importorskip("difftopk")
    ours_mode, their_mode = top1
    beta, p_k, C = 2.0, [0.25, 0.0, 0.35, 0.0, 0.4], 20
    sort = difftopk.NeuralSort(tau=1 / beta)

    # difftopk's P_topk[:, i, -k:].sum(-1) is the membership of item i; NeuralSort returns the
    # (rank, item) matrix, so transpose: it computes sort_fn(outputs)[:, :, -k:] on that layout.
    def membership(x, k, *, dim, temperature):
        return sort(x)[:, :, -k:].sum(-1)

    torch.manual_seed(0)
    logits, target = torch.randn(16, C), torch.randint(0, C, (16,))  # difftopk's NeuralSort is float32
    theirs = difftopk.TopKCrossEntropyLoss("neuralsort", beta, p_k, C, m=m, top1_mode=their_mode)(
        logits, target
    )
    ours = topk_cross_entropy(logits, target, p_k=p_k, method=membership, m=m, top1=ours_mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- cascade


def _bce(p, y):
    p = np.clip(p, 0.0, 1.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf, clamped at -100 as torch does
        return float(np.mean(-(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100))))


def _lists(rng, rows=12, n=30, K=5):
    x1, x2 = rng.normal(size=(2, rows, n))
    y = np.zeros((rows, n))
    for row in y:
        row[rng.choice(n, K, replace=False)] = 1
    return torch.from_numpy(x1), torch.from_numpy(x2), torch.from_numpy(y)


@pytest.mark.parametrize("method", ["sparse", "entropic", "lapsum"])
def test_dftopk_terms_are_the_bces_of_the_masks(rng, method):
    x1, x2, y = _lists(rng)
    terms = dftopk_cascade_loss([x1, x2], y, method=method, temperature=0.5)
    m1 = softtopk.topk_mask(x1, 5, method=method, temperature=0.5).numpy()
    m2 = softtopk.topk_mask(x2, 5, method=method, temperature=0.5).numpy()
    yn = y.numpy()
    np.testing.assert_allclose(terms.stages.numpy(), [_bce(m1, yn), _bce(m2, yn)], rtol=1e-6)
    assert terms.joint.item() == pytest.approx(_bce(m1 * m2, yn), rel=1e-6)


def test_lcron_equals_the_papers_formula_on_neuralsort_memberships(rng):
    """LCRON's code: q = sum_{r<=m} P_r,i / sum_r P_r,i (detached), -log(q + 1e-6) terms."""
    x1, x2, y = _lists(rng, K=4)
    tau, ms = 0.5, [12, 8]

    def neuralsort(s):  # Grover et al. 2019, descending: row r is the r-th largest
        n = s.shape[-1]
        A = (s.unsqueeze(-1) - s.unsqueeze(-2)).abs()
        B = A.sum(-1, keepdim=True).transpose(-1, -2)
        scale = n + 1 - 2 * torch.arange(1, n + 1, dtype=s.dtype)
        return torch.softmax((scale.unsqueeze(-1) * s.unsqueeze(-2) - B) / tau, -1)

    def membership(s, m, *, dim, temperature):
        P = neuralsort(s)
        return P[:, :m, :].sum(-2) / (P.detach().sum(-2) + 1e-6)

    terms = lcron_loss([x1, x2], y, ms, method=membership)
    q1, q2 = membership(x1, ms[0], dim=-1, temperature=0), membership(x2, ms[1], dim=-1, temperature=0)
    Q = q1 * q2
    up = (-torch.log(Q + 1e-6) * y).mean(-1)
    down = (-torch.log(1 - Q + 1e-6) * (1 - y)).mean(-1)
    torch.testing.assert_close(terms.joint.double(), (up + down).mean(), rtol=1e-4, atol=1e-5)
    single = [((-torch.log(q + 1e-6) * y) + (-torch.log(1 - q + 1e-6) * (1 - y))).mean() for q in (q1, q2)]
    torch.testing.assert_close(terms.stages.double(), torch.stack(single), rtol=1e-4, atol=1e-5)


def test_uncertainty_weighting_formula():
    stages, joint, w = torch.tensor([0.7, 1.3]), torch.tensor(0.4), torch.tensor([0.5, 2.0])
    expected = 0.7 / (2 * 0.25) + 1.3 / (2 * 4.0) + 0.4 + math.log(0.5 * 2.0)
    assert uncertainty_weighted(stages, joint, w).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="weights"):
        uncertainty_weighted(stages, joint, torch.ones(3))


@pytest.mark.parametrize("recipe", ["dftopk", "lcron"])
def test_cascade_loss_module_equals_function_and_trains(rng, recipe):
    torch.manual_seed(0)
    n, K, rows = 40, 5, 64
    feats = torch.randn(rows, n, 8)
    truth = feats @ torch.randn(8)
    y = softtopk.topk_mask(truth, K, method="hard")
    w1, w2 = torch.zeros(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    crit = CascadeLoss(2, recipe=recipe, ms=[20, 10], method="sparse", temperature=0.5)
    x1, x2 = feats @ w1, feats @ w2
    terms = crit.terms([x1, x2], y)
    direct = (
        lcron_loss([x1, x2], y, [20, 10], method="sparse", temperature=0.5)
        if recipe == "lcron"
        else dftopk_cascade_loss([x1, x2], y, method="sparse", temperature=0.5)
    )
    torch.testing.assert_close(terms.stages, direct.stages)
    torch.testing.assert_close(
        crit([x1, x2], y), uncertainty_weighted(direct.stages, direct.joint, crit.weights)
    )
    with torch.no_grad():
        w1.normal_(std=0.1)
        w2.normal_(std=0.1)
    before = cascade_recall([feats @ w1, feats @ w2], y, [20, 10]).item()
    opt = torch.optim.Adam([w1, w2, *crit.parameters()], lr=0.05)
    for _ in range(60):
        loss = crit([feats @ w1, feats @ w2], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = cascade_recall([feats @ w1, feats @ w2], y, [20, 10]).item()
    assert after > before + 0.4  # measured: 0.14 -> 1.00 (dftopk), 0.14 -> 0.74 (lcron)
    state = crit.state_dict()
    restored = CascadeLoss(2, recipe=recipe, ms=[20, 10], method="sparse", temperature=0.5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.weights, crit.weights)


def test_cascade_gradcheck():
    x1 = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    y = softtopk.topk_mask(torch.randn(3, 9, dtype=torch.float64), 3, method="hard")
    for fn in (
        lambda a, b: dftopk_cascade_loss([a, b], y, method="lapsum", temperature=1.0).joint,
        lambda a, b: lcron_loss([a, b], y, [5, 4], method="entropic", temperature=1.0).stages.sum(),
    ):
        assert torch.autograd.gradcheck(lambda a, b, f=fn: f(a, b).double(), (x1, x2), atol=1e-5)


def test_cascade_bad_input():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="target must"):
        dftopk_cascade_loss([x], torch.ones(2, 5))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        dftopk_cascade_loss([x], 2 * torch.ones(2, 6))
    with pytest.raises(ValueError, match="budgets"):
        lcron_loss([x, x], torch.ones(2, 6), [3])
    with pytest.raises(ValueError, match="stage_scores\\[1\\]"):
        dftopk_cascade_loss([x, torch.randn(2, 7)], torch.ones(2, 6))
    with pytest.raises(ValueError, match="ms"):
        CascadeLoss(2, recipe="lcron")
    with pytest.raises(ValueError, match="recipe"):
        CascadeLoss(2, recipe="arf")


# --------------------------------------------------------------------------- LambdaLoss


def _lambda_oracle(s, rel, weighting, k=None, truncation="either", sigma=1.0, mu=10.0):
    """The LambdaLoss weights by a double loop over pairs (Wang et al. 2018, Sec. 4)."""
    n = len(s)
    kk = n if k is None else k
    order = sorted(range(n), key=lambda i: -s[i])
    rank = {item: r + 1 for r, item in enumerate(order)}
    gains = [2.0**r - 1 for r in rel]
    max_dcg = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(gains, reverse=True)[:kk]))
    G = [g / max_dcg if max_dcg > 0 else 0.0 for g in gains]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if not rel[i] > rel[j]:
                continue
            ri, rj = rank[i], rank[j]
            if k is not None and ((min if truncation == "either" else max)(ri, rj) > k):
                continue
            rho = abs(1 / math.log2(1 + ri) - 1 / math.log2(1 + rj))
            gap = abs(ri - rj)
            delta = abs(1 / math.log2(1 + gap) - 1 / math.log2(2 + gap))
            w = {"lambdarank": rho, "ndcg2": delta, "ndcg2++": rho + mu * delta}[weighting] * abs(G[i] - G[j])
            total -= w * math.log2(1 / (1 + math.exp(-sigma * (s[i] - s[j]))))
    return total


@pytest.mark.parametrize("weighting", ["lambdarank", "ndcg2", "ndcg2++"])
@pytest.mark.parametrize("k,truncation", [(None, "either"), (4, "either"), (4, "both")])
def test_lambda_loss_matches_the_pairwise_loop(rng, weighting, k, truncation):
    s = rng.normal(size=(5, 11))
    rel = rng.integers(0, 4, size=(5, 11)).astype(float)
    ours = lambda_loss(
        torch.from_numpy(s),
        torch.from_numpy(rel),
        k=k,
        truncation=truncation,
        weighting=weighting,
        temperature=1 / 1.5,
        reduction="none",
    )
    expected = [_lambda_oracle(s[b], rel[b], weighting, k, truncation, sigma=1.5) for b in range(5)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10)


def test_lambda_loss_padding_gradcheck_and_training():
    s = torch.tensor([[0.3, -0.2, 1.0, -math.inf]], dtype=torch.float64)
    rel = torch.tensor([[2.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    unpadded = lambda_loss(s[:, :3], rel[:, :3])
    torch.testing.assert_close(lambda_loss(s, rel), unpadded)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randint(0, 3, (3, 7)).double()
    assert torch.autograd.gradcheck(lambda z: lambda_loss(z, r, k=5), (x,))
    # A few gradient steps raise NDCG.
    scores = torch.zeros(8, 20, requires_grad=True)
    relevance = torch.randint(0, 4, (8, 20)).float()
    opt = torch.optim.SGD([scores], lr=1.0)
    start = softtopk.metrics.ndcg_at_k(scores.detach() + 1e-3 * torch.randn(8, 20), relevance, 5).item()
    for _ in range(30):
        loss = lambda_loss(scores, relevance, k=5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert softtopk.metrics.ndcg_at_k(scores.detach(), relevance, 5).item() > max(start, 0.95)


def test_lambda_loss_bad_input():
    with pytest.raises(ValueError, match="relevance must be a tensor"):
        lambda_loss(torch.randn(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="k must be"):
        lambda_loss(torch.randn(2, 4), torch.ones(2, 4), k=5)
    with pytest.raises(ValueError, match="weighting"):
        lambda_loss(torch.randn(2, 4), torch.ones(2, 4), weighting="ndcg1")
    with pytest.raises(ValueError, match="non-negative"):
        lambda_loss(torch.randn(2, 4), -torch.ones(2, 4))


def _load_allrank_lambdaloss():
    """allRank's lambdaLoss.py, loaded on its own: the package's __init__ imports torchvision and
    gcsfs (pinned to torch <= 1.8), so the two names the file imports are provided as stubs."""
    try:
        dist = importlib.metadata.distribution("allrank")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("allrank is not installed (make peers)")
    path = dist.locate_file("allrank/models/losses/lambdaLoss.py")
    stubs = {name: types.ModuleType(name) for name in ("allrank", "allrank.data", "allrank.models")}
    stubs["allrank.data.dataset_loading"] = types.ModuleType("allrank.data.dataset_loading")
    stubs["allrank.data.dataset_loading"].PADDED_Y_VALUE = -1
    stubs["allrank.models.losses"] = types.ModuleType("allrank.models.losses")
    stubs["allrank.models.losses"].DEFAULT_EPS = 1e-10
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("_allrank_lambdaloss", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module, dist.version


@pytest.mark.peer
@pytest.mark.parametrize(
    "ours,theirs",
    [("lambdarank", "lambdaRank_scheme"), ("ndcg2", "ndcgLoss2_scheme"), ("ndcg2++", "ndcgLoss2PP_scheme")],
)
@pytest.mark.parametrize("k", [None, 5])
def test_lambda_loss_equals_allrank(ours, theirs, k):
    module, _ = _load_allrank_lambdaloss()
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(6, 14, generator=gen, dtype=torch.float64)
    rel = torch.randint(0, 5, (6, 14), generator=gen).double()
    expected = module.lambdaLoss(s, rel, weighing_scheme=theirs, k=k, sigma=1.0, mu=10.0, reduction="sum")
    got = lambda_loss(s, rel, k=k, truncation="both", weighting=ours, reduction="sum")
    # allRank clamps sigmoid at 1e-10 before the power: a relative difference of ~1e-9.
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("method", ["perturbed", "subset"])
def test_stochastic_methods_draw_fresh_noise_and_take_a_generator(method):
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    torch.manual_seed(1)
    a = softtopk.losses.topk_cross_entropy(logits, target, p_k=[0.5, 0.5], method=method)
    torch.manual_seed(2)
    assert a != softtopk.losses.topk_cross_entropy(logits, target, p_k=[0.5, 0.5], method=method)
    same = [
        softtopk.losses.TopKCrossEntropyLoss(
            p_k=[0.5, 0.5], method=method, generator=torch.Generator().manual_seed(4)
        )(logits, target)
        for _ in range(2)
    ]
    assert same[0] == same[1]
    scores = [torch.randn(3, 12), torch.randn(3, 12)]
    target01 = softtopk.topk_mask(torch.randn(3, 12), 3, method="hard")
    torch.manual_seed(1)
    c = softtopk.losses.dftopk_cascade_loss(scores, target01, method=method).joint
    torch.manual_seed(2)
    assert c != softtopk.losses.dftopk_cascade_loss(scores, target01, method=method).joint


def test_cascade_losses_in_half_precision_and_with_nan_scores():
    target = softtopk.topk_mask(
        torch.randn(2, 64, generator=torch.Generator().manual_seed(1)), 4, method="hard"
    )
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        s = [torch.randn(2, 64, generator=g).half().requires_grad_() for _ in range(2)]
        for method in ("sparse", "entropic", "dftopk"):
            for a in s:
                a.grad = None
            dftopk_cascade_loss(s, target, method=method).joint.backward()
            assert all(torch.isfinite(a.grad).all() for a in s)  # float16 gave NaN gradients
    scores = [torch.randn(2, 8), torch.randn(2, 8)]
    scores[0][0, 1] = math.nan
    assert torch.isnan(dftopk_cascade_loss(scores, target[:, :8], method="sparse").joint)  # raised in BCE


def test_topk_ce_is_non_negative_with_unbounded_masks():
    logits = 3.0 * torch.randn(256, 10, generator=torch.Generator().manual_seed(0))
    for method in ("neuralsort", "softsort"):
        mask = softtopk.permutation_topk_mask(logits, 5, method=method, temperature=1.0)
        target = mask.argmax(-1)
        assert mask.max() > 1.05  # the case: q_y = mask_5 at the target exceeds 1
        loss = topk_cross_entropy(
            logits, target, p_k=[0, 0, 0, 0, 1], top1="mask", method=method, temperature=1.0, reduction="none"
        )
        assert (loss >= 0).all()


@pytest.mark.parametrize("method", ["neuralsort", "subset"])
def test_lcron_loss_is_finite_for_masks_above_one(method):
    """Unbounded masks (relaxed permutations, subset samples) exceed 1 at moderate t: the
    LCRON BCE clips them to [0, 1] instead of taking the log of a negative number."""
    gen = torch.Generator().manual_seed(0)
    stages = [torch.randn(4, 8, generator=gen, requires_grad=True) for _ in range(2)]
    truth = torch.zeros(4, 8)
    truth[:, :2] = 1.0
    op = softtopk.registry.OPERATORS[method]
    masks = [op(s.detach(), 4, temperature=1.0, generator=torch.Generator().manual_seed(1)) for s in stages]
    assert max(float(m.max()) for m in masks) > 1.0  # the case this guards
    terms = lcron_loss(
        stages, truth, [4, 2], method=method, temperature=1.0, generator=torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(terms.stages).all() and torch.isfinite(terms.joint)
    grads = torch.autograd.grad(terms.joint + terms.stages.sum(), stages)
    assert all(torch.isfinite(g).all() for g in grads)

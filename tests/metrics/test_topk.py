"""Metrics against scikit-learn and brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score, top_k_accuracy_score

from softtopk.metrics import cascade_recall, ndcg_at_k, recall_at_k_at_m, topk_accuracy


@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_accuracy_matches_sklearn(rng, k):
    scores = rng.normal(size=(200, 12))
    target = rng.integers(0, 12, size=200)
    ours = topk_accuracy(torch.from_numpy(scores), torch.from_numpy(target), k)
    expected = top_k_accuracy_score(target, scores, k=k, labels=np.arange(12))
    assert ours.item() == pytest.approx(expected, abs=1e-12)


def test_topk_accuracy_ties_count_for_the_target():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert topk_accuracy(scores, torch.tensor([2]), 1).item() == 1.0
    assert topk_accuracy(scores, torch.tensor([3]), 3).item() == 0.0
    # Any leading shape, and float16 input.
    s = torch.randn(2, 3, 7).half()
    assert topk_accuracy(s, torch.zeros(2, 3, dtype=torch.long), 7).item() == 1.0


@pytest.mark.parametrize("k", [1, 3, 10, None])
@pytest.mark.parametrize("gain", ["linear", "exp"])
def test_ndcg_matches_sklearn(rng, k, gain):
    scores = rng.normal(size=(30, 10))
    rel = rng.integers(0, 4, size=(30, 10)).astype(float)
    rel[0] = 0.0  # an all-irrelevant row: NDCG 0 in both
    ours = ndcg_at_k(torch.from_numpy(scores), torch.from_numpy(rel), k, gain=gain, reduction="none")
    gains = rel if gain == "linear" else 2.0**rel - 1.0
    expected = [ndcg_score(gains[i : i + 1], scores[i : i + 1], k=k, ignore_ties=True) for i in range(30)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-12)


def _brute_recall(scores, relevant, m):
    out = []
    for s, r in zip(scores, relevant, strict=True):
        top = set(np.argsort(-s, kind="stable")[:m])
        total = r.sum()
        out.append(math.nan if total == 0 else sum(r[i] for i in top) / total)
    return np.array(out)


def test_recall_at_k_at_m_against_a_loop(rng):
    scores = rng.normal(size=(40, 30))
    relevant = np.zeros((40, 30))
    for row in relevant:
        row[rng.choice(30, 10, replace=False)] = 1
    relevant[3] = 0  # empty ground truth: NaN per row, left out of the mean
    for m in (0, 5, 10, 20, 30):
        ours = recall_at_k_at_m(torch.from_numpy(scores), torch.from_numpy(relevant), m, reduction="none")
        expected = _brute_recall(scores, relevant, m)
        np.testing.assert_allclose(ours.numpy(), expected, equal_nan=True)
        mean = recall_at_k_at_m(torch.from_numpy(scores), torch.from_numpy(relevant).bool(), m)
        assert mean.item() == pytest.approx(np.nanmean(expected))


def test_cascade_recall_against_a_loop(rng):
    n = 40
    s1, s2, s3 = rng.normal(size=(3, 25, n))
    relevant = np.zeros((25, n))
    for row in relevant:
        row[rng.choice(n, 10, replace=False)] = 1
    ms = [30, 20, 12]
    ours = cascade_recall(
        [torch.from_numpy(s) for s in (s1, s2, s3)], torch.from_numpy(relevant), ms, reduction="none"
    )
    expected = []
    for b in range(25):
        alive = list(range(n))
        for s, m in zip((s1, s2, s3), ms, strict=True):
            alive = sorted(alive, key=lambda i, s=s: -s[b, i])[:m]
        expected.append(relevant[b, alive].sum() / 10)
    np.testing.assert_allclose(ours.numpy(), expected)
    # One stage is Recall@k@m.
    one = cascade_recall([torch.from_numpy(s1)], torch.from_numpy(relevant), [20])
    assert one.item() == pytest.approx(
        recall_at_k_at_m(torch.from_numpy(s1), torch.from_numpy(relevant), 20).item()
    )


def test_cascade_recall_never_revives_a_dropped_item():
    s1 = torch.tensor([[5.0, 4.0, 3.0, -math.inf]])
    s2 = torch.tensor([[-math.inf, -math.inf, -math.inf, 9.0]])  # stage 2 likes only a dropped item
    kept = cascade_recall([s1, s2], torch.tensor([[1, 1, 1, 1]]), [3, 3], reduction="none")
    assert kept.item() == pytest.approx(0.75)


def test_bad_input():
    with pytest.raises(ValueError, match="k must be in"):
        topk_accuracy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), 5)
    with pytest.raises(TypeError, match="target"):
        topk_accuracy(torch.randn(3, 4), torch.zeros(3), 1)
    with pytest.raises(ValueError, match="class indices"):
        topk_accuracy(torch.randn(3, 4), torch.full((3,), 4), 1)
    with pytest.raises(ValueError, match="relevant must have the shape"):
        recall_at_k_at_m(torch.randn(3, 4), torch.zeros(3, 5), 2)
    with pytest.raises(ValueError, match="m must be in"):
        recall_at_k_at_m(torch.randn(3, 4), torch.zeros(3, 4), 5)
    with pytest.raises(ValueError, match="ms\\[1\\]"):
        cascade_recall([torch.randn(2, 6)] * 2, torch.zeros(2, 6), [3, 4])
    with pytest.raises(ValueError, match="non-negative"):
        ndcg_at_k(torch.randn(2, 3), -torch.ones(2, 3))
    with pytest.raises(ValueError, match="gain"):
        ndcg_at_k(torch.randn(2, 3), torch.ones(2, 3), gain="log")
    with pytest.raises(ValueError, match="reduction"):
        ndcg_at_k(torch.randn(2, 3), torch.ones(2, 3), reduction="sum")

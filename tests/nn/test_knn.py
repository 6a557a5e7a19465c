"""SoftKNN / soft_knn: differentiable k-NN over any mask operator, against scikit-learn's k-NN."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from softtopk.nn import SoftKNN
from softtopk.nn.functional import neighbour_scores, soft_knn, soft_knn_loss
from softtopk.registry import OPERATORS


def test_hard_votes_match_scikit_learn(rng):
    X = rng.normal(size=(120, 5))
    labels = rng.integers(0, 4, size=120)
    Q = rng.normal(size=(30, 5))
    votes = soft_knn(
        torch.from_numpy(Q), torch.from_numpy(X), torch.from_numpy(labels), 7, num_classes=4, method="hard"
    )
    knn = KNeighborsClassifier(n_neighbors=7).fit(X, labels)
    np.testing.assert_allclose(votes.numpy(), knn.predict_proba(Q), atol=1e-12)


@pytest.mark.parametrize("method", ["sparse", "sparse-p4/3", "entropic", "lapsum"])
def test_soft_votes_are_the_class_sums_of_the_mask(method):
    q, c = torch.randn(6, 3, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (20,))
    votes = soft_knn(q, c, labels, 4, num_classes=3, method=method, temperature=0.5)
    scores = -((q[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(neighbour_scores(q, c), scores)
    mask = OPERATORS[method](scores, 4, temperature=0.5)
    expected = torch.stack([mask[:, labels == k].sum(-1) for k in range(3)], -1) / 4
    torch.testing.assert_close(votes, expected)
    torch.testing.assert_close(votes.sum(-1), torch.ones(6, dtype=torch.float64))


def test_distances():
    q, c = torch.randn(4, 5), torch.randn(7, 5)
    torch.testing.assert_close(neighbour_scores(q, c, "dot"), q @ c.T)
    cos = torch.nn.functional.cosine_similarity(q[:, None], c[None], dim=-1)
    torch.testing.assert_close(neighbour_scores(q, c, "cosine"), cos)


def test_module_equals_function_state_dict_gradcheck():
    knn = SoftKNN(3, num_classes=4, method="lapsum", temperature=0.7, distance="cosine")
    q, c, labels = torch.randn(5, 6), torch.randn(15, 6), torch.randint(0, 4, (15,))
    expected = soft_knn(q, c, labels, 3, num_classes=4, method="lapsum", temperature=0.7, distance="cosine")
    torch.testing.assert_close(knn(q, c, labels), expected)
    restored = SoftKNN(1, num_classes=2)
    restored.load_state_dict(knn.state_dict())  # no tensors: configuration lives in attributes
    buffer = io.BytesIO()
    torch.save(knn, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(q, c, labels), expected)
    q64 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c64 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 1, 0, 1, 1, 0])
    sparse = SoftKNN(2, num_classes=2, temperature=2.0)
    assert torch.autograd.gradcheck(lambda a, b: sparse(a, b, lab), (q64, c64))


@pytest.mark.slow
def test_compile_equals_eager():
    knn = SoftKNN(3, num_classes=4, method="sparse", temperature=0.5)
    q, c, labels = torch.randn(5, 6), torch.randn(15, 6), torch.randint(0, 4, (15,))
    torch.testing.assert_close(torch.compile(knn, fullgraph=True)(q, c, labels), knn(q, c, labels))


def test_training_an_embedding_with_the_soft_knn_loss():
    """Grover et al.'s setup in miniature (sklearn digits): 100 candidates per step, loss -v_y."""
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=gen)
    train, test = perm[:1200], perm[1200:]
    torch.manual_seed(0)
    embed = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    knn = SoftKNN(5, num_classes=10, method="sparse", temperature=1.0)
    opt = torch.optim.Adam(embed.parameters(), lr=3e-3)
    for _ in range(150):
        idx = train[torch.randperm(len(train), generator=gen)[:200]]
        q, c = idx[:100], idx[100:]
        loss = soft_knn_loss(knn(embed(X[q]), embed(X[c]), y[c]), y[q])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (knn.predict(embed(X[test]), embed(X[train]), y[train]) == y[test]).float().mean().item()
    assert loss.item() < -0.8  # at most 20 % of the soft neighbours have the wrong label
    assert acc > 0.9


def test_bad_input():
    q, c, labels = torch.randn(2, 3), torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="k must be"):
        soft_knn(q, c, labels, 6, num_classes=2)
    with pytest.raises(ValueError, match="\\(Q, D\\)"):
        soft_knn(q, torch.randn(5, 4), labels, 2, num_classes=2)
    with pytest.raises(ValueError, match="candidate_labels"):
        soft_knn(q, c, labels.float(), 2, num_classes=2)
    with pytest.raises(ValueError, match="lie in"):
        soft_knn(q, c, labels + 2, 2, num_classes=2)
    with pytest.raises(ValueError, match="distance"):
        SoftKNN(2, num_classes=2, distance="l1")
    with pytest.raises(ValueError, match="target"):
        soft_knn_loss(torch.rand(2, 3), torch.zeros(3, dtype=torch.long))


def test_stochastic_method_draws_fresh_noise_and_takes_a_generator():
    q, c, labels = torch.randn(4, 3), torch.randn(30, 3), torch.randint(0, 3, (30,))
    knn = SoftKNN(5, num_classes=3, method="perturbed", temperature=0.5)
    torch.manual_seed(1)
    a = knn(q, c, labels)
    torch.manual_seed(2)
    assert not torch.equal(a, knn(q, c, labels))
    seeded = [
        SoftKNN(
            5, num_classes=3, method="perturbed", temperature=0.5, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(seeded[0](q, c, labels), seeded[1](q, c, labels), rtol=0, atol=0)

"""sample_k: exactly k distinct items whose inclusion probabilities are the soft mask."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import softtopk
from softtopk.sampling import SampleK, sample_k
from softtopk.sampling._sample import UNIT_BITS, systematic_rows

L = 1 << UNIT_BITS


def exact_systematic(y: list[Fraction], k: int) -> tuple[list[Fraction], dict[frozenset, Fraction]]:
    """Inclusion probabilities and the law of the sample, by running systematic_rows on every
    order and on one offset u per stretch where the drawn set is constant (exact for dyadic y;
    otherwise to a few units of 2**-40, the rounding of the interval ends)."""
    n = len(y)
    orders = list(itertools.permutations(range(n)))
    orders_t, us, weights = [], [], []
    for order in orders:
        ends = np.cumsum([int(y[j] * L) for j in order]) % L  # the set changes only at u = C_j mod L
        cuts = sorted({0, *map(int, ends)} | {L})
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            orders_t.append(order)
            us.append((a + b) // 2)  # mid-stretch: the units' rounding moves the ends by a few units
            weights.append(Fraction(b - a, L) / len(orders))
    yt = torch.tensor([float(v) for v in y], dtype=torch.float64).expand(len(us), n)
    hits = systematic_rows(
        yt, torch.full((len(us),), k), torch.tensor(orders_t), torch.tensor(us, dtype=torch.int64)
    )
    assert (hits.sum(-1) == k).all()  # exactly k distinct items in every outcome
    pi = [Fraction(0)] * n
    law: dict[frozenset, Fraction] = {}
    for row, w in zip(hits.tolist(), weights, strict=True):
        s = frozenset(i for i, h in enumerate(row) if h)
        law[s] = law.get(s, Fraction(0)) + w
        for i in s:
            pi[i] += w
    return pi, law


def exact_successive(y: list[float], k: int) -> list[float]:
    """Inclusion probabilities of Gumbel top-k with weights y (draws in proportion, without replacement)."""
    n = len(y)
    pi = [0.0] * n
    for seq in itertools.permutations([i for i in range(n) if y[i] > 0], k):
        p, left = 1.0, sum(y)
        for i in seq:
            p *= y[i] / left
            left -= y[i]
        for i in seq:
            pi[i] += p
    return pi


@pytest.mark.parametrize(
    "y, k",
    [
        ([Fraction(1, 2), Fraction(1, 2), Fraction(3, 4), Fraction(1, 4)], 2),
        ([Fraction(1), Fraction(3, 8), Fraction(5, 8), Fraction(0), Fraction(1)], 3),
        ([Fraction(1, 5)] * 5, 1),
        ([Fraction(v, 1024) for v in (1000, 700, 324, 1, 23)], 2),
    ],
)
def test_inclusion_probabilities_by_enumeration(y, k):
    if sum(y) != k:  # 1/5 is not dyadic: its units round down and the deficit is redistributed
        assert abs(sum(y) - k) < Fraction(1, 10**9)
    pi, law = exact_systematic(y, k)
    units = [Fraction(math.floor(v * L), L) for v in y]
    for p, v, u in zip(pi, y, units, strict=True):
        if v.denominator & (v.denominator - 1) == 0:  # dyadic: exact
            assert p == v
        else:
            assert abs(p - v) <= Fraction(len(y), L) and abs(p - u) <= Fraction(len(y), L)
    assert sum(law.values()) == 1 and all(len(s) == k for s in law)
    certain = {i for i, v in enumerate(y) if v == 1}
    never = {i for i, v in enumerate(y) if v == 0}
    assert all(certain <= s and not (never & s) for s in law)


def test_gumbel_top_k_does_not_have_the_mask_as_marginals():
    y = [1.0, 0.5, 0.3, 0.2]
    succ = exact_successive(y, 2)
    assert succ[0] < 0.9 and max(abs(a - b) for a, b in zip(succ, y, strict=True)) > 0.1
    pi, _ = exact_systematic([Fraction(v).limit_denominator(10) for v in y], 2)
    assert max(abs(float(p) - v) for p, v in zip(pi, y, strict=True)) < 1e-11
    # relaxed_subset's hard sample is that successive sampling: Monte Carlo within 5 SE
    S = 40_000
    logits = torch.tensor(y).log().expand(S, 4)
    gen = torch.Generator().manual_seed(1)
    z = softtopk.relaxed_subset(logits, 2, temperature=1e-3, hard=True, generator=gen)
    freq = z.detach().mean(0).double()
    se = (torch.tensor(succ) * (1 - torch.tensor(succ)) / S).sqrt()
    assert ((freq - torch.tensor(succ)).abs() <= 5 * se + 1e-12).all()


@pytest.mark.parametrize("method", ["sparse", "entropic", "lapsum"])
@pytest.mark.slow
def test_marginals_of_soft_masks_within_five_standard_errors(method):
    torch.manual_seed(0)
    k, n, rows, S = 5, 30, 6, 20_000
    y = softtopk.topk_mask(torch.randn(rows, n), k, method=method, temperature=0.5)
    assert torch.allclose(y.sum(-1), torch.full((rows,), float(k)), atol=1e-4)
    gen = torch.Generator().manual_seed(123)
    z = sample_k(y.repeat(S, 1), k, generator=gen)
    assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == k).all()
    freq = z.reshape(S, rows, n).double().mean(0)
    yd = y.double()
    se = (yd * (1 - yd) / S).sqrt()
    assert ((freq - yd).abs() <= 5 * se + 1e-9).all()
    assert torch.equal(freq[yd == 0], yd[yd == 0]) and torch.equal(freq[yd == 1], yd[yd == 1])
    if method == "sparse":
        assert (yd == 0).any() and (yd == 1).any()  # the exact 0/1 entries were exercised


def test_straight_through_gradient():
    y = torch.tensor([[0.9, 0.6, 0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    z = sample_k(y, 2, generator=torch.Generator().manual_seed(0))
    v = torch.tensor([[1.0, -2.0, 3.0, 0.5]], dtype=torch.float64)
    (z * v).sum().backward()
    assert torch.equal(y.grad, v) and z.sum().item() == 2
    assert not sample_k(y, 2, straight_through=False).requires_grad
    x = torch.randn(3, 8, requires_grad=True)  # through a soft mask back to the scores
    sample_k(softtopk.topk_mask(x, 3, temperature=1.0), 3).sum(0)[0].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_per_row_k_dims_dtypes_and_generator():
    y = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 1.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
    k = torch.tensor([1, 3, 1])
    z = sample_k(y, k, generator=torch.Generator().manual_seed(0))
    assert z.sum(-1).tolist() == [1, 3, 1] and z[1, :2].tolist() == [1, 1]
    zt = sample_k(y.T.contiguous(), k, 0, generator=torch.Generator().manual_seed(0))
    assert zt.shape == (4, 3) and zt.sum(0).tolist() == [1, 3, 1]
    half = sample_k(y.half(), k)
    assert half.dtype == torch.float16 and half.sum(-1).tolist() == [1, 3, 1]
    a = sample_k(y.repeat(50, 1), k.repeat(50), generator=torch.Generator().manual_seed(7))
    b = sample_k(y.repeat(50, 1), k.repeat(50), generator=torch.Generator().manual_seed(7))
    c = sample_k(y.repeat(50, 1), k.repeat(50), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    batched = sample_k(torch.full((2, 3, 6), 0.5), 3)
    assert batched.shape == (2, 3, 6) and (batched.sum(-1) == 3).all()


def test_nan_row_stays_in_its_row_and_edge_budgets():
    y = torch.tensor([[0.5, math.nan, 0.5], [0.5, 0.5, 1.0]])
    z = sample_k(y, 2)
    assert z[0].isnan().all() and z[1].tolist() == [z[1, 0].item(), z[1, 1].item(), 1.0]
    assert z[1].sum() == 2
    assert sample_k(torch.zeros(2, 4), 0).sum() == 0
    assert torch.equal(sample_k(torch.ones(2, 4), 4), torch.ones(2, 4))


def test_arguments_are_validated():
    y = torch.tensor([[0.5, 0.5, 1.0]])
    with pytest.raises(ValueError, match="sum to k"):
        sample_k(y, 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_k(torch.tensor([1.5, 0.5]), 2)
    with pytest.raises(TypeError, match="k"):
        sample_k(y, 2.0)
    with pytest.raises(TypeError, match="k"):
        sample_k(y, torch.tensor([2.0]))
    with pytest.raises(ValueError, match="k"):
        sample_k(y, 4)
    with pytest.raises(TypeError, match="generator"):
        sample_k(y, 2, generator=0)
    with pytest.raises(TypeError, match="probs"):
        sample_k(torch.tensor([1, 1]), 2)
    with pytest.raises(TypeError, match="straight_through"):
        sample_k(y, 2, straight_through=1)


def test_module():
    layer = SampleK(2, generator=torch.Generator().manual_seed(0))
    z = layer(torch.tensor([[1.0, 0.5, 0.5]]))
    assert z.sum() == 2 and z[0, 0] == 1 and "k=2" in repr(layer)
    with pytest.raises(ValueError, match="k"):
        SampleK(-1)

"""filter_logits: top-k / top-p / min-p by threshold search, against the sort and the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softtopk.sampling import LogitsFilter, filter_logits, filter_logits_sort
from softtopk.sampling._filter import FIRST_CANDIDATES, UNIT_BITS
from tests.conftest import random_rows


def logit_rows(rng, rows, n, *, ties=True):
    """Rows of several scales (peaked to flat), with ties (rounded values) and -inf padding."""
    x = random_rows(rng, rows, n, ties=ties)
    scale = rng.choice([0.3, 1.0, 3.0, 10.0], size=(rows, 1))
    x = x * scale
    if ties:
        coarse = rng.random(rows) < 0.3  # many exact ties at every level
        x[coarse] = np.round(x[coarse])
    return torch.tensor(x, dtype=torch.float32)


def random_params(rng, rows, n):
    top_k = torch.tensor(rng.integers(1, n + 5, size=rows))
    top_p = torch.tensor(rng.choice([1e-3, 0.3, 0.9, 0.95, 0.999, 1.0], size=rows))
    top_p = torch.where(torch.rand(rows) < 0.5, top_p, torch.rand(rows).clamp_min(1e-6).double())
    min_p = torch.tensor(rng.choice([0.0, 0.01, 0.1, 0.5, 1.0], size=rows))
    return top_k, top_p, min_p


COMBOS = [
    dict(top_k=True),
    dict(top_p=True),
    dict(min_p=True),
    dict(top_k=True, top_p=True),
    dict(top_k=True, top_p=True, min_p=True),
    dict(top_p=True, min_p=True),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("n", [7, 300, 3000])
@pytest.mark.slow
def test_equals_the_sort_reference_on_thousands_of_rows_with_ties(rng, combo, n):
    rows = 4000 if n < 3000 else 600
    x = logit_rows(rng, rows, n)
    top_k, top_p, min_p = random_params(rng, rows, n)
    kw = {
        "top_k": top_k if "top_k" in combo else None,
        "top_p": top_p if "top_p" in combo else None,
        "min_p": min_p if "min_p" in combo else None,
    }
    fast, ref = filter_logits(x, **kw), filter_logits_sort(x, **kw)
    assert torch.equal(fast, ref)  # the same kept set and the same values (-inf elsewhere)
    kept = fast > -math.inf
    assert kept.sum() > 0 and (~kept & (x > -math.inf)).sum() > 0  # the filters did something
    assert torch.equal(fast[kept], x[kept])


def test_rows_whose_nucleus_exceeds_the_first_candidates_are_widened(rng):
    n = 20_000
    scale = torch.tensor([0.05, 5.0, 2.3]).repeat(22)[:64, None]  # flat, peaked and in between
    x = torch.randn(64, n) * scale
    x[::4] = torch.round(x[::4] * 100) / 100  # ties
    out = filter_logits(x, top_p=0.9)
    kept = (out > -math.inf).sum(-1)
    assert kept[0::3].min() > n // 2  # sorted after the first round
    assert kept[1::3].max() < FIRST_CANDIDATES  # found among the first candidates
    assert FIRST_CANDIDATES < kept[2::3].min() and kept[2::3].max() < n // 2  # a second, wider round
    assert torch.equal(out, filter_logits_sort(x, top_p=0.9))


def units(x):
    """The probability units of the definition: floor(exp(x - logsumexp(x)) * 2**50), float32 p."""
    lse = torch.logsumexp(x, -1, keepdim=True)
    return np.floor(torch.exp(x - lse).double().numpy() * 2.0**UNIT_BITS).astype(object)


def brute_force(x, top_k=None, top_p=None, min_p=None):
    """The rules entry by entry, with Python integers: no sort, no cumulative sum."""
    xs = x.double().numpy()
    keep = np.ones(xs.shape, bool)
    for r in range(xs.shape[0]):
        row, q = xs[r], units(x[r])
        alive = np.ones(len(row), bool)
        if top_k is not None:
            kth = sorted(row, reverse=True)[min(int(top_k[r]), len(row)) - 1]
            alive = row >= kth
        if top_p is not None and float(top_p[r]) < 1.0:
            mass = sum(q[alive])
            target = float(top_p[r]) * float(mass) if top_k is not None else float(top_p[r]) * 2.0**UNIT_BITS
            above = np.array([sum(q[alive & (row > v)]) for v in row], dtype=object)
            alive = alive & np.array([float(a) < target for a in above])
        if min_p is not None:
            alive = alive & (row - row.max() >= math.log(float(min_p[r])) if float(min_p[r]) > 0 else alive)
        keep[r] = alive
    return torch.tensor(keep)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c))
def test_matches_the_definition_entry_by_entry(rng, combo):
    rows, n = 400, 9
    x = logit_rows(rng, rows, n)
    x[x == -math.inf] = -30.0  # brute force on finite rows
    top_k, top_p, min_p = random_params(rng, rows, n)
    kw = {
        "top_k": top_k if "top_k" in combo else None,
        "top_p": top_p if "top_p" in combo else None,
        "min_p": min_p if "min_p" in combo else None,
    }
    kept = filter_logits(x, **kw) > -math.inf
    assert torch.equal(kept, brute_force(x, **kw))


def test_is_the_usual_nucleus_away_from_the_boundary(rng):
    """Against a float64 sort + cumsum (Holtzman et al.'s rule with the boundary tie kept)."""
    rows, n = 3000, 200
    x = torch.tensor(rng.normal(size=(rows, n)) * rng.choice([0.3, 1.0, 3.0, 10.0], size=(rows, 1)))
    top_p = torch.rand(rows, dtype=torch.float64) * 0.98 + 0.01
    kept = filter_logits(x, top_p=top_p) > -math.inf
    p = torch.softmax(x, -1)
    s, idx = torch.sort(p, -1, descending=True)
    cum = s.cumsum(-1)
    # keep the smallest prefix whose mass reaches top_p
    keep_sorted = (cum - s) < top_p[:, None]
    ref = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    gap = (cum - top_p[:, None]).abs().min(-1).values
    mismatch = (kept != ref).any(-1)
    assert (gap[mismatch] < 1e-9).all()
    assert mismatch.float().mean() < 0.01


def test_ties_are_kept_together():
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    assert filter_logits(x, top_k=2).isfinite().tolist() == [[True, False, True, True, True, False]]
    # p = softmax: the top entry alone holds about 0.48; the three tied 2.0s come in together
    p0 = torch.softmax(x, -1)[0, 0].item()
    assert filter_logits(x, top_p=p0 * 0.99).isfinite().sum() == 1
    assert filter_logits(x, top_p=p0 * 1.01).isfinite().tolist() == [[True, False, True, True, True, False]]
    assert filter_logits(torch.zeros(1, 10), top_k=3).isfinite().all()  # all tied: all kept
    assert filter_logits(torch.zeros(1, 10), top_p=0.01).isfinite().all()


def test_limits_keep_everything_or_the_maximum():
    x = torch.tensor([[0.5, 2.0, -1.0, 2.0, 1.0]])
    for kw in [dict(top_k=5), dict(top_k=99), dict(top_p=1.0), dict(min_p=0.0)]:
        assert torch.equal(filter_logits(x, **kw), x), kw
    for kw in [dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0)]:
        assert filter_logits(x, **kw).isfinite().tolist() == [[False, True, False, True, False]], kw
    assert filter_logits(x).equal(x) and filter_logits(x) is not x


def test_combined_filters_are_the_intersection_in_warper_order():
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    # top-k = 3 then top-p over the three survivors, renormalised: 0.665, 0.245, 0.090
    assert filter_logits(x, top_k=3, top_p=0.8).isfinite().sum() == 2
    assert filter_logits(x, top_p=0.8).isfinite().sum() == 2
    assert filter_logits(x, top_k=3, top_p=0.95).isfinite().sum() == 3
    # without top-k: 0.634, 0.233, 0.086, 0.032, ...; cumulative 0.953 at 3, 0.984 at 4
    assert filter_logits(x, top_p=0.96).isfinite().sum() == 4
    assert filter_logits(x, top_p=0.96, min_p=0.1).isfinite().sum() == 3  # exp(-2) > 0.1 > exp(-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(rng, dtype):
    x = logit_rows(rng, 200, 50).to(dtype)
    kw = dict(top_k=torch.tensor(rng.integers(1, 60, 200)), top_p=0.9, min_p=0.05)
    out = filter_logits(x, **kw)
    assert out.dtype == dtype and torch.equal(out, filter_logits_sort(x, **kw))
    if dtype != torch.float64:
        assert torch.equal(out.isfinite(), filter_logits(x.float(), **kw).isfinite())


def test_any_dim_and_per_row_parameters_broadcast(rng):
    x = logit_rows(rng, 60, 40).reshape(3, 20, 40)
    top_p = torch.rand(3, 1) * 0.9 + 0.05  # one per batch entry, broadcast over the 20 rows
    out = filter_logits(x, top_k=torch.tensor(7), top_p=top_p)
    for b in range(3):
        assert torch.equal(out[b], filter_logits(x[b], top_k=7, top_p=float(top_p[b])))
    moved = filter_logits(x.transpose(1, 2), top_p=top_p, dim=1)
    assert torch.equal(moved.transpose(1, 2), filter_logits(x, top_p=top_p))
    per_row = torch.tensor([1, 3, 40, 100]).repeat(15)
    rows = x.reshape(60, 40)
    got = filter_logits(rows, top_k=per_row)
    for r in range(0, 60, 7):
        assert torch.equal(got[r], filter_logits(rows[r], top_k=int(per_row[r])))


def test_odd_rows_stay_in_their_row():
    x = torch.randn(5, 8)
    x[1, 3] = math.nan
    x[2, 0] = math.inf
    x[3] = -math.inf
    x[4, :6] = -math.inf
    out = filter_logits(x, top_k=2, top_p=0.9, min_p=0.1)
    assert out[1].isnan().all() and out[2].isnan().all()
    assert torch.equal(out[3], x[3])
    assert torch.equal(out[0], filter_logits(x[0], top_k=2, top_p=0.9, min_p=0.1))
    assert torch.equal(out[4], filter_logits(x[4], top_k=2, top_p=0.9, min_p=0.1))
    assert out[4].isfinite().sum() >= 1 and not out[4, :6].isfinite().any()
    assert torch.equal(out.isnan(), filter_logits_sort(x, top_k=2, top_p=0.9, min_p=0.1).isnan())


def test_gradient_flows_to_the_kept_logits():
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    out = filter_logits(x, top_k=3)
    out.masked_fill(out == -math.inf, 0.0).sum().backward()
    assert torch.equal(x.grad, (out > -math.inf).double())


def test_arguments_are_validated():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(x, top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        filter_logits(x, top_k=1.5)
    with pytest.raises(TypeError, match="top_k"):
        filter_logits(x, top_k=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(x, top_k=torch.tensor([1, 0]))
    for bad in (0.0, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="top_p"):
            filter_logits(x, top_p=bad)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(x, top_p=torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="min_p"):
        filter_logits(x, min_p=1.01)
    with pytest.raises(TypeError, match="min_p"):
        filter_logits(x, min_p=True)
    with pytest.raises(TypeError, match="top_p"):
        filter_logits(x, top_p="0.9")
    with pytest.raises(ValueError, match="broadcastable"):
        filter_logits(x, top_p=torch.rand(3))
    with pytest.raises(TypeError, match="logits"):
        filter_logits(torch.arange(5), top_k=2)
    with pytest.raises(IndexError, match="dim"):
        filter_logits(x, top_k=2, dim=2)


def test_module():
    layer = LogitsFilter(top_k=2, top_p=0.9)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), filter_logits(x, top_k=2, top_p=0.9))
    assert "top_k=2" in repr(layer)
    with pytest.raises(ValueError, match="top_p"):
        LogitsFilter(top_p=2.0)
    with pytest.raises(TypeError, match="top_k"):
        LogitsFilter(top_k=2.5)

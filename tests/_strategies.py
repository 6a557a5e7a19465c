"""Hypothesis strategies for the adversarial suite: rows of scores and budgets.

Rows mix ordinary values, ties, constant rows, tiny and huge magnitudes (up to the
dtype's largest finite value) and large offsets; budgets are 0, n, whole, fractional or
per row. Values are drawn in float64 and rounded to the dtype (clamped to its finite
range), so every dtype sees the same kinds of rows.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

FLOATS = (torch.float32, torch.float64)
HALF = (torch.float16, torch.bfloat16)


def finfo(dtype: torch.dtype) -> torch.finfo:
    return torch.finfo(dtype)


def to_dtype(values: list[list[float]], dtype: torch.dtype, n: int) -> torch.Tensor:
    """Rows (B, n) in ``dtype``; finite values stay finite (clamped to the dtype's range)."""
    x = torch.tensor(values, dtype=torch.float64).reshape(len(values), n)
    big = finfo(dtype).max
    finite = torch.isfinite(x)
    x = torch.where(finite, x.clamp(-big, big), x).to(dtype)
    # Rounding to the dtype can push a value just below the limit to inf.
    return torch.where(finite.to(x.device), x.clamp(-big, big), x)


@st.composite
def row_values(draw, n: int, dtype: torch.dtype, *, extreme: bool = True) -> list[float]:
    """One finite row of length n, of a drawn style."""
    if n == 0:
        return []
    big = finfo(dtype).max
    tiny = finfo(dtype).tiny
    styles = ["normal", "ties", "constant", "scaled", "offset"]
    if extreme:
        styles += ["any", "limits"]
    style = draw(st.sampled_from(styles))
    unit = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False)
    if style == "normal":
        return draw(st.lists(unit, min_size=n, max_size=n))
    if style == "ties":
        pool = draw(st.lists(unit, min_size=1, max_size=3))
        return draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    if style == "constant":
        c = draw(st.one_of(unit, st.floats(-big, big)) if extreme else unit)
        return [c] * n
    if style == "offset":
        # Small differences on a large common offset (|x| / t large, gaps of a few ulps).
        offset = draw(st.sampled_from([1e3, 1e6, -1e6, 3e7]))
        base = draw(st.lists(st.integers(-4, 4), min_size=n, max_size=n))
        return [offset + b * 0.25 for b in base]
    if style == "scaled":
        lo = math.log10(tiny) if extreme else -6.0
        hi = math.floor(math.log10(big)) if extreme else 6.0
        scale = 10.0 ** draw(st.floats(lo, hi))
        # v * scale can overflow to +-inf past the dtype's largest value: clamp it there.
        return [max(-big, min(big, v * scale)) for v in draw(st.lists(unit, min_size=n, max_size=n))]
    if style == "any":
        return draw(st.lists(st.floats(-big, big), min_size=n, max_size=n))
    # "limits": the dtype's extremes mixed with ordinary values.
    pool = st.sampled_from([big, -big, tiny, -tiny, 0.0, 1.0, -1.0, big / 2, -big / 3])
    return draw(st.lists(st.one_of(pool, unit), min_size=n, max_size=n))


@st.composite
def rows(
    draw,
    dtype: torch.dtype,
    *,
    min_n: int = 0,
    max_n: int = 10,
    min_b: int = 1,
    max_b: int = 4,
    extreme: bool = True,
) -> torch.Tensor:
    """A finite batch of rows (B, n) in ``dtype``."""
    n = draw(st.integers(min_n, max_n))
    b = draw(st.integers(min_b, max_b))
    values = [draw(row_values(n, dtype, extreme=extreme)) for _ in range(b)]
    return to_dtype(values, dtype, n)


@st.composite
def budget(draw, x: torch.Tensor, *, integer: bool = False, per_row: bool = True) -> float | torch.Tensor:
    """A budget for rows x (B, n): 0, n, whole, fractional, or a per-row tensor."""
    n, b = x.shape[-1], x.shape[0]
    whole = st.integers(0, n)
    kinds = [whole, st.sampled_from([0, n])]
    if not integer:
        kinds.append(st.floats(0.0, float(n), allow_nan=False))
        kinds.append(st.sampled_from([0.5, n - 0.5]).filter(lambda v: 0 <= v <= n))
    scalar = st.one_of(*kinds)
    if per_row and draw(st.booleans()):
        values = draw(st.lists(scalar, min_size=b, max_size=b))
        return torch.tensor([float(v) for v in values], dtype=torch.float64)
    return draw(scalar)


def k_for_row(k: float | torch.Tensor, i: int) -> float:
    """The budget of row i."""
    if isinstance(k, torch.Tensor):
        return float(k[i])
    return float(k)


def k_tensor(k: float | torch.Tensor, b: int) -> torch.Tensor:
    """The budgets as a (B,) float64 tensor."""
    if isinstance(k, torch.Tensor):
        return k.to(torch.float64)
    return torch.full((b,), float(k), dtype=torch.float64)


def temperatures(default: float) -> st.SearchStrategy[float]:
    """The operator's default temperature and adversarial ones (tiny and huge)."""
    return st.sampled_from([default, default, 1e-6, 1e-3, 1.0, 1e4])

"""Row rules shared by the operators outside the threshold family.

The threshold family (``softtopk.threshold``) classifies rows before solving them; the
operators of this package that are not threshold masks (DFTopK, perturbed masks,
permutation relaxations, relaxed subsets) follow the same table, so every mask of the
library agrees on the edge cases:

==========================  ==========================================================
row                         result
==========================  ==========================================================
contains NaN                NaN everywhere in the row (NaN gradient), other rows unaffected
k = 0                       zeros
at least k entries +inf     k / (number of +inf) on the +inf entries, 0 elsewhere
at most k entries > -inf    1 on every entry > -inf, 0 on -inf (padding)
otherwise (regular)         the operator's own value
==========================  ==========================================================

Rows set by a rule get no gradient (except NaN rows). The operator itself runs on
:func:`regular_rows`, where ruled rows are replaced by zeros, so that nothing infinite
reaches its arithmetic in rows whose result is thrown away.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import is_tracing
from ..threshold._solver import RowRules, classify_rows, row_range


def classify(x: Tensor, k: Tensor) -> tuple[RowRules, Tensor]:
    """The rule of each row of ``x`` (B, n) with budgets ``k`` (B,), and its count above -inf.

    The count (B,) is in the dtype of x. A min and a max per row tell whether any entry
    is infinite or NaN; the entries are counted only then.
    """
    _, _, nan, n_fin, n_pos = row_range(x.detach())
    return classify_rows(k.detach().to(x.dtype), n_fin, n_pos, nan), n_fin + n_pos


def all_regular(rules: RowRules) -> bool:
    """True when no row is set by a rule (always False while tracing: no host sync)."""
    return not is_tracing() and bool(rules.regular.all())


def regular_rows(x: Tensor, rules: RowRules) -> Tensor:
    """``x`` with the rows set by a rule replaced by zeros."""
    if all_regular(rules):
        return x
    return torch.where(rules.regular.unsqueeze(-1), x, 0.0)


def finish(x: Tensor, k: Tensor, y: Tensor, rules: RowRules) -> Tensor:
    """Overwrites the rows of ``y`` that a rule sets (see the module docstring)."""
    if all_regular(rules):
        return y
    col = lambda m: m.unsqueeze(-1)  # noqa: E731
    xd = x.detach()
    y_rule = torch.where(col(rules.pos), (xd == math.inf) * col(k.detach() / rules.n_pos.clamp(min=1)), 0.0)
    y_rule = torch.where(col(rules.ones), (xd > -math.inf).to(y.dtype), y_rule)
    out = torch.where(col(rules.regular), y, y_rule.to(y.dtype))
    # NaN rows: NaN with a NaN gradient; the inner where keeps that NaN out of the
    # gradient of the other rows (0 * NaN would leak through the outer where).
    nan_rows = torch.where(col(rules.nan), x, 0.0) * math.nan
    return torch.where(col(rules.nan), nan_rows, out)

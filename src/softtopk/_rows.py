"""The row front end and the row rules that every operator of the library shares.

Every operator acts on rows: :func:`rowwise` validates ``x``, ``dim`` and ``k``, moves
``dim`` last, flattens the other dims into a batch of B rows and returns the budgets as a
(B,) tensor, so an operator only ever sees rows (B, n). The rows that a mask cannot
solve in the ordinary way follow one table, applied by :func:`classify` and
:func:`apply_rules` (the compiled kernels apply the same table row by row):

==========================  ==========================================================
row                         result
==========================  ==========================================================
contains NaN, or a NaN k    NaN everywhere in the row (NaN gradient); other rows unaffected
k = 0                       zeros
at least k entries +inf     k / (number of +inf) on the +inf entries, 0 elsewhere
at most k entries > -inf    1 on every entry > -inf, 0 on -inf (padding)
otherwise (regular)         the operator's own value; -inf entries are padding (0)
==========================  ==========================================================

Rows set by a rule get no gradient (except NaN rows, whose gradient is NaN). An
operator's arithmetic runs on :func:`regular_rows`, where ruled rows are replaced by
zeros, so that nothing infinite reaches it in rows whose result is thrown away.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_dim, check_tensor, compute_dtype, may_sync


class Rows(NamedTuple):
    """An input seen as rows.

    Attributes:
        x: (B, n) rows in the compute dtype (float32, or float64 for float64 input).
        k: (B,) budgets in the compute dtype, or the dtype asked of :func:`rowwise` (a
            floating k tensor keeps its gradient).
        dim: the non-negative dim of the input the rows run along.
        dtype: the input's dtype, which the outputs return to.
        restore: maps a (B, m) tensor back to the input's layout (batch dims and ``dim``
            where they were, m along ``dim``) and to the input's dtype.
    """

    x: Tensor
    k: Tensor
    dim: int
    dtype: torch.dtype
    restore: Callable[[Tensor], Tensor]


def to_rows(x: Tensor, dim: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Moves ``dim`` last and flattens the rest: returns rows ``(B, n)`` and the inverse map.

    The inverse map takes a ``(B, m)`` tensor and restores the batch shape and the
    position of ``dim`` (with m entries along it).
    """
    if x.dim() == 2 and dim == 1:  # already rows: the common case, without reshapes
        return x, _identity
    last = dim == x.dim() - 1
    moved = x if last else x.movedim(dim, -1)
    batch_shape = moved.shape[:-1]
    rows = moved.reshape(math.prod(batch_shape), moved.shape[-1])

    def restore(y: Tensor) -> Tensor:
        y = y.reshape(*batch_shape, y.shape[-1])
        return y if last else y.movedim(-1, dim)

    return rows, restore


def _identity(y: Tensor) -> Tensor:
    return y


def budgets(
    k: object, x: Tensor, dim: int, rows: int, dtype: torch.dtype, *, integer: bool = False, name: str = "k"
) -> Tensor:
    """Validates ``k`` and returns it as a ``(rows,)`` tensor of ``dtype`` on ``x.device``.

    ``k`` is a real number in [0, n] (n = x.shape[dim]), or a tensor of per-row budgets
    whose shape is the batch shape of x (x.shape without dim), or x.shape with size 1 at
    dim, or anything that broadcasts to the batch shape. Gradients flow to a floating k
    tensor. The range of a k tensor is checked where its values are on the host (a CPU
    tensor outside tracing); elsewhere a row whose k is NaN or outside [0, n] comes out
    NaN (see the module's table), so that a call never waits for the device.
    With ``integer`` the values must be whole numbers.
    """
    n = x.shape[dim]
    if isinstance(k, Tensor):
        if k.dtype == torch.bool or k.is_complex():
            raise TypeError(f"{name} must be a real number or a real tensor, got a tensor of {k.dtype}")
        batch_shape = x.shape[:dim] + x.shape[dim + 1 :]
        if k.dim() == x.dim() and k.dim() > 0 and k.shape[dim] == 1:
            k = k.squeeze(dim)
        try:
            kb = torch.broadcast_to(k, batch_shape)
        except RuntimeError:
            raise ValueError(
                f"{name} must be a number or a tensor broadcastable to the batch shape "
                f"{tuple(batch_shape)} of x (x.shape without dim={dim}); got shape {tuple(k.shape)}"
            ) from None
        kvec = kb.reshape(rows).to(device=x.device, dtype=dtype)
        if kvec.numel() > 0 and may_sync(kvec):
            kd = kvec.detach()
            lo, hi = torch.aminmax(kd)
            if not (bool(lo >= 0) and bool(hi <= n)):
                raise ValueError(
                    f"{name} must lie in [0, n] = [0, {n}] along dim={dim}; got values in "
                    f"[{lo.item()}, {hi.item()}]"
                )
            if integer and bool((kd != kd.round()).any()):
                raise ValueError(f"{name} must hold whole numbers, got {k!r:.80}")
        return kvec
    if (
        type(k) is not int
        and type(k) is not float
        and (isinstance(k, bool) or not isinstance(k, numbers.Real))
    ):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(k).__name__} {k!r}")
    kf = float(k)
    if not 0.0 <= kf <= n:
        raise ValueError(f"{name} must lie in [0, n] = [0, {n}] along dim={dim}, got {k!r}")
    if integer and kf != round(kf):
        raise ValueError(f"{name} must be a whole number, got {k!r}")
    return torch.full((rows,), kf, dtype=dtype, device=x.device)


def rowwise(
    x: object,
    k: object,
    dim: object,
    *,
    name: str = "x",
    integer_k: bool = False,
    k_grad: bool = True,
    k_dtype: torch.dtype | None = None,
) -> Rows:
    """The one front end: checks ``x``, ``dim`` and ``k`` and returns the rows.

    Args:
        x: the input; a floating tensor with at least one dimension.
        k: the budget (see :func:`budgets`).
        dim: the dimension to act along (an IndexError when out of range, as in torch).
        name: the name of ``x`` in error messages.
        integer_k: the budgets must be whole numbers.
        k_grad: the operator is differentiable in k; otherwise a k that requires grad
            is refused (a ValueError), never silently given a zero gradient.
        k_dtype: the dtype of the budgets (default: the compute dtype); the threshold
            solvers take float64.
    """
    x = check_tensor(x, name)
    d = check_dim(dim, x.dim())
    if not k_grad and isinstance(k, Tensor) and k.requires_grad:
        raise ValueError("this operator is not differentiable in k; pass a k that does not require grad")
    cd = compute_dtype(x.dtype)
    rows, restore = to_rows(x, d)
    kvec = budgets(k, x, d, rows.shape[0], k_dtype or cd, integer=integer_k)
    dtype = x.dtype
    if cd == dtype:
        return Rows(rows, kvec, d, dtype, restore)

    def back(y: Tensor) -> Tensor:
        return restore(y).to(dtype)

    return Rows(rows.to(cd), kvec, d, dtype, back)


def empty_result(x: Tensor, k: object = None) -> Tensor:
    """The result for an input with no entries: an empty tensor like x, in x's graph.

    ``torch.zeros_like`` would cut the graph: ``backward`` on a loss built from an empty
    batch would raise instead of giving x (and a k tensor that requires grad) its empty
    or zero gradient.
    """
    y = x * 0
    if isinstance(k, Tensor) and k.requires_grad:
        y = y + (k.sum() * 0).to(y.dtype)
    return y


# ---------------------------------------------------------------------------- row rules


class RowRules(NamedTuple):
    """Per-row classification (B,) of rows (B, n) with budgets (B,); see the module's table.

    Attributes:
        nan: the row holds a NaN, or its k is NaN or outside [0, n].
        zero: k = 0.
        pos: at least k entries are +inf.
        ones: at most k entries are above -inf.
        n_pos: number of +inf entries (float).
        n_fin: number of finite entries (float).
    """

    nan: Tensor
    zero: Tensor
    pos: Tensor
    ones: Tensor
    n_pos: Tensor
    n_fin: Tensor

    @property
    def regular(self) -> Tensor:
        return ~(self.nan | self.zero | self.pos | self.ones)


def row_range(v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Finite min and max of each row, its NaN flag, and its counts of finite and +inf entries.

    A plain min and max tell which rows hold a NaN or an infinity; where the values are
    on the host and none does, the entries are not counted (boolean reductions are slow
    on CPU).
    """
    vmax, vmin = v.amax(-1), v.amin(-1)
    n = float(v.shape[-1])
    if may_sync(v) and bool(torch.isfinite(vmax).all() & torch.isfinite(vmin).all()):
        full = torch.full_like(vmax, n)
        return vmin, vmax, torch.zeros_like(vmax, dtype=torch.bool), full, torch.zeros_like(vmax)
    finite = torch.isfinite(v)
    nan = torch.isnan(vmax)
    n_fin = finite.sum(-1).to(v.dtype)
    n_pos = (v == math.inf).sum(-1).to(v.dtype)
    vmax = torch.where(finite, v, -math.inf).amax(-1)
    vmin = torch.where(finite, v, math.inf).amin(-1)
    return vmin, vmax, nan, n_fin, n_pos


def classify_counts(k: Tensor, n: int, n_fin: Tensor, n_pos: Tensor, nan: Tensor) -> RowRules:
    """The rules of rows from their counts of finite and +inf entries and their NaN flags."""
    k = k.detach().to(n_fin.dtype)
    nan = nan | torch.isnan(k) | (k < 0) | (k > n)
    zero = (k <= 0) & ~nan
    pos = (n_pos >= k) & ~zero & ~nan
    ones = (n_fin + n_pos <= k) & ~zero & ~pos & ~nan
    return RowRules(nan, zero, pos, ones, n_pos, n_fin)


def classify(x: Tensor, k: Tensor) -> RowRules:
    """The rule of each row of ``x`` (B, n) with budgets ``k`` (B,)."""
    _, _, nan, n_fin, n_pos = row_range(x.detach())
    return classify_counts(k, x.shape[-1], n_fin, n_pos, nan)


def all_regular(rules: RowRules) -> bool:
    """True when no row is set by a rule; always False where that would need a device sync."""
    return may_sync(rules.nan) and bool(rules.regular.all())


def regular_rows(x: Tensor, rules: RowRules) -> Tensor:
    """``x`` with the rows set by a rule replaced by zeros."""
    if all_regular(rules):
        return x
    return torch.where(rules.regular.unsqueeze(-1), x, 0.0)


def rule_values(x: Tensor, k: Tensor, rules: RowRules) -> Tensor:
    """The table's values on the rows set by a rule (zeros on regular rows); no gradient."""
    col = lambda m: m.unsqueeze(-1)  # noqa: E731
    xd = x.detach()
    share = (k.detach().to(xd.dtype) / rules.n_pos.to(xd.dtype).clamp(min=1)).unsqueeze(-1)
    y = torch.where(col(rules.pos), (xd == math.inf) * share, 0.0)
    y = torch.where(col(rules.ones), (xd > -math.inf).to(xd.dtype), y)
    return torch.where(col(rules.nan), math.nan, y)


def apply_rules(x: Tensor, k: Tensor, y: Tensor, rules: RowRules) -> Tensor:
    """``y`` on the regular rows, the table's values elsewhere (see the module docstring).

    The ruled rows get no gradient, except NaN rows, whose gradient is NaN; the inner
    ``where`` keeps that NaN out of the other rows' gradients.
    """
    if all_regular(rules):
        return y
    col = lambda m: m.unsqueeze(-1)  # noqa: E731
    out = torch.where(col(rules.regular), y, rule_values(x, k, rules).to(y.dtype))
    nan_rows = torch.where(col(rules.nan), x, 0.0).to(y.dtype) * math.nan
    return torch.where(col(rules.nan), nan_rows, out)

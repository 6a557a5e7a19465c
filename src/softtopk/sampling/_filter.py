"""Top-k, top-p (nucleus) and min-p filters of LLM decoding, by threshold search without a sort.

Each filter keeps an upper set of the logits, so the three together keep every logit at
or above one threshold per row. The threshold of top-p is found among the largest
logits (``torch.topk``, a partial selection), widened only for rows whose nucleus is
larger than the candidates; the sort-based filter (:func:`filter_logits_sort`) is the
reference it equals, kept set for kept set.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from .._checks import check_dim, check_int, check_tensor, is_tracing
from .._rows import to_rows

#: Probabilities are counted in integer units of 2**-UNIT_BITS: sums of units are exact and do
#: not depend on the order of summation, so a threshold search and a sort agree exactly.
UNIT_BITS = 50

#: Candidates of the first top-p round (the largest logits of each row), then this factor more.
FIRST_CANDIDATES = 1024
GROWTH = 8


def _batch_param(value: object, name: str, batch_shape: torch.Size, rows: int, device: torch.device):
    """A per-row parameter: None, a Python number, or a tensor broadcastable to the batch shape."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a real tensor, got a tensor of {value.dtype}")
        try:
            v = torch.broadcast_to(value, batch_shape)
        except RuntimeError:
            raise ValueError(
                f"{name} must be a number or a tensor broadcastable to the batch shape "
                f"{tuple(batch_shape)} of logits; got shape {tuple(value.shape)}"
            ) from None
        return v.reshape(rows).to(device)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None, a number or a tensor, got {type(value).__name__} {value!r}")
    return value


def _check_range(v: Tensor | float, name: str, lo: float, hi: float, lo_open: bool) -> None:
    if isinstance(v, Tensor):
        if is_tracing() or v.numel() == 0:
            return
        if v.dtype.is_floating_point and bool(torch.isnan(v).any()):
            raise ValueError(f"{name} must not contain NaN")
        a, b = (float(t) for t in torch.aminmax(v.detach().double()))
    else:
        a = b = float(v)
        if math.isnan(a):
            raise ValueError(f"{name} must not be NaN")
    if (a <= lo if lo_open else a < lo) or b > hi:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must lie in {bracket}{lo:g}, {hi:g}]; got values in [{a}, {b}]")


def _units(values: Tensor, lse: Tensor) -> Tensor:
    """floor(softmax probability * 2**UNIT_BITS) of ``values`` (B, K) of rows with log-sum-exp ``lse``."""
    p = torch.exp(values - lse.unsqueeze(-1))
    return torch.floor(p.double() * float(2**UNIT_BITS)).to(torch.int64)


def _first_reaching(cum: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the first column where ``cum`` (B, K) reaches ``target`` (B,), and whether any does."""
    reached = cum.double() >= target.unsqueeze(-1)
    found = reached[:, -1]
    first = torch.argmax(reached.to(torch.int8), dim=-1)
    return first, found


def _above_or_equal(x: Tensor, thr64: Tensor) -> Tensor:
    """The smallest value of x's dtype that is >= thr64 (float64, per row): x >= it iff x >= thr64."""
    t = thr64.to(x.dtype)
    up = torch.nextafter(t, torch.full_like(t, math.inf))
    return torch.where(t.double() < thr64, up, t)


def _top_k_threshold(x: Tensor, top_k: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The k-th largest value per row, and the sorted top values and their count K."""
    n = x.shape[-1]
    if isinstance(top_k, Tensor):
        kvec = top_k.to(torch.int64).clamp(1, n)
        K = n if is_tracing() else int(kvec.max())
    else:
        K = min(top_k, n)
        kvec = torch.full((x.shape[0],), K, dtype=torch.int64, device=x.device)
    vals = torch.topk(x, K, dim=-1, sorted=True).values
    return vals.gather(-1, (kvec - 1).unsqueeze(-1)).squeeze(-1), vals, kvec


def _nucleus_of_candidates(vals: Tensor, lse: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top-p threshold from sorted candidates (B, K): the first value whose cumulative mass reaches target.

    Also returns, per row, a lower bound on the candidates needed: K plus the missing mass
    over the K-th candidate's mass (every further entry has at most that mass).
    """
    q = _units(vals, lse)
    cum = torch.cumsum(q, dim=-1)
    first, found = _first_reaching(cum, target)
    missing = (target - cum[:, -1].double()).clamp_min(0.0)
    need = vals.shape[-1] + missing / q[:, -1].clamp_min(1).double()
    return vals.gather(-1, first.unsqueeze(-1)).squeeze(-1), found, need


def _top_p_threshold(
    x: Tensor, lse: Tensor, top_p: Tensor, v_k: Tensor | None, topk_vals: Tensor | None, kvec: Tensor | None
) -> Tensor:
    """The logit threshold of top-p per row (-inf: keep everything)."""
    B, n = x.shape
    scale = float(2**UNIT_BITS)
    off = torch.full((B,), -math.inf, dtype=x.dtype, device=x.device)
    if v_k is not None:
        # Top-p over the top-k survivors, renormalised: the target is top_p times their mass.
        # Survivors are x >= v_k: the top-k candidates plus any further ties of v_k.
        K = topk_vals.shape[-1]
        cols = torch.arange(K, device=x.device)
        q = torch.where(cols < kvec.unsqueeze(-1), _units(topk_vals, lse), 0)
        ties_beyond = (x >= v_k.unsqueeze(-1)).sum(-1) - kvec
        q_vk = _units(v_k.unsqueeze(-1), lse).squeeze(-1)
        mass = q.sum(-1) + ties_beyond * q_vk
        target = top_p * mass.double()
        cum = torch.cumsum(q, dim=-1)
        first, found = _first_reaching(cum, target)
        v_p = torch.where(found, topk_vals.gather(-1, first.unsqueeze(-1)).squeeze(-1), v_k)
        return torch.where(top_p >= 1.0, off, v_p)
    # Mass relative to the whole softmax (total 1): widen the candidates until each row's
    # nucleus is inside them; a row whose whole mass stays below the target keeps everything.
    target = top_p * scale
    active = top_p < 1.0
    if is_tracing():
        v, found, _ = _nucleus_of_candidates(torch.sort(x, dim=-1, descending=True).values, lse, target)
        return torch.where(active & found, v, off)
    result = off.clone()
    rows = torch.nonzero(active).squeeze(-1)
    K = min(n, FIRST_CANDIDATES)
    while rows.numel() > 0:
        xr = x if rows.numel() == B else x[rows]  # (advanced indexing: index_select is slow on CPU)
        # The largest K values, in order; past half the row a sort is cheaper than a selection.
        cand = torch.topk(xr, K, dim=-1).values if K < n else torch.sort(xr, dim=-1, descending=True).values
        v, found, need = _nucleus_of_candidates(cand, lse[rows], target[rows])
        done = found if K < n else torch.ones_like(found)
        result[rows[done]] = torch.where(found[done], v[done], -math.inf)
        rows, need = rows[~done], need[~done]
        if rows.numel() > 0:
            K = max(K * GROWTH, math.ceil(2.0 * float(need.max())))
            K = n if K > n // 2 else K
    return result


def filter_logits(
    logits: Tensor,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    *,
    dim: int = -1,
) -> Tensor:
    r"""Top-k, top-p (nucleus) and min-p filtering of logits, as in LLM decoding, without a sort.

    With p = softmax(logits) along ``dim``, the filters keep, in this order (each on the
    distribution renormalised over what the previous one kept, as sequential logits
    warpers do):

    .. math::

        \text{top-}k:\ x_i \ge x_{(k)};\qquad
        \text{top-}p:\ \sum_{j:\, x_j > x_i} p_j < p_{\text{top}} \sum_{j\ \text{kept}} p_j;\qquad
        \text{min-}p:\ p_i \ge p_{\min} \max_j p_j \iff x_i - \max_j x_j \ge \log p_{\min}

    and set every other logit to -inf. Ties are kept together: a logit equal to the k-th
    largest is kept by top-k (so more than k entries survive when the k-th value is
    tied), and the top-p rule compares each logit with the mass of the *strictly* larger
    ones, so tied logits are kept or removed together. The kept set therefore depends on
    the values only, never on how a sort orders equal values, and it equals the kept set
    of the sort-based :func:`filter_logits_sort` exactly.

    Top-p counts probabilities in integer units of 2^-50 (``floor(p * 2**50)``, p computed
    as exp(x - logsumexp(x)) in float32, float64 for float64 logits), so its sums are exact
    and independent of the order of summation; without top-k the target is top_p in those
    units (the softmax sums to 1), and a row whose units never reach it keeps everything.
    Min-p is tested on the logits in float64 (the ratio of probabilities is exp of the
    difference of logits).

    How: min-p is one comparison; top-k is ``torch.topk``; top-p's threshold is found
    among the 1024 largest logits of each row and, for the rows whose nucleus is larger,
    among at least 8 times as many (more where the missing mass says so), and so on; a
    row whose nucleus needs more than half the vocabulary is sorted, so the worst case
    costs about what the sort-based filter costs. The output is one masked fill.

    Args:
        logits: (..., V) scores, any floating dtype (computed in float32, float64 kept).
        top_k: keep the k largest (int >= 1), or a tensor of per-row k broadcastable to
            the batch shape (logits.shape without ``dim``); k >= V keeps everything. None: off.
        top_p: nucleus mass in (0, 1], a number or per-row tensor; 1 keeps everything. None: off.
        min_p: in [0, 1], a number or per-row tensor; 0 keeps everything. None: off.
        dim: the vocabulary dimension.

    Returns:
        The logits (same shape and dtype) with the removed entries set to -inf. A row that
        contains NaN or +inf comes back all NaN (its probabilities are undefined); a row of
        -inf comes back unchanged. Other rows are unaffected by such rows.

    Example:
        >>> import torch
        >>> from softtopk.sampling import filter_logits
        >>> x = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0]])
        >>> filter_logits(x, top_k=2)  # the tie at the 2nd value is kept
        tensor([[2., 1., 1., -inf, -inf]])
        >>> filter_logits(x, top_p=0.5)
        tensor([[2., -inf, -inf, -inf, -inf]])
        >>> filter_logits(x, min_p=0.3)
        tensor([[2., 1., 1., -inf, -inf]])

    Reference:
        Fan, Lewis, Dauphin. "Hierarchical Neural Story Generation", ACL 2018 (top-k);
        Holtzman, Buys, Du, Forbes, Choi. "The Curious Case of Neural Text Degeneration",
        ICLR 2020 (top-p); Nguyen et al. "Turning Up the Heat: Min-p Sampling for Creative
        and Coherent LLM Outputs", ICLR 2025 (min-p).
    """
    return _filter(logits, top_k, top_p, min_p, dim, sort=False)


def filter_logits_sort(
    logits: Tensor,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    *,
    dim: int = -1,
) -> Tensor:
    r"""The sort-based filter that :func:`filter_logits` equals (the baseline of its benchmark).

    Sorts each row once (descending), takes the k-th value, the cumulative mass of the
    sorted probabilities and the first position where it reaches the top-p target, as
    sort-based samplers do; the rules, tie handling and units are those of
    :func:`filter_logits`:

    .. math::

        x_{(1)} \ge \dots \ge x_{(V)},\qquad
        \tau_p = x_{(m)},\ m = \min\{r : \textstyle\sum_{s \le r} p_{(s)} \ge p_{\text{top}}\}

    Example:
        >>> import torch
        >>> from softtopk.sampling import filter_logits_sort
        >>> filter_logits_sort(torch.tensor([2.0, 1.0, 1.0, 0.0]), top_k=2)
        tensor([2., 1., 1., -inf])
    """
    return _filter(logits, top_k, top_p, min_p, dim, sort=True)


def _filter(logits, top_k, top_p, min_p, dim, *, sort: bool) -> Tensor:  # noqa: ANN001
    logits = check_tensor(logits, "logits")
    d = check_dim(dim, logits.dim())
    if top_k is not None and not isinstance(top_k, Tensor):
        top_k = check_int(top_k, "top_k")
    rows_in, restore = to_rows(logits, d)
    B, n = rows_in.shape
    batch_shape = logits.movedim(d, -1).shape[:-1]
    top_k = _batch_param(top_k, "top_k", batch_shape, B, logits.device)
    top_p = _batch_param(top_p, "top_p", batch_shape, B, logits.device)
    min_p = _batch_param(min_p, "min_p", batch_shape, B, logits.device)
    if isinstance(top_k, Tensor) and top_k.dtype.is_floating_point:
        raise TypeError(f"top_k must be an int or an integer tensor, got a tensor of {top_k.dtype}")
    if top_k is not None:
        _check_range(top_k, "top_k", 1, math.inf, False)
    if top_p is not None:
        _check_range(top_p, "top_p", 0.0, 1.0, True)
    if min_p is not None:
        _check_range(min_p, "min_p", 0.0, 1.0, False)
    if n == 0 or B == 0 or (top_k is None and top_p is None and min_p is None):
        return logits.clone()
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = rows_in.to(cd)
    m = x.amax(-1)
    undefined = torch.isnan(m) | (m == math.inf)  # NaN or +inf: probabilities undefined
    empty = m == -math.inf
    odd = undefined | empty
    if is_tracing() or bool(odd.any()):
        x = torch.where(odd.unsqueeze(-1), 0.0, x)
        m = torch.where(odd, 0.0, m)
    thr = torch.full((B,), -math.inf, dtype=cd, device=x.device)
    if sort:
        thr = _sorted_threshold(x, top_k, top_p)
    else:
        v_k = vals = kvec = None
        if top_k is not None:
            v_k, vals, kvec = _top_k_threshold(x, top_k)
            thr = torch.maximum(thr, v_k)
        if top_p is not None:
            tp = (
                top_p.double()
                if isinstance(top_p, Tensor)
                else torch.full((B,), float(top_p), dtype=torch.float64, device=x.device)
            )
            lse = torch.logsumexp(x, dim=-1)
            thr = torch.maximum(thr, _top_p_threshold(x, lse, tp, v_k, vals, kvec))
    if min_p is not None:
        mp = (
            min_p.double()
            if isinstance(min_p, Tensor)
            else torch.full((B,), float(min_p), dtype=torch.float64, device=x.device)
        )
        c = m.double() + torch.log(mp)
        thr = torch.maximum(thr, _above_or_equal(x, c))
    out = torch.where(x < thr.unsqueeze(-1), -math.inf, rows_in)
    if is_tracing() or bool(odd.any()):
        out = torch.where(undefined.unsqueeze(-1), math.nan, out)
        out = torch.where(empty.unsqueeze(-1), rows_in, out)
    return restore(out)


def _sorted_threshold(x: Tensor, top_k, top_p) -> Tensor:  # noqa: ANN001
    """Top-k and top-p thresholds by one full sort of each row."""
    B, n = x.shape
    thr = torch.full((B,), -math.inf, dtype=x.dtype, device=x.device)
    s = torch.sort(x, dim=-1, descending=True).values
    kept = torch.ones_like(s, dtype=torch.bool)
    if top_k is not None:
        kvec = (
            top_k.to(torch.int64)
            if isinstance(top_k, Tensor)
            else torch.full((B,), top_k, dtype=torch.int64, device=x.device)
        ).clamp(1, n)
        v_k = s.gather(-1, (kvec - 1).unsqueeze(-1)).squeeze(-1)
        thr = torch.maximum(thr, v_k)
        kept = s >= v_k.unsqueeze(-1)
    if top_p is not None:
        tp = (
            top_p.double()
            if isinstance(top_p, Tensor)
            else torch.full((B,), float(top_p), dtype=torch.float64, device=x.device)
        )
        lse = torch.logsumexp(x, dim=-1)
        q = torch.where(kept, _units(s, lse), 0)
        cum = torch.cumsum(q, dim=-1)
        target = tp * cum[:, -1].double() if top_k is not None else tp * float(2**UNIT_BITS)
        first, found = _first_reaching(cum, target)
        v_p = torch.where(found, s.gather(-1, first.unsqueeze(-1)).squeeze(-1), -math.inf)
        thr = torch.where(tp >= 1.0, thr, torch.maximum(thr, v_p))
    return thr


class LogitsFilter(nn.Module):
    """Module form of :func:`filter_logits`: holds top_k, top_p and min_p.

    Example:
        >>> import torch
        >>> from softtopk.sampling import LogitsFilter
        >>> LogitsFilter(top_k=1)(torch.tensor([0.5, 3.0, 1.0]))
        tensor([-inf, 3., -inf])
    """

    def __init__(
        self,
        top_k: int | Tensor | None = None,
        top_p: float | Tensor | None = None,
        min_p: float | Tensor | None = None,
        *,
        dim: int = -1,
    ) -> None:
        super().__init__()
        if top_k is not None and not isinstance(top_k, Tensor):
            top_k = check_int(top_k, "top_k")
        for name, value, lo, lo_open in (
            ("top_k", top_k, 1, False),
            ("top_p", top_p, 0.0, True),
            ("min_p", min_p, 0.0, False),
        ):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, Tensor | numbers.Real):
                raise TypeError(
                    f"{name} must be None, a number or a tensor, got {type(value).__name__} {value!r}"
                )
            _check_range(value, name, lo, math.inf if name == "top_k" else 1.0, lo_open)
        self.top_k, self.top_p, self.min_p, self.dim = top_k, top_p, min_p, check_int(dim, "dim")

    def forward(self, logits: Tensor) -> Tensor:
        return filter_logits(logits, self.top_k, self.top_p, self.min_p, dim=self.dim)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, top_p={self.top_p}, min_p={self.min_p}, dim={self.dim}"

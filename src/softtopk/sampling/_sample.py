"""Exactly k distinct items with given inclusion probabilities: systematic sampling (Madow 1949).

A soft top-k mask y (0 <= y_i <= 1, sum y = k) is the vector of inclusion probabilities
of many k-subset distributions. Systematic sampling on a random order draws one of them:
lay the items in a uniformly random order as consecutive intervals of lengths y_i on
[0, k), draw U uniform on [0, 1), and take the k items whose intervals contain U, U + 1,
..., U + k - 1. Each item's interval has length at most 1, so it holds at most one of
the points, and P(item i drawn) = y_i for every order. Gumbel top-k with weights y
(successive sampling without replacement) does not have these inclusion probabilities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_dim, check_int, check_tensor, is_tracing
from .._rows import to_rows

#: Inclusion probabilities are counted in integer units of 2**-UNIT_BITS: the k points and the
#: interval ends are integers, so exactly k distinct items are drawn whatever the rounding.
UNIT_BITS = 40


def _prepare_k(k: object, batch_shape: torch.Size, rows: int, n: int, device: torch.device) -> Tensor:
    if isinstance(k, Tensor):
        if k.dtype.is_floating_point or k.dtype == torch.bool or k.is_complex():
            raise TypeError(f"k must be an int or an integer tensor, got a tensor of {k.dtype}")
        try:
            kb = torch.broadcast_to(k, batch_shape)
        except RuntimeError:
            raise ValueError(
                f"k must be an int or a tensor broadcastable to the batch shape {tuple(batch_shape)} "
                f"of probs; got shape {tuple(k.shape)}"
            ) from None
        kvec = kb.reshape(rows).to(device=device, dtype=torch.int64)
        if not is_tracing() and kvec.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(kvec))
            if lo < 0 or hi > n:
                raise ValueError(f"k must lie in [0, n] = [0, {n}]; got values in [{lo}, {hi}]")
        return kvec
    k = check_int(k, "k")
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, n] = [0, {n}], got {k}")
    return torch.full((rows,), k, dtype=torch.int64, device=device)


def systematic_rows(y: Tensor, k: Tensor, order: Tensor, u: Tensor) -> Tensor:
    r"""Systematic sample of rows ``y`` (B, n) float64 with sizes ``k`` (B,), given the noise.

    ``order`` (B, n) is the permutation the items are laid out in, ``u`` (B,) int64 the
    offset in [0, L), L = 2**UNIT_BITS. With integer lengths w (floor(y L), the rounding
    deficit of the row given to the first items in the order that have room) and their
    cumulative sums C, item j of the order is drawn iff

    .. math::

        \Big\lceil \frac{C_j - u}{L} \Big\rceil > \Big\lceil \frac{C_{j-1} - u}{L} \Big\rceil

    (an interval [C_{j-1}, C_j) of length w_j <= L holds at most one of u, u + L, ...).
    Returns the (B, n) bool mask of the drawn items, in the original positions.
    """
    L = 1 << UNIT_BITS
    yo = y.gather(-1, order)
    w = torch.floor(yo * float(L)).to(torch.int64)
    deficit = k * L - w.sum(-1)
    room = torch.where((deficit > 0).unsqueeze(-1), L - w, w)
    before = torch.cumsum(room, dim=-1) - room
    add = torch.minimum((deficit.abs().unsqueeze(-1) - before).clamp_min(0), room)
    w = w + torch.sign(deficit).unsqueeze(-1) * add
    c = torch.cumsum(w, dim=-1)
    uu = u.unsqueeze(-1)
    hits = ((c - uu + (L - 1)) >> UNIT_BITS) > ((c - w - uu + (L - 1)) >> UNIT_BITS)
    return torch.zeros_like(hits).scatter(-1, order, hits)


def sample_k(
    probs: Tensor,
    k: int | Tensor,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    straight_through: bool = True,
) -> Tensor:
    r"""Draws exactly k distinct items per row, item i with probability ``probs[i]``.

    ``probs`` is a soft top-k mask y (0 <= y_i <= 1, sum_i y_i = k), for example the
    output of :func:`softtopk.topk_mask`. The sample z is a k-hot mask with

    .. math::

        \Pr(z_i = 1) = y_i,\qquad \sum_i z_i = k,\qquad
        \frac{\partial z}{\partial y} := I \ \text{(straight-through; unbiased since } \mathbb{E} z = y)

    drawn by systematic sampling (Madow 1949) on a uniformly random order of the items:
    the items are consecutive intervals of lengths y_i on [0, k), and the k points
    U, U + 1, ..., U + k - 1 (U uniform on [0, 1)) pick the items whose intervals hold
    them. Items with y_i = 1 are always drawn, items with y_i = 0 never. This is what
    lets a model trained with a soft top-k mask be sampled with the mask's marginals;
    Gumbel top-k on log y (:func:`softtopk.relaxed_subset` with ``hard=True``) draws
    items in proportion to y one after another, and its inclusion probabilities are not
    y (a y_i = 1 item can be missed).

    Lengths and points are integers in units of 2^-40, so the sample has exactly k
    distinct items whatever the rounding; each row's sum is brought to k in those units
    by giving the rounding remainder to the first items of the random order that have
    room, so the inclusion probabilities equal y to within about n * 2^-40 plus the
    distance of the row sum from k.

    Args:
        probs: (..., n) inclusion probabilities, floating dtype, in [0, 1] along ``dim``.
        k: the subset size (int in [0, n]) or a per-row integer tensor broadcastable to
            the batch shape; each row must sum to its k (to 1e-3 k plus rounding).
        dim: the item dimension.
        generator: torch.Generator for the order and the offset (default: the global one).
        straight_through: the result carries the gradient of probs (identity);
            False returns a detached sample.

    Returns:
        The k-hot sample, the shape and dtype of probs (1.0 for drawn items). A row
        containing NaN comes back all NaN.

    Example:
        >>> import torch
        >>> from softtopk.sampling import sample_k
        >>> y = torch.tensor([1.0, 0.5, 0.5, 0.0])
        >>> z = sample_k(y, 2, generator=torch.Generator().manual_seed(0))
        >>> int(z.sum()), bool(z[0] == 1), bool(z[3] == 0)
        (2, True, True)

    Reference:
        Madow. "On the Theory of Systematic Sampling, II", Annals of Mathematical
        Statistics, 1949; Goodman, Kish. "Controlled Selection", JASA 1950 (random order).
    """
    probs = check_tensor(probs, "probs")
    d = check_dim(dim, probs.dim())
    check_bool(straight_through, "straight_through")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    rows, restore = to_rows(probs, d)
    B, n = rows.shape
    batch_shape = probs.movedim(d, -1).shape[:-1]
    kvec = _prepare_k(k, batch_shape, B, n, probs.device)
    y = rows.detach().to(torch.float64)
    nan = torch.isnan(y).any(-1)
    y = torch.where(nan.unsqueeze(-1), 0.0, y)
    if not is_tracing() and y.numel() > 0:
        _check_marginals(y, kvec, nan, probs.dtype)
    y = y.clamp(0.0, 1.0)
    k_eff = torch.where(nan, 0, kvec)
    keys = torch.rand(B, n, dtype=torch.float64, device=probs.device, generator=generator)
    order = torch.argsort(keys, dim=-1)
    u = torch.randint(0, 1 << UNIT_BITS, (B,), device=probs.device, generator=generator)
    hits = systematic_rows(y, k_eff, order, u)
    z = hits.to(probs.dtype)
    z = torch.where(nan.unsqueeze(-1), math.nan, z)
    if straight_through and rows.requires_grad:
        z = z + (rows - rows.detach())
    return restore(z)


def _check_marginals(y: Tensor, k: Tensor, nan: Tensor, dtype: torch.dtype) -> None:
    n = y.shape[-1]
    eps = float(torch.finfo(dtype).eps)
    lo, hi = (float(v) for v in torch.aminmax(y))
    if lo < -4 * eps or hi > 1 + 4 * eps:
        raise ValueError(f"probs must lie in [0, 1]; got values in [{lo}, {hi}]")
    err = (y.sum(-1) - k.to(torch.float64)).abs()
    tol = 1e-3 * k.clamp_min(1).to(torch.float64) + 4 * n * eps
    bad = (err > tol) & ~nan
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"each row of probs must sum to k (inclusion probabilities of k items); row {i} sums to "
            f"{float(y[i].sum())} with k = {int(k[i])}"
        )


class SampleK(nn.Module):
    """Module form of :func:`sample_k`: k, dim and the generator.

    Example:
        >>> import torch
        >>> from softtopk.sampling import SampleK
        >>> SampleK(1)(torch.tensor([0.0, 1.0, 0.0]))
        tensor([0., 1., 0.])
    """

    def __init__(
        self,
        k: int | Tensor,
        *,
        dim: int = -1,
        generator: torch.Generator | None = None,
        straight_through: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(k, Tensor):
            k = check_int(k, "k")
            if k < 0:
                raise ValueError(f"k must be >= 0, got {k}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.k, self.dim, self.generator = k, check_int(dim, "dim"), generator
        self.straight_through = check_bool(straight_through, "straight_through")

    def forward(self, probs: Tensor) -> Tensor:
        return sample_k(
            probs, self.k, self.dim, generator=self.generator, straight_through=self.straight_through
        )

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}, straight_through={self.straight_through}"

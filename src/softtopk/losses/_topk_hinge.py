"""The smoothed top-k calibrated hinge losses of Garcin et al. (2022), as in ``pytopk``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_choice, check_dim, check_int, check_positive, check_tensor
from .._rows import rowwise
from ..ops._perturbation import perturbation, smoothed_kth_rows

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def smoothed_kth_value(
    x: Tensor,
    k: int | Tensor,
    dim: int = -1,
    *,
    temperature: float = 1.0,
    num_samples: int | None = None,
    noise: str | None = None,
    generator: torch.Generator | None = None,
    noise_samples: Tensor | None = None,
) -> Tensor:
    r"""Smoothed k-th largest value of x along ``dim`` (Garcin et al. 2022).

    .. math::

        \operatorname{topk}_\epsilon(x) = \mathbb{E}_Z\big[(x + \epsilon Z)_{(k)}\big]
        \approx \frac1M \sum_{m=1}^M (x + \epsilon Z_m)_{(k)},\qquad
        \nabla = \frac1M \sum_{m=1}^M e_{i_m},

    with (v)_(k) the k-th largest entry of v and i_m the index holding it. The k-th value
    is piecewise linear, so this gradient is the exact derivative of the Monte-Carlo
    estimate (no 1/epsilon factor) and an unbiased estimate of the gradient of the
    smoothed value; it has at most M non-zeros and sums to 1. Selection by
    ``torch.kthvalue`` (no sort). ``temperature`` is pytopk's epsilon; t -> 0 gives the
    k-th largest value.

    Args:
        x: scores, any shape, floating dtype. -inf entries are never the k-th largest
            unless fewer than k entries are finite (then the value is -inf). Rows with
            NaN give NaN. Infinite entries get no gradient.
        k: an int in [1, n], or an integer tensor of per-row ranks (batch shape of x).
        dim: dimension along which to take the k-th largest.
        temperature: epsilon > 0, the scale of the noise.
        num_samples: M (default 5, as pytopk; or the size of ``noise_samples``).
        noise: ``"gaussian"`` (default, as pytopk) or ``"gumbel"``.
        generator: torch.Generator the noise is drawn from (default: the global one).
        noise_samples: explicit standard noise of shape ``(num_samples, *x.shape)``;
            pytopk's Z of shape ``(*x.shape, M)`` is ``Z.movedim(-1, 0)``.

    Returns:
        Tensor of x's shape without ``dim``, x's dtype.

    Example:
        >>> import torch
        >>> from softtopk.losses import smoothed_kth_value
        >>> x = torch.tensor([[3.0, 1.0, 2.0]])
        >>> smoothed_kth_value(x, 2, temperature=1e-6, generator=torch.Generator().manual_seed(0))
        tensor([2.0000])

    Reference:
        Garcin, Servajean, Joly, Salmon. "Stochastic smoothing of the top-K calibrated
        hinge loss for deep imbalanced classification", ICML 2022.
    """
    t = check_positive(temperature, "temperature")
    rows = rowwise(x, k, dim)
    d, n = rows.dim, rows.x.shape[-1]
    kvec = rows.k
    pert = perturbation(
        x,
        d,
        rows.x.shape[0],
        num_samples=num_samples,
        noise=noise,
        generator=generator,
        noise_samples=noise_samples,
        default_samples=5,
    )
    batch = x.shape[:d] + x.shape[d + 1 :]
    if rows.x.numel() == 0:
        return x.new_zeros(batch)
    if bool((kvec < 1).any()) or bool((kvec != kvec.round()).any()):
        raise ValueError(f"k must be an integer in [1, n] = [1, {n}] for the k-th value, got {k!r}")
    value = smoothed_kth_rows(rows.x, kvec.detach().long(), t, pert)
    nan = torch.isnan(rows.x).any(-1)
    value = torch.where(nan, math.nan, value)
    return value.reshape(batch).to(x.dtype)


def _class_scores(scores: Tensor, target: Tensor, d: int) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got a tensor of {target.dtype}")
    batch = scores.shape[:d] + scores.shape[d + 1 :]
    if tuple(target.shape) != tuple(batch):
        raise ValueError(
            f"target must have the shape of scores without dim={d}, {tuple(batch)}; got {tuple(target.shape)}"
        )
    n = scores.shape[d]
    if target.numel() and (bool((target < 0).any()) or bool((target >= n).any())):
        raise ValueError(
            f"target must hold class indices in [0, {n - 1}], got values in "
            f"[{int(target.min())}, {int(target.max())}]"
        )
    return scores.gather(d, target.unsqueeze(d).to(scores.device)).squeeze(d)


def _check_hinge_k(k: object, n: int) -> int:
    k = check_int(k, "k")
    if not 1 <= k <= n - 1:
        raise ValueError(
            f"k must be an int in [1, n - 1] = [1, {n - 1}] (the loss uses the (k+1)-th value), got {k}"
        )
    return k


def balanced_topk_hinge_loss(
    scores: Tensor,
    target: Tensor,
    k: int,
    dim: int = -1,
    *,
    temperature: float = 1.0,
    margin: float = 1.0,
    num_samples: int | None = None,
    noise: str | None = None,
    generator: torch.Generator | None = None,
    noise_samples: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Balanced noised top-k hinge loss (Garcin et al. 2022; pytopk's ``BalNoisedTopK``).

    .. math::

        \ell(s, y) = \big(\text{margin} + \operatorname{topk}_{\epsilon, k+1}(s) - s_y\big)_+

    with topk_{eps, k+1} the smoothed (k+1)-th largest score (:func:`smoothed_kth_value`).
    The loss is zero once the true class beats the (k+1)-th score by the margin, i.e.
    is safely in the top k: a smoothed version of the top-k calibrated hinge loss.

    Args:
        scores: (..., C) class scores (C along ``dim``).
        target: integer class indices, the shape of scores without ``dim``.
        k: the k of top-k accuracy, in [1, C - 1].
        dim: the class dimension.
        temperature: pytopk's epsilon (the noise scale).
        margin: the hinge margin (1 in the paper).
        num_samples: noise draws (default 5, as pytopk).
        noise: ``"gaussian"`` (default) or ``"gumbel"``.
        generator: torch.Generator for the noise.
        noise_samples: explicit noise ``(num_samples, *scores.shape)``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from softtopk.losses import balanced_topk_hinge_loss
        >>> scores = torch.tensor([[2.0, 1.5, -3.0], [7.5, 4.0, -1.5]])
        >>> balanced_topk_hinge_loss(scores, torch.tensor([0, 2]), 2, temperature=1e-6,
        ...                          generator=torch.Generator().manual_seed(0))
        tensor(0.5000)

    Reference:
        Garcin, Servajean, Joly, Salmon. "Stochastic smoothing of the top-K calibrated
        hinge loss for deep imbalanced classification", ICML 2022.
    """
    scores = check_tensor(scores, "scores")
    d = check_dim(dim, scores.dim())
    k = _check_hinge_k(k, scores.shape[d])
    reduction = check_choice(reduction, "reduction", REDUCTIONS)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a number, got {type(margin).__name__} {margin!r}")
    correct = _class_scores(scores, target, d)
    kth = smoothed_kth_value(
        scores,
        k + 1,
        dim=d,
        temperature=temperature,
        num_samples=num_samples,
        noise=noise,
        generator=generator,
        noise_samples=noise_samples,
    )
    return _reduce(torch.relu(float(margin) + kth - correct), reduction)


def ldam_margins(class_counts: Sequence[int] | Tensor, max_margin: float) -> Tensor:
    r"""Per-class margins m_j = max_margin n_j^{-1/4} / max_i n_i^{-1/4} (Cao et al. 2019, LDAM).

    The rarest class gets ``max_margin``. Returns a float64 tensor of shape (C,).

    Example:
        >>> from softtopk.losses import ldam_margins
        >>> ldam_margins([16, 1], 0.2)
        tensor([0.1000, 0.2000], dtype=torch.float64)
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-d sequence, got shape {tuple(counts.shape)}")
    if not bool((counts > 0).all()) or not bool(torch.isfinite(counts).all()):
        raise ValueError("class_counts must be positive and finite")
    m = check_positive(max_margin, "max_margin")
    inv = counts.pow(-0.25)
    return inv * (m / inv.max())


def imbalanced_topk_hinge_loss(
    scores: Tensor,
    target: Tensor,
    k: int,
    dim: int = -1,
    *,
    class_counts: Sequence[int] | Tensor,
    max_margin: float,
    scale: float = 50.0,
    temperature: float = 1.0,
    num_samples: int | None = None,
    noise: str | None = None,
    generator: torch.Generator | None = None,
    noise_samples: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Imbalanced noised top-k hinge loss (Garcin et al. 2022; pytopk's ``ImbalNoisedTopK``).

    .. math::

        \ell(s, y) = \big(\text{scale}\,(m_y + \operatorname{topk}_{\epsilon, k+1}(s) - s_y)\big)_+,
        \qquad m_j = \text{max\_margin}\ \frac{n_j^{-1/4}}{\max_i n_i^{-1/4}}

    with LDAM-style class margins from the class counts n_j (:func:`ldam_margins`): rare
    classes must win by a larger margin. ``scale`` (50 by default, as pytopk) assumes
    normalised features and weights; use 1 otherwise.

    Args:
        scores: (..., C) class scores (C along ``dim``).
        target: integer class indices, the shape of scores without ``dim``.
        k: the k of top-k accuracy, in [1, C - 1].
        class_counts: number of training examples of each class (C,).
        max_margin: the margin of the rarest class.
        scale: the factor in front of the hinge.
        dim: the class dimension.
        temperature: pytopk's epsilon (the noise scale).
        num_samples: noise draws (default 5, as pytopk).
        noise: ``"gaussian"`` (default) or ``"gumbel"``.
        generator: torch.Generator for the noise.
        noise_samples: explicit noise ``(num_samples, *scores.shape)``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from softtopk.losses import imbalanced_topk_hinge_loss
        >>> scores = torch.tensor([[2.0, 1.5, -3.0], [7.5, 4.0, -1.5]])
        >>> loss = imbalanced_topk_hinge_loss(scores, torch.tensor([0, 2]), 2, class_counts=[5, 15, 10],
        ...                                   max_margin=0.3, scale=1.0, temperature=1e-6,
        ...                                   generator=torch.Generator().manual_seed(0))
        >>> round(loss.item(), 4)  # (0 + 0.3 (10/5)^(-1/4)) / 2
        0.1261

    Reference:
        Garcin, Servajean, Joly, Salmon. "Stochastic smoothing of the top-K calibrated
        hinge loss for deep imbalanced classification", ICML 2022.
    """
    scores = check_tensor(scores, "scores")
    d = check_dim(dim, scores.dim())
    k = _check_hinge_k(k, scores.shape[d])
    reduction = check_choice(reduction, "reduction", REDUCTIONS)
    margins = ldam_margins(class_counts, max_margin)
    if margins.numel() != scores.shape[d]:
        raise ValueError(
            f"class_counts must have one entry per class, {scores.shape[d]}; got {margins.numel()}"
        )
    s = check_positive(scale, "scale")
    correct = _class_scores(scores, target, d)
    kth = smoothed_kth_value(
        scores,
        k + 1,
        dim=d,
        temperature=temperature,
        num_samples=num_samples,
        noise=noise,
        generator=generator,
        noise_samples=noise_samples,
    )
    m_y = margins.to(device=scores.device, dtype=scores.dtype)[target.to(scores.device)]
    return _reduce(torch.relu(s * (m_y + kth - correct)), reduction)

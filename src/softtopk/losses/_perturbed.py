"""The Fenchel-Young loss of the perturbed top-k (Berthet et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice, check_dim, check_positive, check_tensor
from .._rows import rowwise, to_rows
from ..ops._perturbation import fenchel_young_rows, perturbation
from ._topk_hinge import REDUCTIONS, _reduce


def fenchel_young_topk_loss(
    x: Tensor,
    target: Tensor,
    k: float | Tensor | None = None,
    dim: int = -1,
    *,
    temperature: float = 0.1,
    num_samples: int | None = None,
    noise: str | None = None,
    generator: torch.Generator | None = None,
    noise_samples: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Fenchel-Young loss of the perturbed top-k (Berthet et al. 2020).

    .. math::

        L(x; y) = F_t(x) - \langle x, y\rangle,\qquad
        F_t(x) = \mathbb{E}_Z\Big[\max_{y' \in C_k} \langle y', x + tZ\rangle\Big],\qquad
        \nabla_x L = y_t(x) - y,

    with C_k = {y in [0, 1]^n, sum y = k}, so F_t(x) is the expected sum of the k largest
    entries of x + tZ and y_t(x) = grad F_t(x) is the perturbed top-k mask
    (``topk_mask(x, k, method="perturbed")``). The loss is convex in x; its gradient
    needs no Jacobian, and with the same noise it is exactly the perturbed mask minus the
    target. The constant Omega(y) of the paper (which does not depend on x) is left out,
    as in the reference code, so a Monte-Carlo value can be slightly negative.

    Args:
        x: scores, any shape, floating dtype.
        target: the target y, same shape as x: a k-hot mask of the true top k, or any
            point of C_k.
        k: the budget (default: the sum of ``target`` along ``dim``).
        dim: dimension to select along.
        temperature: t > 0, the noise scale.
        num_samples: noise draws M (default 100).
        noise: ``"gaussian"`` (default) or ``"gumbel"``.
        generator: torch.Generator for the noise.
        noise_samples: explicit noise ``(num_samples, *x.shape)``.
        reduction: ``"mean"`` (default, over rows), ``"sum"`` or ``"none"`` (x's shape
            without ``dim``).

    Example:
        >>> import torch
        >>> from softtopk.losses import fenchel_young_topk_loss
        >>> x = torch.tensor([[3.0, 1.0, 2.0]], requires_grad=True)
        >>> target = torch.tensor([[1.0, 0.0, 1.0]])
        >>> gen = torch.Generator().manual_seed(0)
        >>> loss = fenchel_young_topk_loss(x, target, temperature=1e-6, generator=gen)
        >>> loss.backward()
        >>> x.grad  # y_t(x) - target: zero once the target is the top k
        tensor([[0., 0., 0.]])

    Reference:
        Berthet, Blondel, Teboul, Cuturi, Vert, Bach. "Learning with Differentiable
        Perturbed Optimizers", NeurIPS 2020.
    """
    x = check_tensor(x)
    target = check_tensor(target, "target")
    if target.shape != x.shape:
        raise ValueError(f"target must have the shape of x, {tuple(x.shape)}; got {tuple(target.shape)}")
    d = check_dim(dim, x.dim())
    t = check_positive(temperature, "temperature")
    reduction = check_choice(reduction, "reduction", REDUCTIONS)
    if k is None:
        k = target.detach().sum(d)
    if isinstance(k, Tensor) and k.requires_grad:
        raise ValueError(
            "fenchel_young_topk_loss is not differentiable in k; pass a k that does not require grad"
        )
    rows = rowwise(x, k, d)
    pert = perturbation(
        x,
        d,
        rows.x.shape[0],
        num_samples=num_samples,
        noise=noise,
        generator=generator,
        noise_samples=noise_samples,
        default_samples=100,
    )
    batch = x.shape[:d] + x.shape[d + 1 :]
    if rows.x.numel() == 0:
        return _reduce(x.new_zeros(batch), reduction)
    target_rows = to_rows(target, d)[0].to(rows.x.dtype)
    loss, _ = fenchel_young_rows(rows.x, target_rows, rows.k, t, pert)
    return _reduce(loss.reshape(batch).to(x.dtype), reduction)

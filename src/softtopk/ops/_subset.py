"""Relaxed subset sampling: Gumbel top-k with k successive softmaxes (Xie and Ermon 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_bool, check_positive, check_tensor, eager_only, may_sync
from .._rows import apply_rules, classify, empty_result, regular_rows, rowwise, to_rows
from ._perturbation import GUMBEL, check_generator

#: The floor of 1 - a in the reference code: the smallest normal float32.
TINY = float(torch.finfo(torch.float32).tiny)


def relaxed_subset_rows(keys: Tensor, k: Tensor, t: float) -> Tensor:
    r"""Continuous top-k of perturbed keys (B, n) for budgets k (B,): sum_j w_j a^j.

    .. math::

        \alpha^1 = r,\quad a^j = \operatorname{softmax}(\alpha^j / t),\quad
        \alpha^{j+1} = \alpha^j + \log\max(1 - a^j, \text{tiny})

    with w_j = clip(k - j + 1, 0, 1) (1 for j <= k when k is an integer).
    """
    n = keys.shape[-1]
    K = max(1, min(n, math.ceil(float(k.amax().item())))) if may_sync(k) else n
    alpha = keys
    onehot = torch.zeros_like(keys)
    khot = torch.zeros_like(keys)
    for j in range(K):
        alpha = alpha + torch.log(torch.clamp(1.0 - onehot, min=TINY))
        onehot = torch.softmax(alpha / t, dim=-1)
        khot = khot + (k - j).clamp(0.0, 1.0).unsqueeze(-1) * onehot
    return khot


def _hard_of(y: Tensor, k: Tensor) -> Tensor:
    """The top-k mask of y (fractional k: clip(k - j, 0, 1) on the j-th largest)."""
    n = y.shape[-1]
    K = max(1, min(n, math.ceil(float(k.amax().item())))) if may_sync(k) else n
    vals, idx = torch.topk(y.detach(), K, dim=-1)
    rank = torch.arange(K, device=y.device, dtype=y.dtype)
    w = (k.detach().unsqueeze(-1) - rank).clamp(0.0, 1.0)
    w = torch.where(vals > -math.inf, w, 0.0)
    return torch.zeros_like(y).scatter(-1, idx, w)


def relaxed_subset(
    x: Tensor,
    k: float | Tensor,
    dim: int = -1,
    *,
    temperature: float = 0.1,
    hard: bool = False,
    generator: torch.Generator | None = None,
    gumbel: Tensor | None = None,
) -> Tensor:
    r"""Relaxed k-subset sample (Xie and Ermon 2019): Gumbel top-k, relaxed by k softmaxes.

    .. math::

        r = x + g,\ g \sim \text{Gumbel}(0, 1);\qquad
        a^j = \operatorname{softmax}(\alpha^j / t),\ \alpha^1 = r,\
        \alpha^{j+1} = \alpha^j + \log\max(1 - a^j, \text{tiny});\qquad
        y = \sum_{j=1}^{k} a^j.

    x holds log-weights: the hard top-k of the keys r is a sample of k items without
    replacement with probabilities proportional to exp(x) (Gumbel top-k), and y is its
    relaxation: sum(y) = k exactly and y tends to that k-hot sample as t -> 0. As the
    reference code, tiny is the smallest normal float32 and the backward is autograd
    through the k softmaxes: O(k n) time and memory. Entries of y can exceed 1 at
    moderate or large t (only the sum is guaranteed). With ``hard=True`` the forward is
    the k-hot mask of the top k of y (straight-through: the gradient is that of y).

    Args:
        x: log-weights (logits), any shape, floating dtype. -inf entries are never drawn.
        k: subset size in [0, n], or per-row sizes (see :func:`softtopk.topk_mask`); a
            real k weights the last softmax by frac(k). Differentiable in a floating k.
        dim: dimension to sample along.
        temperature: t > 0 of the softmaxes (0.1 in the reference ``sample_subset``).
        hard: straight-through k-hot forward.
        generator: torch.Generator the Gumbel noise is drawn from (default: global). Under
            ``torch.compile`` a call that draws its noise (no ``gumbel``) runs eagerly (a
            graph break; an error with ``fullgraph=True``), as a compiled graph would
            not reproduce the generator's draws. Under ``torch.func.vmap`` pass
            ``randomness="different"`` (independent draws) or ``"same"`` (one shared
            draw, the unbatched call's); torch's default ``"error"`` raises.
        gumbel: explicit Gumbel(0, 1) noise of x's shape, instead of a generator.

    Returns:
        The relaxed (or straight-through) k-hot sample, x's shape and dtype. Rows with
        k = 0, k >= n, NaN or infinities follow the row rules of
        :func:`softtopk.topk_mask` (+inf entries are always in the subset).

    Example:
        >>> import torch, softtopk
        >>> logits = torch.tensor([0.0, 2.0, -1.0, 1.0])
        >>> g = torch.tensor([0.1, -0.3, 0.2, 0.5])
        >>> softtopk.relaxed_subset(logits, 2, temperature=0.01, gumbel=g)
        tensor([0., 1., 0., 1.])

    Reference:
        Xie, Ermon. "Reparameterizable Subset Sampling via Continuous Relaxations",
        IJCAI 2019.
    """
    if gumbel is None and torch.compiler.is_compiling():
        return _eager_relaxed_subset(x, k, dim, temperature=temperature, hard=hard, generator=generator)
    t = check_positive(temperature, "temperature")
    check_bool(hard, "hard")
    rows = rowwise(x, k, dim)
    v, kvec, cd = rows.x, rows.k, rows.x.dtype
    if gumbel is not None:
        gumbel = check_tensor(gumbel, "gumbel")
        if generator is not None:
            raise ValueError("pass either generator or gumbel, not both")
        if gumbel.shape != x.shape:
            raise ValueError(f"gumbel must have the shape of x, {tuple(x.shape)}; got {tuple(gumbel.shape)}")
        g = to_rows(gumbel.detach().to(device=x.device), rows.dim)[0].to(cd)
    else:
        g = GUMBEL.sample(tuple(v.shape), check_generator(generator, x.device), cd, x.device)
    if v.numel() == 0:
        return empty_result(x, k)
    rules = classify(v, kvec)
    vr = regular_rows(v, rules)
    k_reg = torch.where(rules.regular, kvec, 1.0)
    plus = vr == math.inf
    # The softmaxes are invariant to a shift of the row: keys relative to the row's largest
    # finite logit cannot overflow (x + g or alpha / t would for |x| near the dtype's limit).
    top = torch.where(torch.isfinite(vr), vr, -math.inf).amax(-1, keepdim=True)
    shifted = vr - torch.where(torch.isfinite(top), top, 0.0).detach()
    if not may_sync(plus) or bool(plus.any()):
        # +inf entries are always drawn; the rest of the budget is sampled from the others.
        keys = torch.where(plus, -math.inf, shifted + g)
        k_rest = k_reg - rules.n_pos.to(cd)
        y = torch.where(plus, 1.0, relaxed_subset_rows(keys, k_rest, t))
    else:
        k_rest = k_reg
        y = relaxed_subset_rows(shifted + g, k_rest, t)
    if hard:
        y_hard = torch.where(plus, 1.0, _hard_of(torch.where(plus, -math.inf, y), k_rest))
        y = y_hard - y.detach() + y
    return rows.restore(apply_rules(v, kvec, y, rules))


_eager_relaxed_subset = eager_only(
    relaxed_subset,
    "relaxed_subset draws its Gumbel noise from a torch.Generator, whose draws a compiled graph "
    "would not reproduce: the call runs eagerly; pass gumbel= to compile it",
)

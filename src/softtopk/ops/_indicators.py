"""``topk_indicators``: soft (k, n) assignments, row j a soft one-hot of the j-th largest."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import (
    check_choice,
    check_dim,
    check_int,
    check_positive,
    check_tensor,
    compute_dtype,
    may_sync,
)
from ._permutation import PERMUTATION_METHODS, _method_options, permutation_rows
from ._perturbation import perturbation, perturbed_indicators
from ._soft import sorted_soft_indicators

INDICATOR_METHODS = ("soft", "perturbed", *PERMUTATION_METHODS)
#: Monte-Carlo samples of method="perturbed" when neither num_samples nor noise_samples is given.
PERTURBED_SAMPLES = 100


def _check_int(value: object, name: str, lo: int, hi: int | None = None) -> int:
    value = check_int(value, name)
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int in {bound}, got {value}")
    return value


def _with_infinities(rows: Tensor, k: int, solve) -> Tensor:  # noqa: ANN001
    """Indicators of rows (B, n) under the library's row rules.

    A row with NaN is NaN. A row with p entries equal to +inf starts with min(p, k)
    rows spread evenly over them (1/p each: they tie for the top places); the next
    k - p rows are the method's indicators of the remaining entries (the +inf ones as
    padding) for a budget of k - p. Rows without +inf are solved directly.
    """
    B, n = rows.shape
    nan = torch.isnan(rows).any(-1)
    plus = rows == math.inf
    p = plus.sum(-1)
    safe = torch.where(nan.unsqueeze(-1) | plus, -math.inf, rows)
    if not may_sync(rows):
        # Traced: one solve with every k rows, shifted down by p, each row solved for its
        # own budget k - p (the rows of the perturbed and permutation methods do not
        # depend on the budget; "soft" poses each row's problem for its budget).
        budget = (k - p).clamp(min=0).to(rows.dtype)
        inner = solve(torch.where(nan.unsqueeze(-1), 0.0, safe), k, budget)
        j = torch.arange(k, device=rows.device)
        src = (j - p.unsqueeze(-1)).clamp(min=0)
        shifted = inner.gather(1, src.unsqueeze(-1).expand(B, k, n))
        top = plus.unsqueeze(1) / p.clamp(min=1).view(-1, 1, 1).to(rows.dtype)
        out = torch.where((j < p.unsqueeze(-1)).unsqueeze(-1), top, shifted)
        return torch.where(nan.view(-1, 1, 1), math.nan, out)
    out = rows.new_zeros(B, k, n)
    for count in torch.unique(p[~nan]).tolist():
        sel = (p == count) & ~nan
        idx = sel.nonzero().squeeze(-1)
        head = min(count, k)
        block = rows.new_zeros(idx.numel(), k, n)
        if head:
            block[:, :head] = (plus[idx].unsqueeze(1) / count).to(rows.dtype)
        if k > head:
            block[:, head:] = solve(safe[idx], k - head)
        out = out.index_copy(0, idx, block)
    return torch.where(nan.view(-1, 1, 1), math.nan, out)


def topk_indicators(
    x: Tensor,
    k: int,
    dim: int = -1,
    *,
    method: str = "soft",
    temperature: float = 0.1,
    max_iter: int | None = None,
    tol: float | None = None,
    backward: str | None = None,
    num_samples: int | None = None,
    noise: str | None = None,
    generator: torch.Generator | None = None,
    noise_samples: Tensor | None = None,
    power: float | None = None,
    distribution: str | None = None,
    art_lambda: float | None = None,
) -> Tensor:
    r"""Soft top-k indicators: a (k, n) soft assignment for gather-style use.

    Row j (0-based) is a soft one-hot of the (j+1)-th largest entry along ``dim``; it
    sums to 1, and ``Y @ values`` gathers soft versions of the k largest entries in
    decreasing order (differentiable kNN, beam search, patch selection). As t -> 0,
    Y tends to the one-hot rows of ``torch.topk(x, k).indices``.

    * ``"soft"`` (Xie et al. 2020, sorted variant): entropic optimal transport from the
      scores (weights 1/n) to the anchors (k, k-1, ..., 0) (weights 1/n, ..., 1/n,
      (n-k)/n) for the cost (x_i - a_j)^2 / max C,

      .. math::

          Y_{j,:} = n\,\Gamma^\epsilon_{:,j},\qquad \Gamma^\epsilon = \arg\min_{\Gamma \in U(\mu,\nu)}
          \langle C, \Gamma\rangle + \epsilon \sum \Gamma \log \Gamma,

      by log-domain Sinkhorn (``max_iter``, default 1000, until the relative row-marginal
      error is below ``tol``, default 1e-6 in float64 and 1e-4 otherwise; a UserWarning
      says when it stopped short), with ``backward="implicit"`` (default; the paper's
      closed form, O(n k^2 + k^3)) or ``"unrolled"`` (autograd through the iterations).
      ``temperature`` is SOFT's epsilon. The anchors have unit spacing and the reference
      does not rescale the scores: their scale sets how soft Y is.
    * ``"perturbed"`` (Berthet et al. 2020): Y = E[one-hot rows of topk(x + tZ)] over
      ``num_samples`` (default 100) Gaussian or Gumbel draws (``noise``, ``generator``
      or explicit ``noise_samples`` of shape ``(num_samples, *x.shape)``), score-function
      backward on the same draws.
    * ``"neuralsort"``, ``"softsort"``, ``"odd_even"``, ``"bitonic"``: the first k rows
      of the relaxed permutation matrix (see :func:`softtopk.permutation_topk_mask`;
      ``power``, ``distribution`` and ``art_lambda`` as there). With k = n this is the
      whole relaxed permutation matrix.

    Args:
        x: scores, any shape, floating dtype. -inf entries are padding: they get no mass
            and no gradient; with fewer than k other entries, the rows j beyond their
            count are zero. A row holding NaN gives NaN indicators; p entries equal to
            +inf take the first min(p, k) rows, 1/p each (they tie for the top), and the
            other entries fill the rows after them with a budget of k - p.
        k: number of rows, an int in [0, n].
        dim: dimension to select along.
        method: ``"soft"``, ``"perturbed"``, ``"neuralsort"``, ``"softsort"``,
            ``"odd_even"`` or ``"bitonic"``.
        temperature: t > 0 (the method's epsilon, sigma, tau or 1/steepness).
        max_iter: ``"soft"`` only: most Sinkhorn iterations (default 1000).
        tol: ``"soft"`` only: relative row-marginal error to stop at.
        backward: ``"soft"`` only: ``"implicit"`` (default) or ``"unrolled"``.
        num_samples: ``"perturbed"`` only: number of noise draws (default 100).
        noise: ``"perturbed"`` only: ``"gaussian"`` (default) or ``"gumbel"``.
        generator: ``"perturbed"`` only: the torch.Generator to draw from.
        noise_samples: ``"perturbed"`` only: explicit draws ``(num_samples, *x.shape)``.
        power: ``"softsort"`` only (see :func:`softtopk.permutation_topk_mask`).
        distribution: ``"odd_even"`` and ``"bitonic"`` only (idem).
        art_lambda: ``"odd_even"`` and ``"bitonic"`` only (idem).

    Returns:
        Tensor of x's shape with the size n at ``dim`` replaced by the two sizes (k, n),
        e.g. (..., k, n) for dim = -1; x's dtype.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=torch.float64)
        >>> softtopk.topk_indicators(x, 2, temperature=0.05).round(decimals=3)
        tensor([[0.0000, 0.9070, 0.0000, 0.0930],
                [0.0010, 0.0930, 0.0920, 0.8130]], dtype=torch.float64)
        >>> softtopk.topk_indicators(x, 2, method="softsort", temperature=0.05).round(decimals=3)
        tensor([[0., 1., 0., 0.],
                [0., 0., 0., 1.]], dtype=torch.float64)

    References:
        Xie, Dai, Chen, Dai, Zhao, Zha, Wei, Pfister. "Differentiable Top-k with Optimal
        Transport", NeurIPS 2020. Berthet et al. "Learning with Differentiable Perturbed
        Optimizers", NeurIPS 2020. Cordonnier et al. "Differentiable Patch Selection for
        Image Recognition", CVPR 2021.
    """
    x = check_tensor(x)
    d = check_dim(dim, x.dim())
    method = check_choice(method, "method", INDICATOR_METHODS)
    t = check_positive(temperature, "temperature")
    n = x.shape[d]
    if isinstance(k, Tensor):
        if k.numel() != 1 or k.is_floating_point() and k.requires_grad:
            raise TypeError("k must be an int for topk_indicators (the output has k rows), got a tensor")
        k = k.item()
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    k = _check_int(k, "k", 0, n)
    groups = {
        "soft": {"max_iter": max_iter, "tol": tol, "backward": backward},
        "perturbed": {
            "num_samples": num_samples,
            "noise": noise,
            "generator": generator,
            "noise_samples": noise_samples,
        },
    }
    for owner, args in groups.items():
        for name, value in args.items():
            if value is not None and method != owner:
                raise ValueError(
                    f"{name} applies to method={owner!r} only, got {name}={value!r} with method={method!r}"
                )
    # Every name the solver closure reads is bound on every path (torch.compile cannot
    # trace a closure over an unbound cell).
    options: dict[str, object] = {}
    pert = iters = None
    if method in PERMUTATION_METHODS:
        options = _method_options(method, power, distribution, art_lambda)
    else:
        for name, value in (("power", power), ("distribution", distribution), ("art_lambda", art_lambda)):
            if value is not None:
                raise ValueError(f"{name} applies to the permutation methods only, got {name}={value!r}")
    cd = compute_dtype(x.dtype)
    moved = x.movedim(d, -1)
    batch = moved.shape[:-1]
    rows = moved.reshape(math.prod(batch), n).to(cd)
    B = rows.shape[0]
    if method == "perturbed":
        pert = perturbation(
            x,
            d,
            B,
            num_samples=num_samples,
            noise=noise,
            generator=generator,
            noise_samples=noise_samples,
            default_samples=PERTURBED_SAMPLES,
        )
    if method == "soft":
        iters = _check_int(1000 if max_iter is None else max_iter, "max_iter", 1)
        tol = check_positive((1e-6 if cd == torch.float64 else 1e-4) if tol is None else tol, "tol")
        backward = check_choice(
            "implicit" if backward is None else backward, "backward", ("implicit", "unrolled")
        )

    def solve(v: Tensor, kk: int, budget: Tensor | None = None) -> Tensor:
        if kk == 0:
            return v.new_zeros(v.shape[0], 0, n)
        if method == "soft":
            return sorted_soft_indicators(
                v, kk, epsilon=t, max_iter=iters, tol=tol, backward=backward, budget=budget
            )
        if method == "perturbed":
            return perturbed_indicators(v, kk, temperature=t, pert=pert)
        return permutation_rows(v, kk, method, t, **options)

    if k == 0 or B == 0 or n == 0:
        out = rows.new_zeros(B, k, n)
    else:
        out = _with_infinities(rows, k, solve)
    out = out.reshape(*batch, k, n).movedim(-2, d).movedim(-1, d + 1)
    return out.to(x.dtype)

"""SOFT top-k (Xie et al. 2020) as published: entropic optimal transport to two anchors.

The plan is computed by a fixed number of Sinkhorn iterations, exactly as the reference
code does, and differentiated with the paper's closed-form implicit backward. This is
the published algorithm, kept as a reference and a benchmark baseline: at convergence
it equals ``topk_mask(x, k, method="entropic", temperature=epsilon * C_max / 2)``, which
the threshold solver computes in a few passes instead of ``max_iter`` iterations.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._checks import check_dim, check_positive, check_tensor, may_sync, refuse_forward_mode
from .._rows import apply_rules, classify, empty_result, regular_rows, rowwise
from ..threshold import LOGISTIC, threshold_mask

_ANCHORS = (0.0, 1.0)


def sinkhorn_plan(cost: Tensor, log_mu: Tensor, log_nu: Tensor, epsilon: float, max_iter: int) -> Tensor:
    """``max_iter`` log-domain Sinkhorn iterations; returns the plan (B, n, m).

    Args:
        cost: (B, n, m) cost matrix.
        log_mu: (B, n) log source weights.
        log_nu: (B, m) log target weights.
        epsilon: entropic strength.
        max_iter: number of iterations (row update, then column update, as SOFT does).
    """
    log_mu, log_nu = log_mu.unsqueeze(-1), log_nu.unsqueeze(-2)
    f = torch.zeros_like(log_mu)
    g = torch.zeros_like(log_nu)
    for _ in range(max_iter):
        f = epsilon * (log_mu - torch.logsumexp((g - cost) / epsilon, dim=-1, keepdim=True))
        g = epsilon * (log_nu - torch.logsumexp((f - cost) / epsilon, dim=-2, keepdim=True))
    return torch.exp((f + g - cost) / epsilon)


def _solve_or_pinv(kernel: Tensor, rhs: Tensor) -> Tensor:
    """kernel^-1 rhs per row; the least-squares solution where the kernel is singular.

    The kernel is singular when a target's mass rounds to 0 or to the whole (k within
    rounding of 0 or n): its constraint is then implied by the others, b on it is free,
    and the pseudo-inverse picks the minimum-norm b, which gives the same dL/dC.
    """
    b, info = torch.linalg.solve_ex(kernel, rhs.unsqueeze(-1))
    singular = info != 0
    if not may_sync(singular) or bool(singular.any()):
        b = torch.where(singular[..., None, None], torch.linalg.pinv(kernel) @ rhs.unsqueeze(-1), b)
    return b.squeeze(-1)


def sinkhorn_implicit_vjp(
    plan: Tensor, mu: Tensor, nu: Tensor, grad_plan: Tensor, epsilon: float, keep: Tensor | None = None
) -> Tensor:
    """dL/dC from dL/dPlan at an optimal entropic plan (Xie et al. 2020, Sec. 4).

    Differentiates the optimality conditions instead of the iterations. With the last
    column dropped (Gamma~, nu~) and K = diag(nu~) - Gamma~^T diag(1/mu) Gamma~:
    b = K^{-1}(g2 - Gamma~^T (g1/mu)), a = g1/mu - Gamma~ b / mu, and
    dL/dC_ij = Gamma_ij (a_i + b_j - dL/dGamma_ij)/epsilon (b_m = 0), where g1 and g2
    are the row and column sums of dL/dGamma * Gamma. Cost O(n m^2 + m^3).

    Args:
        plan: (B, n, m) optimal plan.
        mu: (B, n) source weights (entries with mu = 0 are absent: their plan rows are 0).
        nu: (B, m) target weights.
        grad_plan: (B, n, m) cotangent dL/dGamma.
        epsilon: entropic strength.
        keep: optional (B, m) bool, the columns whose dual variable b_j is solved for;
            the others get b_j = 0. Their complement must hold one column of positive
            weight (the redundant marginal constraint) and every column of zero weight.
            None drops the last column, as the paper does.
    """
    if keep is not None:
        return _implicit_vjp_kept(plan, mu, nu, grad_plan, epsilon, keep)
    weighted = grad_plan * plan
    g1 = weighted.sum(-1)  # (B, n)
    g2 = weighted.sum(-2)[..., :-1]  # (B, m-1)
    head = plan[..., :-1]  # (B, n, m-1)
    kernel = torch.diag_embed(nu[..., :-1]) - head.transpose(-1, -2) @ (head / mu.unsqueeze(-1))
    rhs = g2 - (head * (g1 / mu).unsqueeze(-1)).sum(-2)
    b = _solve_or_pinv(kernel, rhs)  # (B, m-1)
    a = (g1 - (head @ b.unsqueeze(-1)).squeeze(-1)) / mu
    b_full = torch.nn.functional.pad(b, (0, 1))
    return plan * (a.unsqueeze(-1) + b_full.unsqueeze(-2) - grad_plan) / epsilon


def _implicit_vjp_kept(
    plan: Tensor, mu: Tensor, nu: Tensor, grad_plan: Tensor, epsilon: float, keep: Tensor
) -> Tensor:
    """sinkhorn_implicit_vjp with absent sources (mu = 0) and a per-row choice of columns."""
    weighted = grad_plan * plan
    g1 = weighted.sum(-1)  # (B, n)
    g2 = weighted.sum(-2)  # (B, m)
    inv_mu = torch.where(mu > 0, 1.0 / torch.where(mu > 0, mu, 1.0), 0.0)
    kernel = torch.diag_embed(nu) - plan.transpose(-1, -2) @ (plan * inv_mu.unsqueeze(-1))
    rhs = g2 - (plan * (g1 * inv_mu).unsqueeze(-1)).sum(-2)
    both = keep.unsqueeze(-1) & keep.unsqueeze(-2)
    eye = torch.eye(nu.shape[-1], dtype=plan.dtype, device=plan.device)
    kernel = torch.where(both, kernel, eye)
    b = _solve_or_pinv(kernel, torch.where(keep, rhs, 0.0))
    a = (g1 - (plan @ b.unsqueeze(-1)).squeeze(-1)) * inv_mu
    return plan * (a.unsqueeze(-1) + b.unsqueeze(-2) - grad_plan) / epsilon


def normalised_cost(x: Tensor, anchors: Tensor, present: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x_i - a_j)^2 / C_max (B, n, m) in float64 and C_max (B, 1, 1), without overflow.

    C_max = max_{i, j} (x_i - a_j)^2 over the present entries; the ratio is formed as
    ((x - a) / sqrt(C_max))^2, so no square of a large score is ever taken (finite for
    every finite float64 input). Absent entries (``present`` False) get cost 0.
    """
    xs = x.to(torch.float64)
    diff = xs.unsqueeze(-1) - anchors.to(torch.float64)
    if present is not None:
        diff = torch.where(present.unsqueeze(-1), diff, 0.0)
    root = diff.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return (diff / root) ** 2, root**2


def _fold(size: int, a: Tensor, d: int | None) -> Tensor:
    """A vmapped tensor with its vmap dim ``d`` folded into its leading (row) dim."""
    a = a.movedim(d, 0) if d is not None else a.unsqueeze(0).expand(size, *a.shape)
    return a.reshape(size * a.shape[1], *a.shape[2:]).contiguous()


def _unfold(size: int, outputs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    """The inverse of :func:`_fold` on every output (vmap dim 0)."""
    return tuple(o.reshape(size, -1, *o.shape[1:]) for o in outputs), (0,) * len(outputs)


@torch.library.custom_op("softtopk::soft_sinkhorn_fwd", mutates_args=())
def soft_sinkhorn_fwd(
    x: Tensor, k: Tensor, epsilon: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SOFT's two-anchor plan of rows (B, n): (y, plan (B, n, 2), nu (B, 2), C_max (B, 1)), float64.

    One op for torch.compile (the iterations are not traced), with a fake (shapes only)
    and a vmap rule (the vmapped dim joins the rows: every row is solved on its own).
    """
    x, k = x.detach().to(torch.float64), k.detach().to(torch.float64)
    present = x > -math.inf
    n = present.sum(-1, keepdim=True).to(torch.float64).clamp(min=1.0)
    anchors = x.new_tensor(_ANCHORS)
    # C_max is treated as a constant, as in the reference.
    cost, c_max = normalised_cost(torch.where(present, x, 0.0), anchors, present)
    # The selected entries go to the anchor at 1 (mass k/n), the others to 0: this is
    # the reference's "k smallest" with the roles of the anchors exchanged.
    nu = torch.cat([(n - k.unsqueeze(-1)) / n, k.unsqueeze(-1) / n], -1)
    log_mu = torch.where(present, -torch.log(n), -math.inf)
    # Each source's costs shifted by their minimum: the iterations start with the row
    # update, which absorbs a per-row shift into f exactly, so every iterate (and the plan)
    # is unchanged, while rows whose costs differ by a shift get bit-identical plan rows
    # (on a row spanning the float64 range, costs 1 and 0 had rounded apart).
    cost = cost - cost.amin(-1, keepdim=True)
    plan = sinkhorn_plan(cost, log_mu, torch.log(nu), epsilon, max_iter)
    plan = torch.where(present.unsqueeze(-1), plan, 0.0)
    return n * plan[..., 1], plan, nu, c_max.reshape(-1, 1)


@soft_sinkhorn_fwd.register_fake
def _(x, k, epsilon, max_iter):  # noqa: ANN001
    B, n = x.shape
    f64 = torch.float64
    return (
        x.new_empty((B, n), dtype=f64),
        x.new_empty((B, n, 2), dtype=f64),
        x.new_empty((B, 2), dtype=f64),
        x.new_empty((B, 1), dtype=f64),
    )


@soft_sinkhorn_fwd.register_vmap
def _(info, in_dims, x, k, epsilon, max_iter):  # noqa: ANN001
    size = info.batch_size
    out = soft_sinkhorn_fwd(_fold(size, x, in_dims[0]), _fold(size, k, in_dims[1]), epsilon, max_iter)
    return _unfold(size, out)


class _SoftSinkhorn(torch.autograd.Function):
    """SOFT's two-anchor plan by ``max_iter`` Sinkhorn iterations, with the implicit backward.

    Entries equal to -inf are absent sources (weight 0): n counts the others.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: Tensor, epsilon: float, max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        return torch.ops.softtopk.soft_sinkhorn_fwd(x, k, epsilon, max_iter)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, _, epsilon, _ = inputs
        _, plan, nu, c_max = output
        ctx.mark_non_differentiable(plan, nu, c_max)
        ctx.save_for_backward(x, plan, nu, c_max)
        ctx.epsilon = epsilon

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, plan, nu, c_max = ctx.saved_tensors
        x = x.to(torch.float64)
        present = x > -math.inf
        n = present.sum(-1, keepdim=True).to(torch.float64).clamp(min=1.0)
        grad_plan = torch.stack([torch.zeros_like(plan[..., 0]), n * grad_y.to(torch.float64)], -1)
        mu = torch.where(present, 1.0 / n, 0.0)
        keep = torch.tensor([True, False], device=x.device).expand(x.shape[0], 2)
        grad_cost = sinkhorn_implicit_vjp(plan, mu, nu, grad_plan, ctx.epsilon, keep=keep)
        grad_cost = grad_cost / c_max.unsqueeze(-1)
        anchors = x.new_tensor(_ANCHORS)
        xs = torch.where(present, x, 0.0)
        grad = (grad_cost * 2.0 * (xs.unsqueeze(-1) - anchors)).sum(-1)
        return torch.where(present, grad, 0.0).to(grad_y.dtype), None, None, None


def soft_sinkhorn_mask(
    x: Tensor,
    k: float | Tensor,
    dim: int = -1,
    *,
    temperature: float = 0.1,
    max_iter: int = 200,
) -> Tensor:
    r"""SOFT top-k mask by Sinkhorn iterations, as published (largest k selected).

    .. math::

        \Gamma^\epsilon = \arg\min_{\Gamma \in U(\mu, \nu)} \langle C, \Gamma\rangle
            + \epsilon \sum_{ij} \Gamma_{ij}\log\Gamma_{ij},\qquad
        y = n\,\Gamma^\epsilon_{:,1},

    with sources mu = 1/n on the scores x, anchors (0, 1) with weights
    nu = ((n-k)/n, k/n), and the cost C_ij = (x_i - a_j)^2 / max C; the mask is the mass
    sent to the anchor at 1. (The reference selects the k smallest with the anchor at 0;
    this is the same construction for the k largest.) ``max_iter``
    log-domain Sinkhorn iterations (200 in the reference code), then the paper's
    closed-form implicit backward. The iterations end on the anchors' update, so the mask
    sums to k exactly, but at small temperatures 200 iterations leave the sources'
    marginals unmet and an entry can exceed 1 (e.g. [0, 1.5] for x = [0, 1], k = 1.5,
    t = 1e-6), as the reference's does. Prefer ``topk_mask(method="entropic")``, which
    computes the converged plan exactly and much faster.

    Args:
        x: scores, any shape, floating dtype.
        k: budget in [0, n] or a per-row tensor (see :func:`softtopk.topk_mask`). Not
            differentiable in k (as in the reference): a k that requires grad is refused.
        dim: dimension to select along.
        temperature: SOFT's epsilon, the entropic strength on the max-normalised cost.
        max_iter: number of Sinkhorn iterations.

    Returns:
        The mask y, same shape and dtype as x.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([5.0, 2.0, 3.0, 4.0, 1.0, 6.0])
        >>> y = softtopk.soft_sinkhorn_mask(x, 3, temperature=0.05, max_iter=100)
        >>> [round(v, 2) for v in y.tolist()]  # the reference demo's mask, complemented
        [0.84, 0.16, 0.36, 0.64, 0.06, 0.94]

    Reference:
        Xie, Dai, Chen, Dai, Zhao, Zha, Wei, Pfister. "Differentiable Top-k with Optimal
        Transport", NeurIPS 2020.
    """
    x = check_tensor(x)
    d = check_dim(dim, x.dim())
    eps = check_positive(temperature, "temperature")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    rows = rowwise(x, k, d, k_grad=False)
    if rows.x.numel() == 0:
        return empty_result(x, k)
    # Rows set by a rule (k = 0, k = n, infinities, NaN) follow the library's table; the
    # others are solved with all their anchors weighted (0 < k < n), where the implicit
    # backward's linear system is regular.
    rules = classify(rows.x, rows.k)
    v = regular_rows(rows.x, rules)
    # A regular row's +inf entries (fewer than k) are kept: they get 1 and leave the solve,
    # as absent sources, with the budget k - (their number), which stays in (0, n_finite).
    pinf = v == math.inf
    v = torch.where(pinf, -math.inf, v)
    k_solve = rows.k - rules.n_pos.to(rows.k.dtype)
    # Ruled rows are solved with k = n/2 (0 < k < n also for n = 1); their result is discarded.
    k_solve = torch.where(rules.regular, k_solve, rows.x.shape[-1] / 2.0)
    refuse_forward_mode("soft_sinkhorn_mask")
    y = _SoftSinkhorn.apply(v, k_solve, eps, max_iter)[0]
    y = torch.where(pinf, 1.0, y)
    return rows.restore(apply_rules(rows.x, rows.k, y.to(rows.x.dtype), rules))


# ----------------------------------------------------- method="soft": the threshold route


#: The largest effective temperature eps C_max / 2 of ``soft_mask`` (float64).
SOFT_MAX_TEMPERATURE = 1e300


def soft_cost_scale(x: Tensor) -> Tensor:
    """C_max / 2 per row (B,) in float64: half the largest cost (x_i - a)^2 to the anchors 0 and 1.

    Computed on the finite entries, in float64 (the square of a float32 score overflows
    float32 beyond about 1.8e19), and detached, as the reference treats it as a constant.
    max((x - 0)^2, (x - 1)^2) >= 1/4 for every real x, so C_max >= 1/4; it is finite for
    every finite float64 score up to about 1e154 and capped at the float64 maximum.

    max((x - 0)^2, (x - 1)^2) = (|x - 1/2| + 1/2)^2 falls up to x = 1/2 and rises after
    it, so its largest value over a row is max(top, 1 - bottom)^2, with top and bottom
    the row's largest and smallest finite scores. Non-finite entries are set to 1/2
    first, where the cost is 1/4, the floor: they change nothing.
    """
    xd = torch.nan_to_num(x.detach(), nan=0.5, posinf=0.5, neginf=0.5)
    # one fused pass for both ends on rows of at most 8; beyond, torch's aminmax is slower
    # than amax and amin apart (one thread, rows of 8192 x 32: 0.49 ms against 0.08 ms)
    if x.shape[-1] <= 8:
        bottom, top = torch.aminmax(xd, dim=-1)
    else:
        bottom, top = xd.amin(-1), xd.amax(-1)
    r = torch.maximum(top.to(torch.float64), 1.0 - bottom.to(torch.float64))
    return 0.5 * (r * r).clamp(min=0.25, max=torch.finfo(torch.float64).max)


def soft_mask(x: Tensor, k: Tensor, *, temperature: float, solver: str = "auto") -> Tensor:
    r"""SOFT top-k (Xie et al. 2020) as published, two anchors, on rows (B, n), exactly.

    .. math::

        y = n\,\Gamma^\epsilon_{:,1}
          = \sigma\Big(\frac{x - \tau}{\epsilon\, C_{\max}/2}\Big),\qquad
        \sum_i y_i = k,\qquad C_{\max} = \max_{i,\ a \in \{0, 1\}} (x_i - a)^2,

    where Gamma^eps is the entropic optimal transport plan from the scores (weights 1/n)
    to the anchors (0, 1) (weights ((n-k)/n, k/n)) for the cost (x_i - a_j)^2 / C_max,
    and ``temperature`` is SOFT's epsilon. The converged plan is exactly this logistic
    with a solved threshold, so it is computed by the threshold solver (a few passes, no
    Sinkhorn iterations) with the O(n) implicit backward; C_max is treated as a constant,
    as in the reference. The reference selects the k smallest scores (mass k/n on the
    anchor at 0); the mass sent to the anchor at 1 with weight k/n selects the k largest
    and equals ``1 - SOFT_smallest(x, n - k)`` (the same transport problem). Two
    differences from the reference code, both documented choices: C_max is taken per
    row (the reference takes it over the whole batch, which makes a row's mask depend on
    the other rows; identical for a batch of one), and -inf entries are padding (0, no
    gradient; the reference replaces them by min - (max - min)). In float64, C_max is
    capped at the largest float64 (scores beyond about 1e154) and the effective
    temperature eps C_max / 2 at 1e300, where the mask is k/n to within max |x| / 1e300.

    Reference:
        Xie, Dai, Chen, Dai, Zhao, Zha, Wei, Pfister. "Differentiable Top-k with Optimal
        Transport", NeurIPS 2020.
    """
    # eps C_max / 2 overflows float64 for large eps and scores near 1e154; beyond 1e300
    # the mask is k / n to within |x| / 1e300 anyway, and the solver's bracket stays finite.
    t = (temperature * soft_cost_scale(x)).clamp(max=SOFT_MAX_TEMPERATURE)
    return threshold_mask(x, k, t, LOGISTIC, solver)


# ------------------------------------------------ sorted SOFT: k + 1 anchors, k x n output


class SinkhornResult(NamedTuple):
    """Potentials of a log-domain Sinkhorn run and how it ended."""

    f: Tensor
    g: Tensor
    iterations: int
    error: float


#: Sinkhorn iterations at each epsilon of the warm start of :func:`sinkhorn_log`.
WARM_ITERATIONS = 10


def sinkhorn_log(
    cost: Tensor, log_mu: Tensor, log_nu: Tensor, epsilon: float, max_iter: int, tol: float
) -> SinkhornResult:
    """Log-domain Sinkhorn until the row marginals are within ``tol`` (relative).

    Each iteration updates f (rows) then g (columns), as SOFT does, so the returned
    plan exp((f + g - C)/epsilon) has exact column marginals. The row error
    max_i |sum_j Gamma_ij / mu_i - 1| comes for free from the next f update (it is
    expm1 of the change of f over epsilon); sources with mu_i = 0 (log_mu = -inf) are
    ignored. Differentiable by autograd when its inputs require grad (unrolled mode).

    Args:
        cost: (B, n, m).
        log_mu: (B, n) log source weights (-inf for absent sources).
        log_nu: (B, m) log target weights (-inf for absent targets).
        epsilon: entropic strength.
        max_iter: most iterations.
        tol: stop when the relative row-marginal error is at most tol.
    """
    log_mu, log_nu = log_mu.unsqueeze(-1), log_nu.unsqueeze(-2)
    present = log_mu > -math.inf
    f = torch.zeros_like(cost[..., :1])
    g = torch.zeros_like(cost[..., :1, :])
    B = cost.shape[0]
    # Epsilon scaling: at a small epsilon, Sinkhorn started from zero potentials crawls;
    # a few iterations at each of epsilon = 1, 1/2, 1/4, ... (the costs are at most 1)
    # warm-start the potentials. The fixed point at the final epsilon is the same.
    stage = 1.0
    while stage > 2.0 * epsilon:
        for _ in range(WARM_ITERATIONS):
            f = stage * (log_mu - torch.logsumexp((g - cost) / stage, dim=-1, keepdim=True))
            g = stage * (log_nu - torch.logsumexp((f - cost) / stage, dim=-2, keepdim=True))
        stage *= 0.5
    # Each row stops on its own test, so its result does not depend on the other rows.
    active = torch.ones(B, 1, 1, dtype=torch.bool, device=cost.device)
    row_error = torch.full((B,), math.inf, dtype=cost.dtype, device=cost.device)
    it = 0
    for it in range(1, max_iter + 1):
        f_new = epsilon * (log_mu - torch.logsumexp((g - cost) / epsilon, dim=-1, keepdim=True))
        done = torch.zeros_like(active)
        if it > 1 and (it % 5 == 0 or it == max_iter):
            change = torch.where(present, (f.detach() - f_new.detach()) / epsilon, 0.0)
            measured = torch.expm1(change).abs().amax(dim=(-2, -1)) if change.numel() else row_error * 0
            row_error = torch.where(active.view(-1), measured, row_error)
            done = active & (row_error <= tol).view(-1, 1, 1)
        f = torch.where(active, f_new, f)
        g_new = epsilon * (log_nu - torch.logsumexp((f - cost) / epsilon, dim=-2, keepdim=True))
        g = torch.where(active, g_new, g)
        active = active & ~done
        if it % 5 == 0 and may_sync(active) and not bool(active.any()):
            break
    # Traced (compile, vmap, meta): every iteration runs (converged rows are frozen, so the
    # result is the same) and the error is not read on the host.
    error = (float(row_error.amax()) if B else 0.0) if may_sync(row_error) else math.nan
    return SinkhornResult(f, g, it, error)


class SortedSoftProblem(NamedTuple):
    """The transport problem of the sorted SOFT operator on rows (B, n), k anchors + 1."""

    cost: Tensor  # (B, n, k+1), divided by c_max
    log_mu: Tensor  # (B, n)
    log_nu: Tensor  # (B, k+1)
    count: Tensor  # (B,) entries above -inf (at least 1)
    c_max: Tensor  # (B, 1, 1)
    anchors: Tensor  # (B, k+1)
    present: Tensor  # (B, n) bool


def sorted_soft_problem(x: Tensor, k: int, budget: Tensor | None = None) -> SortedSoftProblem:
    """Anchors (k, k-1, ..., 0) with weights (1/n, ..., 1/n, (n-k)/n), cost (x - a)^2 / C_max.

    n counts the entries above -inf: -inf entries are absent sources (padding). With
    n <= k the top n anchors get 1/n each and the others nothing (a soft sort of the n
    entries). Rows with no entry above -inf are solved as a dummy problem and zeroed.
    ``budget`` (B,) poses row b's own problem for a budget k_b <= k in the same k + 1
    columns: anchors (k_b, ..., 1) in the first k_b columns, columns k_b .. k-1 without
    weight (their plan columns are zero) and the anchor 0 last, so that row b's plan,
    C_max included, is the one of budget k_b.
    """
    B, n = x.shape
    x = x.to(torch.float64)
    present = x > -math.inf
    empty = ~present.any(-1, keepdim=True)
    present = present | empty
    count = present.sum(-1).to(x.dtype)
    xs = torch.where(present & ~empty, x, 0.0)
    j = torch.arange(k + 1, device=x.device, dtype=x.dtype)
    kb = x.new_full((B, 1), float(k)) if budget is None else budget.to(x.dtype).reshape(B, 1)
    anchors = torch.where(j < kb, kb - j, 0.0)
    cost, c_max = normalised_cost(xs, anchors.unsqueeze(-2), present)
    log_mu = torch.where(present, -torch.log(count).unsqueeze(-1), -math.inf)
    cnt = count.unsqueeze(-1)
    nu = torch.where(j < torch.minimum(cnt, kb), 1.0 / cnt, 0.0)
    nu = torch.where(j == k, (cnt - kb).clamp(min=0.0) / cnt, nu)
    return SortedSoftProblem(cost, log_mu, torch.log(nu), count, c_max, anchors, present & ~empty)


def _kept_columns(log_nu: Tensor) -> Tensor:
    """Columns with weight, less the last of them (the redundant marginal constraint)."""
    active = log_nu > -math.inf
    position = torch.arange(active.shape[-1], device=active.device)
    last = torch.where(active, position, -1).amax(-1, keepdim=True)
    return active & (position != last)


def _not_converged(result: SinkhornResult, max_iter: int, tol: float) -> None:
    if result.error > tol:
        warnings.warn(
            f"Sinkhorn stopped after max_iter={max_iter} iterations with a relative marginal error of "
            f"{result.error:.3g} > tol={tol:g}; raise max_iter or the temperature",
            UserWarning,
            stacklevel=4,
        )


def _sorted_plan(prob: SortedSoftProblem, k: int, epsilon: float, max_iter: int, tol: float) -> Tensor:
    result = sinkhorn_log(prob.cost, prob.log_mu, prob.log_nu, epsilon, max_iter, tol)
    _not_converged(result, max_iter, tol)
    plan = torch.exp((result.f + result.g - prob.cost) / epsilon)
    return torch.where(prob.present.unsqueeze(-1), plan, 0.0)


@torch.library.custom_op("softtopk::sorted_soft_fwd", mutates_args=())
def sorted_soft_fwd(
    x: Tensor, budget: Tensor, k: int, epsilon: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sorted SOFT of rows (B, n) with budgets (B,) <= k, float64.

    Returns (Y (B, k, n), plan (B, n, k+1), log nu (B, k+1), count (B,), C_max (B, 1, 1),
    anchors (B, k+1)). One op for torch.compile (Sinkhorn's stopping test reads values),
    with a fake (shapes only) and a vmap rule (the vmapped dim joins the rows, each of
    which stops on its own test).
    """
    prob = sorted_soft_problem(x.detach(), k, budget.detach())
    plan = _sorted_plan(prob, k, epsilon, max_iter, tol)
    out = (prob.count.view(-1, 1, 1) * plan[..., :k]).transpose(-1, -2).contiguous()
    return out, plan, prob.log_nu, prob.count, prob.c_max, prob.anchors


@sorted_soft_fwd.register_fake
def _(x, budget, k, epsilon, max_iter, tol):  # noqa: ANN001
    B, n = x.shape
    new = functools.partial(x.new_empty, dtype=torch.float64)
    return new((B, k, n)), new((B, n, k + 1)), new((B, k + 1)), new((B,)), new((B, 1, 1)), new((B, k + 1))


@sorted_soft_fwd.register_vmap
def _(info, in_dims, x, budget, k, epsilon, max_iter, tol):  # noqa: ANN001
    size = info.batch_size
    xs, bs = _fold(size, x, in_dims[0]), _fold(size, budget, in_dims[1])
    return _unfold(size, sorted_soft_fwd(xs, bs, k, epsilon, max_iter, tol))


class _SortedSoft(torch.autograd.Function):
    """Sorted SOFT indicators by log-domain Sinkhorn, with the paper's implicit backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, budget: Tensor, k: int, epsilon: float, max_iter: int, tol: float
    ) -> tuple[Tensor, ...]:
        return torch.ops.softtopk.sorted_soft_fwd(x, budget, k, epsilon, max_iter, tol)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, _, k, epsilon, _, _ = inputs
        _, plan, log_nu, count, c_max, anchors = output
        ctx.mark_non_differentiable(plan, log_nu, count, c_max, anchors)
        ctx.save_for_backward(x, plan, log_nu, count, c_max, anchors)
        ctx.k, ctx.epsilon = k, epsilon

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, plan, log_nu, count, c_max, anchors = ctx.saved_tensors
        present = x > -math.inf
        grad_plan = torch.nn.functional.pad(count.view(-1, 1, 1) * grad_out.transpose(-1, -2), (0, 1))
        mu = torch.where(present, 1.0 / count.unsqueeze(-1), 0.0)
        grad_cost = sinkhorn_implicit_vjp(
            plan, mu, torch.exp(log_nu), grad_plan, ctx.epsilon, keep=_kept_columns(log_nu)
        )
        xs = torch.where(present, x, 0.0)
        diff = xs.unsqueeze(-1).to(torch.float64) - anchors.unsqueeze(-2)
        grad_x = (grad_cost / c_max * 2.0 * diff).sum(-1)
        return torch.where(present, grad_x, 0.0).to(x.dtype), None, None, None, None, None


def sorted_soft_indicators(
    x: Tensor,
    k: int,
    *,
    epsilon: float,
    max_iter: int,
    tol: float,
    backward: str = "implicit",
    budget: Tensor | None = None,
) -> Tensor:
    r"""SOFT's sorted top-k indicators on rows (B, n): a (B, k, n) soft assignment.

    .. math::

        \Gamma^\epsilon = \arg\min_{\Gamma \in U(\mu, \nu)} \langle C, \Gamma\rangle
            + \epsilon \sum_{ij}\Gamma_{ij}\log\Gamma_{ij},\qquad
        Y_{j,:} = n\,\Gamma^\epsilon_{:,j}\ (j < k),

    with anchors a = (k, k-1, ..., 1, 0), mu = 1/n, nu = (1/n, ..., 1/n, (n-k)/n) and the
    cost C_ij = (x_i - a_j)^2 / max C (the reference's ``TopK_custom1``). Row j of Y is a
    soft one-hot of the (j+1)-th largest entry and sums to 1. Log-domain Sinkhorn runs
    until the row marginals are within ``tol`` or ``max_iter`` iterations (a UserWarning
    says when it stopped before ``tol``). ``backward="implicit"`` differentiates the
    optimality conditions in closed form (Xie et al. 2020, O(n k^2 + k^3), needs a
    converged plan); ``backward="unrolled"`` differentiates through the iterations
    (O(iterations n k) memory), for comparison. The anchors are at integer spacing: the
    scores should be on that scale (the reference does not rescale them). ``budget``
    (B,), integers in [0, k], solves row b for its own budget k_b (rows j >= k_b of its
    output are zero; see :func:`sorted_soft_problem`).
    """
    kb = x.new_full((x.shape[0],), float(k)) if budget is None else budget
    if backward == "implicit":
        refuse_forward_mode("topk_indicators")
        return _SortedSoft.apply(x, kb.detach(), k, epsilon, max_iter, tol)[0]
    prob = sorted_soft_problem(x, k, kb)
    plan = _sorted_plan(prob, k, epsilon, max_iter, tol)
    return (prob.count.view(-1, 1, 1) * plan[..., :k]).transpose(-1, -2)

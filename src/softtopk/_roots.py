"""A safeguarded Newton iteration for one monotone scalar equation per row, in tensor ops.

The tensor-op reference routes (the threshold family and the magnitude operator) find
their thresholds with it; the compiled kernels run the same iteration row by row.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import has_values, may_sync

#: Iteration cap. The bracket at least halves on every step that is not an accepted
#: Newton step; eager calls add log2(bracket width / step tolerance) steps, so that a
#: row spanning many orders of magnitude of t still reaches rounding level.
MAX_ITER = 100
#: Fixed number of iterations under torch.func transforms and torch.compile, where the
#: loop cannot stop early: enough for float32 from any bracket, and for float64 once
#: Newton converges.
TRACED_ITER = 40

#: evaluate(tau) -> (f(tau), -f'(tau)), both (B,).
Evaluator = Callable[[Tensor], tuple[Tensor, Tensor]]


def newton(
    evaluate: Evaluator,
    k: Tensor,
    lo: Tensor,
    hi: Tensor,
    tau: Tensor,
    done: Tensor,
    *,
    t: float | Tensor,
    m: int,
    value_dtype: torch.dtype,
    max_iter: int | None = None,
) -> tuple[Tensor, int]:
    """Safeguarded Newton iteration for f(tau) = 0 on each row, tau in float64.

    Args:
        evaluate: returns f(tau) and d = -f'(tau) >= 0, both float64.
        k: budgets (B,); they scale the tolerance on f.
        lo: (B,) lower end of the bracket, f(lo) >= 0.
        hi: (B,) upper end of the bracket, f(hi) <= 0.
        tau: (B,) starting point in [lo, hi].
        done: (B,) rows to leave alone (set by a rule).
        t: the scale of tau (a temperature, or a tensor (B,) of per-row scales).
        m: row length (scales the rounding error of the sums).
        value_dtype: dtype of the values, whose rounding limits how small f can get.
        max_iter: cap (default MAX_ITER, or TRACED_ITER when tracing).

    Returns:
        tau (B,) and the number of iterations run (a 0-dim tensor).
    """
    tracing = not has_values(k)  # traced, or meta / fake tensors: no host reads
    if max_iter is None:
        max_iter = TRACED_ITER if tracing else MAX_ITER
    f64 = torch.float64
    k, lo, hi, tau = k.to(f64), lo.to(f64), hi.to(f64), tau.to(f64)
    eps = torch.finfo(f64).eps
    # The values' rounding makes f noisy at about eps_v * (active entries), so Newton
    # steps shrink to about eps_v * t and no further: below that y no longer changes.
    step_tol = 8.0 * torch.finfo(value_dtype).eps * t

    def step(it: Tensor, lo: Tensor, hi: Tensor, tau: Tensor, done: Tensor, dx: Tensor, dx_old: Tensor):
        f, d = evaluate(tau)
        positive = f > 0  # tau is too small
        lo = torch.where(positive, tau, lo)
        hi = torch.where(positive, hi, tau)
        delta = f / d  # inf or NaN where d = 0: every comparison below is then False
        candidate = tau + delta
        # Newton inside the bracket and at least halving the step before last (as in
        # Numerical Recipes' rtsafe); otherwise bisection, which cannot cycle.
        accept = (candidate > lo) & (candidate < hi) & (2.0 * delta.abs() < dx_old.abs())
        small = delta.abs() <= (2.0 * eps * tau.abs()).clamp(min=step_tol)
        converged = (f == 0) | (hi - lo <= 2.0 * eps * (lo.abs() + hi.abs())) | small
        new_tau = torch.where(accept, candidate, torch.where(converged | done, tau, 0.5 * (lo + hi)))
        new_tau = torch.where(done, tau, new_tau)
        return it + 1, lo, hi, new_tau, done | converged, new_tau - tau, dx.clone()

    width = hi - lo
    if not tracing and max_iter == MAX_ITER and may_sync(width):
        # Bisection halves the bracket: a row whose bracket spans many orders of magnitude
        # of t (one huge entry) needs log2(width / step_tol) steps before Newton takes over.
        widest = float(torch.where(done, 0.0, width).amax()) if width.numel() else 0.0
        if math.isfinite(widest) and widest > 0:
            floor = float(step_tol.min()) if isinstance(step_tol, Tensor) else float(step_tol)
            if floor > 0:
                max_iter += max(0, math.ceil(math.log2(widest) - math.log2(floor)))
    state = (torch.zeros((), dtype=torch.long, device=tau.device), lo, hi, tau, done, width, width.clone())
    for _ in range(max_iter):
        state = step(*state)
        if not tracing and bool(state[4].all()):
            break
    return state[3], state[0]

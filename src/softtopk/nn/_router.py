"""Mixture-of-experts routing with a soft top-k (V-MoE; Sander et al. 2023) and the routers in use.

A router scores E experts per token; the gates are the router probabilities times a
top-k mask over the experts, so that only the experts with a non-zero gate run. With
the hard mask this is V-MoE's router (Riquelme et al. 2021); with the sparse soft
top-k of Sander et al. 2023 the gates are differentiable in the logits and still
exactly zero away from the top few experts, so the compute follows the sparsity.

Each routing scheme of current models is one option of :func:`topk_route` /
:class:`TopKRouter`, with any mask of the registry as the selection: softmax or
sigmoid scores with renormalisation over the chosen experts (Mixtral, Qwen,
DeepSeek-V3), the auxiliary-loss-free bias of DeepSeek-V3, group-limited routing,
ReLU routing (ReMoE), expert choice (Zhou et al. 2022) and the balanced assignment
(every expert the same load), and an exact top-k at inference.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import _backend, _buffers
from .._checks import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_positive,
    check_tensor,
    compute_dtype,
    in_dual_level,
    may_sync,
)
from .._rows import rowwise
from ..registry import OPERATORS, Operator, resolve
from ..threshold import LAPLACE, LOGISTIC, Link, ThresholdMask, sparse_link, threshold_mask
from ..threshold._function import _LIMIT, _T_SPAN

#: Routing schemes of :func:`topk_route`.
ROUTINGS = ("token", "expert", "balanced", "relu")
#: Schemes that couple the tokens of a batch (refused when the layer is causal).
NON_CAUSAL = ("expert", "balanced")
#: The registry masks the balanced assignment can solve with (their threshold link).
BALANCED_LINKS: dict[str, Link] = {
    "sparse": sparse_link(2.0),
    "sparse-p4/3": sparse_link(4.0 / 3.0),
    "entropic": LOGISTIC,
    "lapsum": LAPLACE,
}


class RouterOutput(NamedTuple):
    """What :func:`topk_route` returns.

    Attributes:
        gates: (..., E) combine weights; an expert with gate 0 is not run for the token.
        probs: (..., E) router scores: softmax of the logits, sigmoid of the logits, or
            relu of the logits for ReLU routing.
        mask: (..., E) the selection over experts (soft or hard), before capacity.
        active: (...) number of experts with a non-zero gate per token (int64).
        aux_loss: load-balancing loss E * sum_e f_e P_e (0-dim; 1 when balanced).
        z_loss: router z-loss, mean over tokens of logsumexp(logits)^2 (0-dim).
        dropped: number of (token, expert) assignments removed by the capacity (0-dim int64).
        load: (E,) number of tokens with a non-zero gate for each expert (float, no gradient).
        l1_loss: ReLU routing's penalty l1_coef * mean_t sum_e g_te (0-dim; 0 otherwise).
    """

    gates: Tensor
    probs: Tensor
    mask: Tensor
    active: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    dropped: Tensor
    load: Tensor
    l1_loss: Tensor


class _RouterStats(torch.autograd.Function):
    r"""z-loss, load-balancing loss, load and active of a router, by one numba pass (eager CPU).

    .. math::

        z = \tfrac1T \sum_t \big(\log\textstyle\sum_e e^{l_{te}}\big)^2,\qquad
        \text{aux} = E \sum_e f_e \tfrac1T \sum_t s_{te},\qquad f_e = c_e / \textstyle\sum_{e'} c_{e'}

    with c_e the tokens whose gate for e is non-zero (no gradient). dz/dl = 2 lse
    softmax(l) / T and daux/ds = E f / T; the backward is made of differentiable tensor
    ops (the log-sum-exp recomputed), so second derivatives are exact, and forward mode
    is the same linear map.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, scores: Tensor, gates: Tensor, softmax: bool) -> tuple[Tensor, ...]:  # type: ignore[override]
        T, E = logits.shape
        cpu = _backend.kernels("nn._router_cpu")
        if softmax:  # read off the scores by the kernel
            lse = torch.empty(T, dtype=torch.float64)
        else:  # exp is vectorised in torch, not in numba
            lse = torch.logsumexp(logits.detach(), -1).to(torch.float64)
        active = torch.empty(T, dtype=torch.int64)
        score_sum = torch.zeros(E, dtype=torch.float64)
        counts = torch.zeros(E, dtype=torch.float64)
        args = (
            logits.detach().contiguous().numpy(),
            scores.detach().contiguous().numpy(),
            gates.detach().contiguous().numpy(),
            softmax,
            lse.numpy(),
            active.numpy(),
            score_sum.numpy(),
            counts.numpy(),
        )
        if _backend.serial(logits.numel()):
            cpu.stats_serial(*args)
        else:
            with _backend.numba_threads():
                cpu.stats(*args, _backend.chunks())
        cd = logits.dtype
        fraction = counts / counts.sum().clamp(min=1.0)
        aux = E * (fraction * score_sum).sum() / T
        z = lse.square().mean()
        load = counts.to(cd)
        ctx.mark_non_differentiable(load, active)
        ctx.set_materialize_grads(False)
        saved = (logits, lse.to(cd), fraction.to(cd))
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        return z.to(cd), aux.to(cd), load, active

    @staticmethod
    def backward(
        ctx: Any, grad_z: Tensor | None, grad_aux: Tensor | None, *unused: Any
    ) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        logits, lse, fraction = ctx.saved_tensors
        T, E = logits.shape
        grad_logits = grad_scores = None
        if grad_z is not None and ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # double backward: lse depends on the logits too
                lse = torch.logsumexp(logits, -1)
            grad_logits = (2.0 / T) * grad_z * lse.unsqueeze(-1) * torch.softmax(logits, -1)
        if grad_aux is not None and ctx.needs_input_grad[1]:
            grad_scores = ((E / T) * grad_aux * fraction).expand(T, E)
        return grad_logits, grad_scores, None, None

    @staticmethod
    def jvp(
        ctx: Any, d_logits: Tensor | None, d_scores: Tensor | None, *unused: Any
    ) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        logits, lse, fraction = ctx.saved_tensors
        T, E = logits.shape
        dz = daux = torch.zeros((), dtype=logits.dtype)
        if d_logits is not None:
            dz = (2.0 / T) * (lse * (torch.softmax(logits, -1) * d_logits).sum(-1)).sum()
        if d_scores is not None:
            daux = (E / T) * (fraction * d_scores.sum(0)).sum()
        return dz, daux, None, None


#: Softmax scores over fewer experts than this are computed in the gates' kernel.
KERNEL_SOFTMAX_BELOW = 16


class _FusedGates(torch.autograd.Function):
    r"""A token-choice router's gates, scores and mask in one CPU kernel pass (eager CPU).

    .. math::

        \pi = \operatorname{score}(\ell),\qquad u = (\ell \text{ or } \pi) + b,\qquad
        m = G\Big(\frac{u - \tau}{t}\Big),\ \sum_e m_e = k,\qquad g = \pi \odot m

    computed row by row by :func:`softtopk.nn._router_cpu.gates_forward`, with the
    backward of all three outputs in one pass (:func:`~softtopk.nn._router_cpu.gates_backward`).
    The same values as the composite (softmax, the threshold mask, a product) up to
    rounding: below 16 experts the kernel computes the softmax in float64, rounded once
    (within an ulp of ``torch.softmax``, not always equal to it); otherwise the scores
    are torch's. A backward that is differentiated again (``create_graph=True``) is the
    composite's, recomputed from the saved logits and the bias as they were at the
    forward, so second derivatives are exact.
    """

    @staticmethod
    def forward(
        ctx: Any, flat: Tensor, k: Tensor, bias: Tensor, t: float, link: Link, sigmoid: bool
    ) -> tuple[Tensor, ...]:  # type: ignore[override]
        cpu = _backend.kernels("nn._router_cpu")
        T, E = flat.shape
        xs = flat.detach().contiguous()
        ln = xs.numpy()
        # torch's softmax over rows shorter than its vectors takes a scalar path (1.2 ms
        # at (8192, 8) here, 0.2 ms in the kernel); longer rows and sigmoid scores it
        # computes faster than the kernel's float64 exponential
        given = sigmoid or E >= KERNEL_SOFTMAX_BELOW
        if given:
            scores = torch.sigmoid(xs) if sigmoid else torch.softmax(xs, -1)
            probs = scores.numpy()
        else:
            probs = _buffers.output(ln.shape, ln.dtype)
        # outputs of 512 KiB and more come from a pool of freed blocks (softtopk._buffers)
        gates, mask = _buffers.output(ln.shape, ln.dtype), _buffers.output(ln.shape, ln.dtype)
        tau = np.empty(T, dtype=np.float64)
        tt = np.full(T, t, dtype=np.float64)
        score = cpu.SIGMOID if sigmoid else cpu.SOFTMAX
        args = (ln, bias.numpy(), score, given, k.detach().contiguous().numpy(), tt, link.code, float(link.p))
        outs = (gates, probs, mask, tau)
        if _backend.serial(flat.numel()):
            cpu.gates_forward_serial(*args, *outs)
        else:
            with _backend.numba_threads():
                cpu.gates_forward(*args, *outs, _backend.chunks())
        probs_t, mask_t = torch.from_numpy(probs), torch.from_numpy(mask)
        if not flat.requires_grad:  # the scores depend on the logits alone (not on k)
            ctx.mark_non_differentiable(probs_t)
        ctx.save_for_backward(flat, k, probs_t, mask_t)
        ctx.set_materialize_grads(False)
        # the bias (no gradient) as it is now, for a backward differentiated again: an
        # in-place update of the layer's bias before that must not change it
        ctx.bias = bias.clone() if bias.numel() > 0 else bias
        ctx.tau, ctx.tt, ctx.t, ctx.link, ctx.sigmoid = tau, tt, t, link, sigmoid
        return torch.from_numpy(gates), probs_t, mask_t

    @staticmethod
    def backward(
        ctx: Any, v_gates: Tensor | None, v_probs: Tensor | None, v_mask: Tensor | None
    ) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        flat, k, probs, mask = ctx.saved_tensors
        wanted = (v_gates, v_probs, v_mask)
        if torch.is_grad_enabled():  # differentiated again: the composite's backward
            outs = _composite_gates(flat, k, ctx.bias, ctx.t, ctx.link, ctx.sigmoid)
            pairs = [(o, v) for o, v in zip(outs, wanted, strict=True) if v is not None]
            inputs = [a for a in (flat, k) if a.requires_grad]
            grads = torch.autograd.grad(
                [o for o, _ in pairs], inputs, [v for _, v in pairs], create_graph=True, allow_unused=True
            )
            found = dict(zip((id(a) for a in inputs), grads, strict=True))
            return found.get(id(flat)), found.get(id(k)), None, None, None, None
        cpu = _backend.kernels("nn._router_cpu")
        T, E = probs.shape
        dtype = probs.numpy().dtype

        def array(v: Tensor | None) -> np.ndarray:
            if v is None:
                return np.empty((0, E), dtype=dtype)
            return _buffers.contiguous(v.detach().to(probs.dtype).numpy())

        vg = array(v_gates) if v_gates is not None else np.zeros((T, E), dtype=dtype)
        grad_logits = _buffers.output((T, E), dtype)
        grad_k = np.empty(T, dtype=np.float64)
        score = cpu.SIGMOID if ctx.sigmoid else cpu.SOFTMAX
        args = (
            flat.detach().contiguous().numpy(), ctx.bias.numpy(),
            probs.numpy(), mask.numpy(), ctx.tau, ctx.tt, vg, array(v_probs), array(v_mask),
            score, ctx.link.code, float(ctx.link.p), grad_logits, grad_k,
        )  # fmt: skip
        if _backend.serial(probs.numel()):
            cpu.gates_backward_serial(*args)
        else:
            with _backend.numba_threads():
                cpu.gates_backward(*args, _backend.chunks())
        gk = torch.from_numpy(grad_k) if ctx.needs_input_grad[1] else None
        return torch.from_numpy(grad_logits), gk, None, None, None, None


def _composite_gates(
    flat: Tensor, k: Tensor, bias: Tensor, t: float, link: Link, sigmoid: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`_FusedGates` in tensor ops: (gates, probs, mask)."""
    probs = torch.sigmoid(flat) if sigmoid else torch.softmax(flat, -1)
    u = probs if sigmoid else flat
    if bias.numel() > 0:
        u = u + bias
    mask = threshold_mask(u, k, t, link)
    return probs * mask, probs, mask


def _fused_gates(
    flat: Tensor, k: object, method: object, t: float, score: str, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The gates, scores and mask of token choice by :class:`_FusedGates`, or None where it does not apply.

    It applies to eager CPU calls (the numba route) with a threshold mask of the registry
    (``"sparse"``, ``"sparse-p4/3"``, ``"entropic"``, ``"lapsum"``), outside forward-mode
    AD; ``flat`` is in the compute dtype (float32, or float64 for float64 logits).
    Float64 logits or temperatures near the float64 range, which the threshold solver
    refuses or rescales, take the composite ops, which do that.
    """
    if not (isinstance(method, str) and method in BALANCED_LINKS):
        return None
    if flat.dtype not in (torch.float32, torch.float64) or flat.numel() == 0 or not may_sync(flat):
        return None
    if in_dual_level() or _backend.route(flat) != "cpu":
        return None
    b = flat.new_empty(0) if bias is None else bias.detach().to(flat.dtype).contiguous()
    if flat.dtype == torch.float64:
        big = (0.0 if b.numel() == 0 else b.abs().amax().item()) + (
            1.0
            if score == "sigmoid"
            else torch.where(torch.isfinite(flat), flat.detach(), 0.0).abs().amax().item()
        )
        if not (big <= _LIMIT and t * _T_SPAN <= _LIMIT and math.isfinite(8.0 * big / t)):
            return None
    kvec = rowwise(flat, k, -1, k_dtype=torch.float64).k
    return _FusedGates.apply(flat, kvec, b, t, BALANCED_LINKS[method], score == "sigmoid")


def _stats_kernel(flat: Tensor) -> bool:
    """Whether :class:`_RouterStats` takes the router's bookkeeping for these (T, E) logits."""
    return (
        flat.dtype in (torch.float32, torch.float64)
        and flat.numel() > 0
        and may_sync(flat)
        and _backend.route(flat) == "cpu"
    )


def expert_capacity(tokens: int, num_experts: int, k: float, capacity_factor: float) -> int:
    """Tokens each expert may take: ceil(capacity_factor * tokens * k / num_experts), at most tokens."""
    return min(tokens, math.ceil(capacity_factor * tokens * k / num_experts))


def _capacity_keep(gates: Tensor, capacity: int, priority: str) -> Tensor:
    """(T, E) bool: the assignments each expert keeps, at most ``capacity`` per expert."""
    assigned = gates > 0
    if priority == "position":
        return assigned & (assigned.cumsum(0) <= capacity)
    # "gate": each expert keeps its ``capacity`` largest gates (V-MoE's priority routing).
    idx = torch.topk(gates.detach(), capacity, dim=0).indices
    keep = torch.zeros_like(assigned).scatter(0, idx, True)
    return assigned & keep


def group_limit(scores: Tensor, n_groups: int, topk_groups: int, group_score: str = "max") -> Tensor:
    r"""Restricts each token to its ``topk_groups`` best groups of experts (DeepSeek-V3).

    The E experts form ``n_groups`` contiguous groups of E / n_groups. A group's score is
    its best expert score (``"max"``) or the sum of its two best (``"top2"``, DeepSeek-V3's
    choice); each token keeps the ``topk_groups`` groups with the largest group scores
    (ties to the lower group index) and the scores of the other experts become -inf:

    .. math::

        s'_{te} = s_{te} \text{ if } \operatorname{group}(e) \in
        \operatorname{top}_{G'}\big(\max_{e' \in g} s_{te'}\big)_g \text{ else } -\infty

    The group choice is discrete and carries no gradient; every registry mask treats
    -inf as padding (0, no gradient), so a mask with k <= topk_groups * E / n_groups
    over s' chooses k experts inside the chosen groups.

    Args:
        scores: (T, E) selection scores.
        n_groups: number of groups, a divisor of E.
        topk_groups: groups kept per token, in [1, n_groups].
        group_score: ``"max"`` or ``"top2"``.

    Returns:
        (T, E) scores with -inf outside the chosen groups.

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import group_limit
        >>> group_limit(torch.tensor([[0.1, 0.9, 0.5, 0.6]]), 2, 1)
        tensor([[0.1000, 0.9000,   -inf,   -inf]])

    References:
        DeepSeek-AI. "DeepSeek-V3 Technical Report", 2024 (node-limited routing).
    """
    T, E = scores.shape
    size = E // n_groups
    grouped = scores.detach().reshape(T, n_groups, size)
    if group_score == "max":
        gscore = grouped.amax(-1)
    else:
        gscore = grouped.topk(min(2, size), dim=-1).values.sum(-1)
    # topk breaks ties by the lower index; a stable sort does so for sure.
    chosen = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
    keep = torch.zeros(T, n_groups, dtype=torch.bool, device=scores.device).scatter(1, chosen, True)
    keep = keep.repeat_interleave(size, dim=1)
    return scores.masked_fill(~keep, float("-inf"))


class _BalancedAssignment(torch.autograd.Function):
    """Y = G((u - a 1^T - 1 b^T)/t) with Y 1 = k and Y^T 1 = C; implicit backward in u."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, k: float, C: float, t: float, link: Link, tol: float, max_iter: int):  # type: ignore[override]
        y, g, a, b, residual, iters = _balanced_solve(u.detach(), k, C, t, link, tol, max_iter)
        ctx.save_for_backward(g)
        ctx.mark_non_differentiable(a, b)
        ctx.residual, ctx.iters = residual, iters
        return y, a, b

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_a: Tensor | None, grad_b: Tensor | None):  # type: ignore[override]
        (g,) = ctx.saved_tensors
        return _balanced_vjp(g, grad_y), None, None, None, None, None, None


def _balanced_solve(
    u: Tensor, k: float, C: float, t: float, link: Link, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, float, int]:
    """Alternates exact row and column thresholds of the link until the row sums are k to ``tol``."""
    T, E = u.shape
    f64 = torch.float64
    k_rows = torch.full((T,), float(k), dtype=f64, device=u.device)
    c_cols = torch.full((E,), float(C), dtype=f64, device=u.device)
    t_rows = torch.full((T,), float(t), dtype=f64, device=u.device)
    t_cols = torch.full((E,), float(t), dtype=f64, device=u.device)
    b = torch.zeros(E, dtype=u.dtype, device=u.device)
    residual, it = math.inf, 0
    with torch.no_grad():
        while it < max_iter:
            it += 1
            _, a = ThresholdMask.apply((u - b).contiguous(), k_rows, t_rows, link, "auto")
            a = a.to(u.dtype)
            yc, b = ThresholdMask.apply((u - a[:, None]).T.contiguous(), c_cols, t_cols, link, "auto")
            b = b.to(u.dtype)
            residual = float((yc.sum(0, dtype=f64) - k).abs().max())
            if residual <= tol:
                break
        y, g = link((u - a[:, None] - b[None, :]) / t)
    return y, g / t, a, b, residual, it


def _balanced_vjp(g: Tensor, v: Tensor) -> Tensor:
    """g * (v - alpha 1^T - 1 beta^T) with (alpha, beta) keeping the row and column sums.

    The Jacobian of the balanced assignment is symmetric, so its vector-Jacobian product
    is its Jacobian-vector product: with r = g 1, c = g^T 1, p = (g*v) 1, q = (g*v)^T 1,
    alpha = (p - g beta) / r and (diag(c) - g^T diag(1/r) g) beta = q - g^T (p / r), an
    E x E system, singular only by the shift beta + s, alpha - s (solved by pseudo-inverse).
    """
    f64 = torch.float64
    G, V = g.to(f64), v.to(f64)
    r, c = G.sum(1), G.sum(0)
    gv = G * V
    p, q = gv.sum(1), gv.sum(0)
    inv_r = torch.where(r > 0, 1.0 / torch.where(r > 0, r, 1.0), 0.0)
    M = torch.diag(c) - G.T @ (G * inv_r[:, None])
    w = q - G.T @ (p * inv_r)
    beta = torch.linalg.pinv(M, hermitian=True) @ w
    alpha = (p - G @ beta) * inv_r
    return (G * (V - alpha[:, None] - beta[None, :])).to(v.dtype)


def balanced_assignment(
    scores: Tensor,
    k: int,
    *,
    method: str = "sparse",
    temperature: float | None = None,
    tol: float = 1e-6,
    max_iter: int = 500,
    hard: bool = False,
) -> Tensor:
    r"""Soft assignment of T tokens to E experts: every token k experts, every expert C = Tk/E tokens.

    .. math::

        Y = G\Big(\frac{u - a\mathbf{1}^\top - \mathbf{1}b^\top}{t}\Big),\qquad
        Y\mathbf{1} = k,\qquad Y^\top\mathbf{1} = C = \frac{Tk}{E}

    with G the link of ``method`` (clip for ``"sparse"``, logistic for ``"entropic"``,
    Laplace CDF for ``"lapsum"``). It is the regularised transport between tokens and
    experts (the load balance BASE layers and Sinkhorn routing reach), solved by
    alternating the library's exact threshold solver along the two axes: the row
    thresholds a for fixed b (each token sums to k), then the column thresholds b for
    fixed a (each expert sums to C), until the row sums are k to ``tol`` (the column
    sums are then exact). For the logistic link this is Sinkhorn scaling of the
    two-marginal (in/out) problem; for the sparse link, block coordinate ascent on its
    dual. The gradient is implicit (exact at the solution, not unrolled).

    ``hard=True`` rounds the soft solution: assignments are taken in decreasing order
    of Y (ties by score) while the token has fewer than k and the expert fewer than
    ceil(C); a token left short then takes its best remaining experts. Every token has
    exactly k experts, and every load is at most ceil(C) unless a short token had to be
    completed (the tests find every load within one token of C).

    Args:
        scores: (T, E) selection scores (finite).
        k: experts per token, an int in [1, E].
        method: ``"sparse"``, ``"sparse-p4/3"``, ``"entropic"``, ``"lapsum"`` or ``"hard"``
            (the sparse solution, rounded).
        temperature: the link's temperature; None uses the registry default.
        tol: the accepted error of the row sums.
        max_iter: the most alternations; a warning gives the residual if not converged.
        hard: round to a 0/1 assignment (no gradient).

    Returns:
        (T, E) assignment in the dtype of the scores.

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import balanced_assignment
        >>> s = torch.tensor([[3.0, 2.0], [2.5, 0.0], [1.0, 0.5], [2.0, 1.9]])
        >>> y = balanced_assignment(s, 1, temperature=0.5)
        >>> y.round(decimals=4)
        tensor([[0.7500, 0.2500],
                [1.0000, 0.0000],
                [0.2500, 0.7500],
                [0.0000, 1.0000]])
        >>> y.sum(0)
        tensor([2., 2.])
        >>> balanced_assignment(s, 1, hard=True)
        tensor([[1., 0.],
                [1., 0.],
                [0., 1.],
                [0., 1.]])

    References:
        Lewis et al. "BASE Layers: Simplifying Training of Large, Sparse Models", ICML 2021;
        Clark et al. "Unified Scaling Laws for Routed Language Models" (Sinkhorn routing), ICML 2022;
        Cuturi. "Sinkhorn Distances", NeurIPS 2013.
    """
    scores = check_tensor(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (tokens, experts), got shape {tuple(scores.shape)}")
    T, E = scores.shape
    k = check_int(k, "k")
    if not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, {E}] (the experts) for the balanced assignment, got {k}")
    check_choice(method, "method", (*BALANCED_LINKS, "hard"))
    check_bool(hard, "hard")
    tol = check_positive(tol, "tol")
    max_iter = check_int(max_iter, "max_iter")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite for the balanced assignment")
    name = "sparse" if method == "hard" else method
    t = OPERATORS[name].temperature if temperature is None else check_positive(temperature, "temperature")
    cd = compute_dtype(scores.dtype)
    u = scores.to(cd)
    C = T * k / E
    y, _, _ = _BalancedAssignment.apply(u, float(k), C, t, BALANCED_LINKS[name], tol, max_iter)
    residual = float((y.detach().sum(1, dtype=torch.float64) - k).abs().max())
    if residual > tol:
        warnings.warn(
            f"balanced_assignment: row sums within {residual:.3g} of k after {max_iter} alternations "
            f"(tol={tol:g}); raise max_iter or the temperature",
            RuntimeWarning,
            stacklevel=2,
        )
    if hard or method == "hard":
        y = _round_balanced(y.detach(), u.detach(), k, math.ceil(C - 1e-9))
    return y.to(scores.dtype)


def _round_balanced(y: Tensor, u: Tensor, k: int, cap: int) -> Tensor:
    """Greedy rounding of a soft balanced assignment (see :func:`balanced_assignment`)."""
    T, E = y.shape
    yn, un = y.cpu().double().numpy().ravel(), u.cpu().double().numpy().ravel()
    order = np.lexsort((-un, -yn))  # by Y, then by score, decreasing
    rows, cols = np.zeros(T, np.int64), np.zeros(E, np.int64)
    out = np.zeros(T * E)
    for flat in order:
        i, j = divmod(int(flat), E)
        if rows[i] < k and cols[j] < cap:
            out[flat] = 1.0
            rows[i] += 1
            cols[j] += 1
    for i in np.nonzero(rows < k)[0]:  # short tokens take their best free experts
        for flat in i * E + np.argsort(-un[i * E : (i + 1) * E], kind="stable"):
            if rows[i] == k:
                break
            if out[flat] == 0.0:
                out[flat] = 1.0
                rows[i] += 1
    return torch.from_numpy(out.reshape(T, E)).to(device=y.device, dtype=y.dtype)


def _check_k(k: object, E: int, routing: str) -> float | Tensor:
    if isinstance(k, Tensor):
        if routing != "token":
            raise ValueError(f"k must be a number for routing={routing!r}; a per-token k tensor needs token")
        return k
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a number or a tensor, got {type(k).__name__} {k!r}")
    if not 0 <= k <= E:
        raise ValueError(f"k must be a number in [0, {E}] (the experts), got {k!r}")
    if routing == "balanced" and (k != int(k) or k < 1):
        raise ValueError(f"k must be an int in [1, {E}] for routing='balanced', got {k!r}")
    return k


def _check_groups(n_groups: object, topk_groups: object, E: int, k: object) -> tuple[int, int] | None:
    if n_groups is None and topk_groups is None:
        return None
    if n_groups is None or topk_groups is None:
        raise ValueError(
            f"n_groups and topk_groups go together, got n_groups={n_groups!r}, topk_groups={topk_groups!r}"
        )
    G = check_int(n_groups, "n_groups")
    if G < 1 or E % G != 0:
        raise ValueError(f"n_groups must be a positive divisor of the {E} experts, got {G}")
    Gk = check_int(topk_groups, "topk_groups")
    if not 1 <= Gk <= G:
        raise ValueError(f"topk_groups must be an int in [1, n_groups] = [1, {G}], got {Gk}")
    if not isinstance(k, Tensor) and k > Gk * (E // G):
        raise ValueError(
            f"k = {k!r} exceeds the {Gk * (E // G)} experts of topk_groups={Gk} groups of {E // G}"
        )
    return G, Gk


def topk_route(
    logits: Tensor,
    k: float | Tensor,
    *,
    method: str | Callable[..., Tensor] = "sparse",
    temperature: float | None = None,
    score: str = "softmax",
    renormalize: bool = False,
    routing: str = "token",
    expert_bias: Tensor | None = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "max",
    capacity_factor: float | None = None,
    priority: str = "gate",
    l1_coef: float | Tensor = 1.0,
    hard: bool = False,
    causal: bool = False,
    generator: torch.Generator | None = None,
    balance_tol: float = 1e-6,
    balance_iters: int = 500,
) -> RouterOutput:
    r"""Routes tokens to experts: router scores times a selection over the experts.

    .. math::

        \pi = \operatorname{score}(\ell),\qquad
        u = \ell \text{ (softmax) or } \pi \text{ (sigmoid)} + b,\qquad
        g = \pi \odot \operatorname{mask}_k(u),\qquad
        L_{\mathrm{aux}} = E \sum_e f_e P_e

    with mask_k a top-k mask of the registry (the hard mask gives V-MoE's router;
    ``"sparse"`` Sander et al.'s differentiable, exactly sparse router), or, for a
    magnitude operator (``"magnitude"``), g = topk_mag(pi) (V-MoE's TOP_k of the
    probabilities, smoothed). f_e is the fraction of (token, expert) assignments going to
    expert e (no gradient) and P_e the mean router probability of expert e, each token's
    scores normalised to sum 1 (Switch Transformer's load-balancing loss; 1 when balanced).

    Options (each independent of the others unless said):

    * ``score="sigmoid"``: pi = sigmoid(l) and the selection reads u = pi + b (DeepSeek-V3);
      with ``renormalize=True`` the gates are pi_e / sum of the chosen pi (Mixtral and Qwen
      with softmax: softmax, top-k, renormalise over the chosen experts).
    * ``expert_bias`` b (E,): added to u for the selection only; the gates use the unbiased
      pi and b gets no gradient (DeepSeek-V3's auxiliary-loss-free balancing; the update of
      b is :meth:`TopKRouter.update_bias`).
    * ``n_groups``, ``topk_groups``: a token first keeps its ``topk_groups`` best groups of
      E / n_groups experts (:func:`group_limit`), then k experts inside them.
    * ``routing="expert"`` (Zhou et al. 2022): each expert takes its top C =
      ceil(capacity_factor * T k / E) tokens (capacity_factor defaults to 1) by u = pi + b,
      the mask taken along the token axis; a token may get 0 or several experts. It reads every token
      of the batch, so it is not causal: ``causal=True`` raises unless ``hard=True``,
      which routes by token choice (decoding).
    * ``routing="balanced"``: the assignment of :func:`balanced_assignment` (every token k
      experts, every expert C = Tk/E tokens), not causal either.
    * ``routing="relu"`` (ReMoE): g = relu(l), no mask; ``l1_loss = l1_coef * mean_t
      sum_e g_te`` is the sparsity penalty whose coefficient :class:`TopKRouter` steers
      towards k active experts per token. ``score`` and ``method`` are not used.
    * ``hard=True``: exactly k experts per token by the hard top-k of u (the inference
      mode of :class:`TopKRouter`); for the balanced assignment its rounding; for ReLU
      routing the top-k of the logits, with gates relu(l) (at most k non-zero).

    With ``capacity_factor`` (token choice and ReLU routing), expert e keeps at most C =
    ceil(capacity_factor * T * k / E) of its T tokens: those with the largest gates
    (``priority="gate"``, V-MoE's batch priority routing) or the first ones
    (``priority="position"``, Switch/GShard); the other assignments get gate 0 and are
    counted in ``dropped``.

    On CPU (eager calls), token choice with a threshold mask (``"sparse"``,
    ``"sparse-p4/3"``, ``"entropic"``, ``"lapsum"``) and no groups computes the scores,
    the mask and the gates in one kernel pass per direction; elsewhere (and under
    torch.compile, torch.func and forward-mode AD) the same values come from the
    composite ops.

    Args:
        logits: (..., E) router logits; every position of the leading dims is a token.
        k: experts per token, a number in [0, E] (or a per-token tensor for token choice,
            see :func:`softtopk.topk_mask`).
        method: a mask or magnitude operator of :data:`softtopk.registry.OPERATORS`, or
            a callable ``fn(x, k, *, dim, temperature)`` returning a mask.
        temperature: the operator's temperature in units of u; None uses the registry default.
        score: ``"softmax"`` or ``"sigmoid"``.
        renormalize: renormalise the gates of each token to sum to 1 over its experts.
        routing: ``"token"``, ``"expert"``, ``"balanced"`` or ``"relu"``.
        expert_bias: None or an (E,) selection bias.
        n_groups: number of expert groups (group-limited routing; token choice), a divisor of E.
        topk_groups: groups a token may use, in [1, n_groups] (given with ``n_groups``).
        group_score: ``"max"`` (a group's best expert) or ``"top2"`` (sum of its two best).
        capacity_factor: None or a positive number.
        priority: ``"gate"`` or ``"position"``: which assignments the capacity keeps.
        l1_coef: ReLU routing's penalty coefficient (a number or a 0-dim tensor).
        hard: exactly k experts per token (see above).
        causal: the layer is autoregressive; refuses expert choice and balanced assignment.
        generator: the random source of a stochastic ``method`` (``"perturbed"``,
            ``"subset"``); None draws from the global generator, fresh on every call.
        balance_tol: tolerance of the balanced assignment's row sums.
        balance_iters: the most alternations of the balanced assignment.

    Returns:
        :class:`RouterOutput`, gates in the dtype of the logits.

    Example:
        >>> import torch, softtopk
        >>> logits = torch.tensor([[2.0, 1.0, -1.0, 0.5], [0.0, 0.1, 3.0, 2.95]])
        >>> out = softtopk.nn.functional.topk_route(logits, 1, temperature=0.2)
        >>> out.active
        tensor([1, 2])
        >>> out.gates
        tensor([[0.6095, 0.0000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.3040, 0.1735]])
        >>> mixtral = softtopk.nn.functional.topk_route(logits, 2, method="hard", renormalize=True)
        >>> mixtral.gates
        tensor([[0.7311, 0.2689, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.5125, 0.4875]])

    References:
        Riquelme et al. "Scaling Vision with Sparse Mixture of Experts" (V-MoE), NeurIPS 2021;
        Sander et al. "Fast, Differentiable and Sparse Top-k", ICML 2023;
        Fedus et al. "Switch Transformers", JMLR 2022 (load-balancing loss);
        Jiang et al. "Mixtral of Experts", 2024;
        DeepSeek-AI. "DeepSeek-V3 Technical Report", 2024 (sigmoid scores, bias, groups);
        Wang et al. "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", 2024;
        Wang, Chen, Zhu. "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing", ICLR 2025;
        Zhou et al. "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022.
    """
    logits = check_tensor(logits, "logits")
    routing = check_choice(routing, "routing", ROUTINGS)
    score = check_choice(score, "score", ("softmax", "sigmoid"))
    group_score = check_choice(group_score, "group_score", ("max", "top2"))
    priority = check_choice(priority, "priority", ("gate", "position"))
    check_bool(renormalize, "renormalize")
    check_bool(hard, "hard")
    check_bool(causal, "causal")
    check_generator(generator)
    E = logits.shape[-1]
    k = _check_k(k, E, routing)
    groups = _check_groups(n_groups, topk_groups, E, k)
    if routing == "balanced":
        check_choice(method, "method", (*BALANCED_LINKS, "hard"))
        op: Operator | None = None
        t = temperature
    elif routing == "relu":
        op, t = None, None
    else:
        op = resolve(method, kinds=("mask", "magnitude") if routing == "token" else ("mask",))
        t = op.temperature if temperature is None else check_positive(temperature, "temperature")
    if temperature is not None:
        check_positive(temperature, "temperature")
    if causal and routing in NON_CAUSAL and not (routing == "expert" and hard):
        raise ValueError(
            f"routing={routing!r} reads every token of the batch and is not causal; it cannot be used "
            "in a layer declared causal=True (decode with token choice: routing='token', or hard=True "
            "for expert choice)"
        )
    if groups is not None and routing in NON_CAUSAL and not (routing == "expert" and hard):
        raise ValueError(f"n_groups/topk_groups apply to token choice, not routing={routing!r}")
    if capacity_factor is not None:
        cf = check_positive(capacity_factor, "capacity_factor")
        if routing == "balanced":
            raise ValueError("capacity_factor does not apply to routing='balanced' (its capacity is T k / E)")
    if expert_bias is not None:
        expert_bias = check_tensor(expert_bias, "expert_bias")
        if expert_bias.shape != (E,):
            raise ValueError(f"expert_bias must have shape ({E},), got {tuple(expert_bias.shape)}")
    if op is not None and op.kind == "magnitude" and (expert_bias is not None or groups is not None):
        raise ValueError(f"method={method!r} is a magnitude operator; expert_bias and groups need a mask")
    cd = compute_dtype(logits.dtype)
    flat = logits.reshape(-1, E).to(cd)
    T = flat.shape[0]
    fused = None
    if routing == "token" and not hard and groups is None:
        fused = _fused_gates(flat, k, method, t, score, expert_bias)  # one kernel pass, or None
    if fused is not None:
        gates, probs, mask = fused
    else:
        if routing == "relu":
            probs = torch.relu(flat)
            u = flat
        elif score == "softmax":
            probs = torch.softmax(flat, -1)
            # Token choice selects on the logits (the same order as the probabilities within a
            # token); expert choice compares tokens, whose order is that of the probabilities.
            u = probs if routing == "expert" and not hard else flat
        else:
            probs = torch.sigmoid(flat)
            u = probs
        if expert_bias is not None:
            u = u + expert_bias.detach().to(cd)
        if groups is not None:
            u = group_limit(u, groups[0], groups[1], group_score)
        hard_op = OPERATORS["hard"]

        if hard and routing != "balanced":
            mask = hard_op(u, k, dim=-1).to(cd)
            gates = probs * mask
        elif routing == "token":
            if op.kind == "magnitude":  # type: ignore[union-attr]
                gates = op(probs, k, dim=-1, temperature=t, generator=generator)  # type: ignore[misc]
                mask = (gates != 0).to(cd)
            else:
                mask = op(u, k, dim=-1, temperature=t, generator=generator).to(cd)
                gates = probs * mask
        elif routing == "expert":
            C = expert_capacity(T, E, float(k), 1.0 if capacity_factor is None else cf)
            mask = op(u.T, C, dim=-1, temperature=t, generator=generator).T.to(cd)
            gates = probs * mask
        elif routing == "balanced":
            mask = balanced_assignment(
                u,
                int(k),
                method=method,  # type: ignore[arg-type]
                temperature=t,
                tol=balance_tol,
                max_iter=balance_iters,
                hard=hard,
            ).to(cd)
            gates = probs * mask
        else:  # relu
            gates = probs
            mask = (gates > 0).to(cd)
    if renormalize:
        total = gates.sum(-1, keepdim=True)
        gates = torch.where(total > 0, gates / torch.where(total > 0, total, 1.0), 0.0)
    if score == "softmax" and routing != "relu":
        pnorm = probs  # softmax rows sum to 1 already
    else:
        pnorm = probs / probs.sum(-1, keepdim=True).clamp(min=torch.finfo(cd).tiny)
    dropped = torch.zeros((), dtype=torch.int64, device=logits.device)
    capacity = capacity_factor is not None and routing in ("token", "relu")
    if not capacity and _stats_kernel(flat):
        softmax = pnorm is probs and score == "softmax"
        z_loss, aux_loss, load, active = _RouterStats.apply(flat, pnorm, gates.detach(), softmax)
    else:
        assigned = gates > 0
        counts = assigned.sum(0).to(cd)  # integer counts: exact in the compute dtype below 2^24
        routed, load = assigned, counts  # the assignments the capacity leaves, per expert
        if capacity:
            k_mean = float(k.float().mean()) if isinstance(k, Tensor) else float(k)
            keep = _capacity_keep(gates, expert_capacity(T, E, k_mean, cf), priority)
            dropped = (assigned & ~keep).sum()
            gates = torch.where(keep, gates, 0.0)
            routed = gates > 0
            load = routed.sum(0).to(cd)
        active = routed.sum(-1)
        fraction = counts / counts.sum().clamp(min=1.0)
        aux_loss = E * (fraction * pnorm.mean(0)).sum()
        z_loss = torch.logsumexp(flat, -1).square().mean()
    if routing == "relu":
        l1_loss = l1_coef * gates.sum(-1).mean()
    else:
        l1_loss = torch.zeros((), dtype=cd, device=logits.device)
    lead = logits.shape[:-1]
    return RouterOutput(
        gates.reshape(*lead, E).to(logits.dtype),
        probs.reshape(*lead, E).to(logits.dtype),
        mask.reshape(*lead, E).to(logits.dtype),
        active.reshape(lead),
        aux_loss,
        z_loss,
        dropped,
        load,
        l1_loss,
    )


def moe_dispatch(x: Tensor, gates: Tensor, experts: Sequence[Callable[[Tensor], Tensor]]) -> Tensor:
    r"""Runs each expert on the tokens whose gate for it is non-zero and sums the gated outputs.

    .. math::

        y_t = \sum_{e\,:\,g_{t,e} \ne 0} g_{t,e}\, f_e(x_t)

    Expert e is called once, on the rows of x with g_{t,e} != 0 (gathered), and not at
    all when there are none: the compute follows the sparsity of the gates. Gradients
    reach x, the gates and the experts' parameters.

    Args:
        x: (..., D) tokens.
        gates: (..., E) gates (e.g. :attr:`RouterOutput.gates`), the leading dims of x.
        experts: E callables mapping (N, D) to (N, D_out).

    Returns:
        (..., D_out) tensor; zeros shaped like x if no token has a non-zero gate.

    Example:
        >>> import torch, softtopk
        >>> experts = [lambda h: h * 10, lambda h: h * 100]
        >>> x = torch.ones(3, 1); gates = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> softtopk.nn.functional.moe_dispatch(x, gates, experts)
        tensor([[  5.],
                [100.],
                [  0.]])
    """
    x = check_tensor(x, "x")
    gates = check_tensor(gates, "gates")
    E = gates.shape[-1]
    if gates.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"gates must have the leading shape {tuple(x.shape[:-1])} of x, got {tuple(gates.shape)}"
        )
    if len(experts) != E:
        raise ValueError(f"gates has {E} experts but {len(experts)} experts were given")
    xs = x.reshape(-1, x.shape[-1])
    g = gates.reshape(-1, E)
    out: Tensor | None = None
    for e, expert in enumerate(experts):
        idx = g[:, e].nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        y = expert(xs.index_select(0, idx))
        contribution = y * g.index_select(0, idx)[:, e].unsqueeze(-1).to(y.dtype)
        if out is None:
            out = y.new_zeros((xs.shape[0], *y.shape[1:]))
        out = out.index_add(0, idx, contribution)
    if out is None:
        return torch.zeros_like(x)
    return out.reshape(*x.shape[:-1], *out.shape[1:])


class TopKRouter(nn.Module):
    """Mixture-of-experts router: a linear layer to E logits, then :func:`topk_route`.

    In training mode the router routes as configured; in ``eval()`` with
    ``inference="hard"`` (the default) it keeps exactly k experts per token (the hard
    top-k of the selection scores, bias and groups included; the rounded assignment for
    ``routing="balanced"``; token choice for expert choice), which fixed expert capacity
    needs. ``inference="soft"`` keeps the training routing in eval.

    Two quantities are steered outside the gradient, in ``forward`` in training mode
    after the routing of that call (so one forward per optimiser step is one update),
    or by hand with ``bias_update="manual"``:

    * with ``bias_rate`` > 0, the buffer ``expert_bias`` (E,) enters the selection scores
      and moves by ``bias += bias_rate * sign(mean(load) - load)`` (DeepSeek-V3), see
      :meth:`update_bias`;
    * with ``routing="relu"``, the buffer ``l1_coef`` multiplies ReLU routing's L1
      penalty (add ``out.l1_loss`` to the loss) and moves multiplicatively,
      ``l1_coef *= l1_rate ** sign(mean active - k)`` (ReMoE), see :meth:`update_l1`.

    Args:
        in_features: token width D.
        num_experts: E.
        k: experts per token (ReLU routing: the target of active experts per token).
        method: the selection, as in :func:`topk_route`; so are ``temperature``,
            ``score``, ``renormalize``, ``routing``, ``n_groups``, ``topk_groups``,
            ``group_score``, ``capacity_factor`` and ``priority``.
        inference: ``"hard"`` or ``"soft"``: the routing in eval mode.
        causal: the layer is autoregressive: expert choice and the balanced assignment,
            which read the whole batch, are refused (ValueError).
        bias_rate: the step of the auxiliary-loss-free bias (0 disables it; DeepSeek-V3
            uses 0.001).
        bias_update: ``"forward"`` (update in each training forward) or ``"manual"``.
        generator: the random source of a stochastic ``method`` (None: the global one).
        l1_coef: the initial L1 coefficient of ReLU routing (ReMoE: 1e-8).
        l1_rate: its multiplicative step alpha > 1 (ReMoE: 1.2).
        noise_std: standard deviation of Gaussian noise added to the logits in training
            mode (V-MoE uses 1/E); 0 disables it.
        bias: whether the linear layer has a bias.

    Example:
        >>> import torch, softtopk
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> router = softtopk.nn.TopKRouter(16, num_experts=8, k=2, bias_rate=1e-3)
        >>> out = router(torch.randn(4, 5, 16))
        >>> out.gates.shape, out.active.shape
        (torch.Size([4, 5, 8]), torch.Size([4, 5]))
        >>> router.eval()(torch.randn(4, 5, 16)).active.unique()
        tensor([2])

    References:
        See :func:`topk_route`.
    """

    expert_bias: Tensor
    l1_coef: Tensor

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: float = 2,
        *,
        method: str | Callable[..., Tensor] = "sparse",
        temperature: float | None = None,
        score: str = "softmax",
        renormalize: bool = False,
        routing: str = "token",
        n_groups: int | None = None,
        topk_groups: int | None = None,
        group_score: str = "max",
        capacity_factor: float | None = None,
        priority: str = "gate",
        inference: str = "hard",
        causal: bool = False,
        bias_rate: float = 0.0,
        bias_update: str = "forward",
        l1_coef: float = 1e-8,
        l1_rate: float = 1.2,
        noise_std: float = 0.0,
        bias: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        routing = check_choice(routing, "routing", ROUTINGS)
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 <= k <= num_experts:
            raise ValueError(f"k must be a number in [0, num_experts] = [0, {num_experts}], got {k!r}")
        _check_k(k, num_experts, routing)
        if routing == "balanced":
            check_choice(method, "method", (*BALANCED_LINKS, "hard"))
        elif routing != "relu":
            resolve(method, kinds=("mask", "magnitude") if routing == "token" else ("mask",))
        if temperature is not None:
            check_positive(temperature, "temperature")
        check_choice(score, "score", ("softmax", "sigmoid"))
        check_bool(renormalize, "renormalize")
        groups = _check_groups(n_groups, topk_groups, num_experts, k)
        if groups is not None and routing in NON_CAUSAL:
            raise ValueError(f"n_groups/topk_groups apply to token choice, not routing={routing!r}")
        check_choice(group_score, "group_score", ("max", "top2"))
        check_choice(priority, "priority", ("gate", "position"))
        if capacity_factor is not None:
            check_positive(capacity_factor, "capacity_factor")
            if routing == "balanced":
                raise ValueError("capacity_factor does not apply to routing='balanced' (capacity T k / E)")
        check_choice(inference, "inference", ("hard", "soft"))
        check_bool(causal, "causal")
        if causal and routing in NON_CAUSAL:
            raise ValueError(
                f"routing={routing!r} reads every token of the batch and is not causal; a layer declared "
                "causal=True must route by token choice (routing='token' or 'relu')"
            )
        if isinstance(bias_rate, bool) or not isinstance(bias_rate, numbers.Real) or not bias_rate >= 0:
            raise ValueError(f"bias_rate must be a non-negative number, got {bias_rate!r}")
        check_choice(bias_update, "bias_update", ("forward", "manual"))
        check_positive(l1_coef, "l1_coef")
        if check_positive(l1_rate, "l1_rate") <= 1.0:
            raise ValueError(f"l1_rate must be a number > 1, got {l1_rate!r}")
        if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or noise_std < 0:
            raise ValueError(f"noise_std must be a non-negative number, got {noise_std!r}")
        check_bool(bias, "bias")
        self.generator = check_generator(generator)
        self.proj = nn.Linear(in_features, num_experts, bias=bias)
        self.num_experts, self.k, self.method, self.temperature = num_experts, k, method, temperature
        self.score, self.renormalize, self.routing = score, renormalize, routing
        self.n_groups, self.topk_groups, self.group_score = n_groups, topk_groups, group_score
        self.capacity_factor, self.priority, self.inference = capacity_factor, priority, inference
        self.causal, self.bias_rate, self.bias_update = causal, float(bias_rate), bias_update
        self.l1_rate = float(l1_rate)
        self.noise_std = float(noise_std)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("l1_coef", torch.tensor(float(l1_coef), dtype=torch.float64))

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.proj(x)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        out = topk_route(
            logits,
            self.k,
            method=self.method,
            temperature=self.temperature,
            score=self.score,
            renormalize=self.renormalize,
            routing=self.routing,
            expert_bias=self.expert_bias if self.bias_rate > 0 else None,
            n_groups=self.n_groups,
            topk_groups=self.topk_groups,
            group_score=self.group_score,
            capacity_factor=self.capacity_factor,
            priority=self.priority,
            l1_coef=self.l1_coef.to(logits.dtype) if self.routing == "relu" else 1.0,
            hard=not self.training and self.inference == "hard",
            causal=self.causal,
            generator=self.generator,
        )
        if self.training and self.bias_update == "forward":
            if self.bias_rate > 0:
                self.update_bias(out.load)
            if self.routing == "relu":
                self.update_l1(out.active)
        return out

    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """One step of the auxiliary-loss-free bias: ``bias += bias_rate * sign(mean(load) - load)``.

        Args:
            load: (E,) tokens routed to each expert (:attr:`RouterOutput.load`), summed over
                the micro-batches of a step if there are several.
        """
        load = check_tensor(load, "load")
        if load.shape != (self.num_experts,):
            raise ValueError(f"load must have shape ({self.num_experts},), got {tuple(load.shape)}")
        load = load.detach().to(self.expert_bias.dtype)
        self.expert_bias.add_(self.bias_rate * torch.sign(load.mean() - load))

    @torch.no_grad()
    def update_l1(self, active: Tensor) -> None:
        """One step of ReLU routing's coefficient: ``l1_coef *= l1_rate ** sign(mean(active) - k)``.

        Args:
            active: (...) active experts per token (:attr:`RouterOutput.active`).
        """
        if not isinstance(active, Tensor):
            raise TypeError(f"active must be a torch.Tensor, got {type(active).__name__}")
        error = active.detach().double().mean() - float(self.k)
        self.l1_coef.mul_(self.l1_rate ** torch.sign(error).item())

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, method={self.method!r}, "
            f"temperature={self.temperature}, score={self.score!r}, renormalize={self.renormalize}, "
            f"routing={self.routing!r}, n_groups={self.n_groups}, topk_groups={self.topk_groups}, "
            f"capacity_factor={self.capacity_factor}, priority={self.priority!r}, "
            f"inference={self.inference!r}, causal={self.causal}, bias_rate={self.bias_rate}, "
            f"noise_std={self.noise_std}"
        )

"""Mixture-of-experts routing with a soft top-k (V-MoE; Sander et al. 2023).

A router scores E experts per token; the gates are the softmax probabilities times a
top-k mask over the experts, so that only the experts with a non-zero gate run. With
the hard mask this is V-MoE's router (Riquelme et al. 2021); with the sparse soft
top-k of Sander et al. 2023 the gates are differentiable in the logits and still
exactly zero away from the top few experts, so the compute follows the sparsity.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_positive, check_tensor, compute_dtype
from ..registry import resolve


class RouterOutput(NamedTuple):
    """What :func:`topk_route` returns.

    Attributes:
        gates: (..., E) combine weights; an expert with gate 0 is not run for the token.
        probs: (..., E) softmax of the router logits.
        mask: (..., E) the top-k mask over experts (soft or hard), before capacity.
        active: (...) number of experts with a non-zero gate per token (int64).
        aux_loss: load-balancing loss E * sum_e f_e P_e (0-dim; 1 when balanced).
        z_loss: router z-loss, mean over tokens of logsumexp(logits)^2 (0-dim).
        dropped: number of (token, expert) assignments removed by the capacity (0-dim int64).
    """

    gates: Tensor
    probs: Tensor
    mask: Tensor
    active: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    dropped: Tensor


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


def topk_route(
    logits: Tensor,
    k: float | Tensor,
    *,
    method: str | Callable[..., Tensor] = "sparse",
    temperature: float | None = None,
    capacity_factor: float | None = None,
    priority: str = "gate",
    normalize: bool = False,
) -> RouterOutput:
    r"""Routes tokens to experts: softmax gates times a top-k mask over the experts.

    .. math::

        \pi = \operatorname{softmax}(\ell),\qquad
        g = \pi \odot \operatorname{mask}_k(\ell),\qquad
        L_{\mathrm{aux}} = E \sum_e f_e P_e

    with mask_k a top-k mask of the registry applied to the logits (the hard mask gives
    V-MoE's router; ``"sparse"`` gives Sander et al.'s differentiable, exactly sparse
    router), or, for a magnitude operator (``"magnitude"``), g = topk_mag(pi) (V-MoE's
    TOP_k of the probabilities, smoothed). f_e is the fraction of (token, expert)
    assignments going to expert e (no gradient) and P_e the mean router probability of
    expert e (Switch Transformer's load-balancing loss; 1 when balanced).

    With ``capacity_factor``, expert e keeps at most C = ceil(capacity_factor * T * k / E)
    of its T tokens: those with the largest gates (``priority="gate"``, V-MoE's batch
    priority routing) or the first ones (``priority="position"``, Switch/GShard); the
    other assignments get gate 0 and are counted in ``dropped``.

    Args:
        logits: (..., E) router logits; every position of the leading dims is a token.
        k: experts per token, a number in [0, E] (or a per-token tensor, see
            :func:`softtopk.topk_mask`).
        method: a mask or magnitude operator of :data:`softtopk.registry.OPERATORS`, or
            a callable ``fn(x, k, *, dim, temperature)`` returning a mask.
        temperature: the operator's temperature in logit units; None uses the registry
            default.
        capacity_factor: None (no capacity) or a positive number.
        priority: ``"gate"`` or ``"position"``: which assignments the capacity keeps.
        normalize: renormalise the gates of each token to sum to 1 (as in Mixtral);
            V-MoE does not.

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

    References:
        Riquelme et al. "Scaling Vision with Sparse Mixture of Experts" (V-MoE), NeurIPS 2021;
        Sander et al. "Fast, Differentiable and Sparse Top-k", ICML 2023;
        Fedus et al. "Switch Transformers", JMLR 2022 (load-balancing loss).
    """
    logits = check_tensor(logits, "logits")
    op = resolve(method, kinds=("mask", "magnitude"))
    t = op.temperature if temperature is None else check_positive(temperature, "temperature")
    priority = check_choice(priority, "priority", ("gate", "position"))
    check_bool(normalize, "normalize")
    E = logits.shape[-1]
    cd = compute_dtype(logits.dtype)
    flat = logits.reshape(-1, E).to(cd)
    T = flat.shape[0]
    probs = torch.softmax(flat, -1)
    if op.kind == "magnitude":
        gates = op(probs, k, dim=-1, temperature=t)
        mask = (gates != 0).to(cd)
    else:
        mask = op(flat, k, dim=-1, temperature=t).to(cd)
        gates = probs * mask
    if normalize:
        total = gates.sum(-1, keepdim=True)
        gates = torch.where(total > 0, gates / torch.where(total > 0, total, 1.0), 0.0)
    assigned = gates > 0
    dropped = torch.zeros((), dtype=torch.int64, device=logits.device)
    if capacity_factor is not None:
        cf = check_positive(capacity_factor, "capacity_factor")
        k_mean = float(k.float().mean()) if isinstance(k, Tensor) else float(k)
        capacity = expert_capacity(T, E, k_mean, cf)
        keep = _capacity_keep(gates, capacity, priority)
        dropped = (assigned & ~keep).sum()
        gates = torch.where(keep, gates, 0.0)
    active = (gates > 0).sum(-1)
    counts = assigned.to(cd).sum(0)
    fraction = counts / counts.sum().clamp(min=1.0)
    aux_loss = E * (fraction * probs.mean(0)).sum()
    z_loss = torch.logsumexp(flat, -1).square().mean()
    lead = logits.shape[:-1]
    return RouterOutput(
        gates.reshape(*lead, E).to(logits.dtype),
        probs.reshape(*lead, E).to(logits.dtype),
        mask.reshape(*lead, E).to(logits.dtype),
        active.reshape(lead),
        aux_loss,
        z_loss,
        dropped,
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

    Args:
        in_features: token width D.
        num_experts: E.
        k: experts per token.
        method, temperature, capacity_factor, priority, normalize: as in :func:`topk_route`.
        noise_std: standard deviation of Gaussian noise added to the logits in training
            mode (V-MoE uses 1/E); 0 disables it.
        bias: whether the linear layer has a bias.

    Example:
        >>> import torch, softtopk
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> router = softtopk.nn.TopKRouter(16, num_experts=8, k=2)
        >>> out = router(torch.randn(4, 5, 16))
        >>> out.gates.shape, out.active.shape
        (torch.Size([4, 5, 8]), torch.Size([4, 5]))
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: float = 2,
        *,
        method: str | Callable[..., Tensor] = "sparse",
        temperature: float | None = None,
        capacity_factor: float | None = None,
        priority: str = "gate",
        normalize: bool = False,
        noise_std: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 <= k <= num_experts:
            raise ValueError(f"k must be a number in [0, num_experts] = [0, {num_experts}], got {k!r}")
        resolve(method, kinds=("mask", "magnitude"))
        check_choice(priority, "priority", ("gate", "position"))
        if capacity_factor is not None:
            check_positive(capacity_factor, "capacity_factor")
        if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or noise_std < 0:
            raise ValueError(f"noise_std must be a non-negative number, got {noise_std!r}")
        self.proj = nn.Linear(in_features, num_experts, bias=bias)
        self.num_experts, self.k, self.method, self.temperature = num_experts, k, method, temperature
        self.capacity_factor, self.priority, self.normalize = capacity_factor, priority, normalize
        self.noise_std = float(noise_std)

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.proj(x)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return topk_route(
            logits,
            self.k,
            method=self.method,
            temperature=self.temperature,
            capacity_factor=self.capacity_factor,
            priority=self.priority,
            normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, method={self.method!r}, "
            f"temperature={self.temperature}, capacity_factor={self.capacity_factor}, "
            f"priority={self.priority!r}, normalize={self.normalize}, noise_std={self.noise_std}"
        )

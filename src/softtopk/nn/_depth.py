"""Mixture-of-depths token routing: top-k capacity (MoD) or threshold-p (MoDification).

A block (attention + MLP) runs on a subset of the tokens of each sequence; the others
skip it through the residual. Mixture-of-depths (Raposo et al. 2024) keeps the top
``capacity * T`` tokens of each sequence by a router score, which needs the whole
sequence, so at inference the per-token decision comes from a predictor trained with an
auxiliary BCE loss against the top-k choice (the paper's "auxiliary loss" option).
MoDification (Zhang et al. 2024) keeps token i iff its score is at least p, a rule that
is per-token (causal) in training and inference alike.

The block output of a kept token is multiplied by its router weight
(x_i + w_i f(x_i)), which is how the router receives a gradient when the selection is
hard. With a soft top-k of the registry (e.g. ``method="sparse"``) the selection itself
is differentiable too, and stays exactly sparse.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_dim, check_generator, check_positive, check_temperature, check_tensor
from ..ops import soft_threshold_p_mask, threshold_p_mask, topk_mask
from ..registry import resolve


class DepthRouting(NamedTuple):
    """What :func:`depth_route` returns (all (..., T) but the losses).

    Attributes:
        mask: the selection, 0/1 (hard) or in [0, 1] (soft); tokens with 0 skip the block.
        weights: sigmoid(logits) * mask, the factor of the block output.
        scores: sigmoid(logits), the router scores.
        aux_loss: BCE between sigmoid(logits) and the hard top-k choice, which trains
            the per-token decision used at inference (capacity mode; else 0).
    """

    mask: Tensor
    weights: Tensor
    scores: Tensor
    aux_loss: Tensor


def _check_fraction(value: object, name: str, closed: bool = True) -> float:
    """A number in (0, 1] (``closed``) or (0, 1): a TypeError for a non-number, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not (0.0 < v <= 1.0 if closed else 0.0 < v < 1.0):
        raise ValueError(
            f"{name} must be a number in (0, {1 if closed else '1)'}{']' if closed else ''}, got {value!r}"
        )
    return v


def depth_route(
    logits: Tensor,
    *,
    capacity: float | None = None,
    threshold: float | None = None,
    method: str | Callable[..., Tensor] = "hard",
    temperature: float | None = None,
    dim: int = -1,
    per_token: bool = False,
    generator: torch.Generator | None = None,
) -> DepthRouting:
    r"""Chooses the tokens that run a block: top-k per sequence (MoD) or score >= p (MoDification).

    With s = sigmoid(l) the router scores along the sequence dimension ``dim`` (length T):

    .. math::

        \text{capacity: } m = \operatorname{mask}(l, \lceil cT \rceil),\qquad
        \text{threshold: } m_i = \mathbb{1}[s_i \ge p],\qquad
        w = s \odot m

    * capacity mode, ``per_token=False`` (training, or non-causal use): the top
      ceil(capacity * T) tokens by l, with the mask operator ``method`` (``"hard"`` is
      MoD; ``"sparse"`` a differentiable, exactly sparse selection). ``aux_loss`` is the
      BCE between s and the hard top-k choice (the MoD paper's auxiliary loss), so that
      s >= 1/2 learns to predict the choice per token.
    * capacity mode, ``per_token=True`` (causal inference): m_i = 1[s_i >= 1/2], the
      predictor trained by ``aux_loss``; each token is decided on its own.
    * threshold mode (``threshold`` = p): m_i = 1[s_i >= p] (:func:`softtopk.threshold_p_mask`),
      causal;
      with a soft ``method`` and ``per_token=False``, :func:`softtopk.soft_threshold_p_mask`
      on the logits (budget #{s >= p}, differentiable selection).

    Args:
        logits: router logits, (..., T, ...) with T along ``dim``.
        capacity: fraction of the tokens kept per sequence, in (0, 1].
        threshold: the score threshold p in (0, 1) (exactly one of ``capacity`` and ``threshold``).
        method: a mask operator of :data:`softtopk.registry.OPERATORS` (or a callable).
        temperature: the operator's temperature in logit units; None: registry default.
        dim: the sequence dimension.
        per_token: use the per-token (causal) decision; set it at inference.
        generator: the random source of a stochastic ``method`` (None: the global one).

    Returns:
        :class:`DepthRouting`.

    Example:
        >>> import torch, softtopk
        >>> logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
        >>> softtopk.nn.functional.depth_route(logits, capacity=0.5).mask
        tensor([[1., 0., 1., 0.]])
        >>> softtopk.nn.functional.depth_route(logits, threshold=0.7).mask
        tensor([[1., 0., 0., 0.]])

    References:
        Raposo et al. "Mixture-of-Depths", arXiv 2404.02258, 2024; Zhang et al.
        "MoDification: Mixture of Depths Made Easy", arXiv 2410.14268, 2024.
    """
    logits = check_tensor(logits, "logits")
    d = check_dim(dim, logits.dim())
    if (capacity is None) == (threshold is None):
        raise ValueError(
            f"give exactly one of capacity and threshold, got capacity={capacity!r}, threshold={threshold!r}"
        )
    check_bool(per_token, "per_token")
    op = resolve(method)
    t = op.temperature if temperature is None else check_positive(temperature, "temperature")
    scores = torch.sigmoid(logits)
    aux = logits.new_zeros((), dtype=torch.float32)
    if capacity is not None:
        c = _check_fraction(capacity, "capacity")
        if per_token:
            mask = threshold_p_mask(scores, 0.5)
        else:
            k = math.ceil(c * logits.shape[d])
            target = topk_mask(logits.detach(), k, dim=d, method="hard")
            mask = op(logits, k, dim=d, temperature=t, generator=check_generator(generator))
            aux = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    else:
        pf = _check_fraction(threshold, "threshold", closed=False)
        if per_token or op.name == "hard":
            mask = threshold_p_mask(scores, pf)
        else:
            # Select on the logits (temperature in logit units): s >= p iff l >= logit(p).
            mask = soft_threshold_p_mask(logits, math.log(pf / (1.0 - pf)), d, method=method, temperature=t)
    mask = mask.to(logits.dtype)
    return DepthRouting(mask, scores * mask, scores, aux)


def depth_dispatch(x: Tensor, routing: DepthRouting, block: Callable[[Tensor], Tensor]) -> Tensor:
    r"""Runs ``block`` on the selected tokens only: x_i + w_i f(x_i) if kept, x_i otherwise.

    The kept tokens of each sequence are gathered in their original order into a
    (B, C, D) tensor, C the largest count in the batch; shorter sequences are padded at
    the end with copies of skipped tokens whose outputs are discarded. Padding at the
    end is invisible to a causal block (attention with a causal mask), so a causal
    block sees exactly the kept tokens in order.

    Args:
        x: (B, T, D) tokens.
        routing: the :class:`DepthRouting` of x (mask and weights of shape (B, T)).
        block: maps (B, C, D) to (B, C, D); not called when no token is kept.

    Returns:
        (B, T, D) tensor.

    Example:
        >>> import torch, softtopk
        >>> x = torch.ones(1, 4, 2)
        >>> routing = softtopk.nn.functional.depth_route(torch.tensor([[2.0, -1.0, 0.5, -3.0]]), capacity=0.5)
        >>> softtopk.nn.functional.depth_dispatch(x, routing, lambda h: 10 * h)[0, :, 0]
        tensor([9.8080, 1.0000, 7.2246, 1.0000])
    """
    x = check_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, T, D), got {tuple(x.shape)}")
    if routing.mask.shape != x.shape[:2] or routing.weights.shape != x.shape[:2]:
        raise ValueError(f"routing must have shape {tuple(x.shape[:2])}, got {tuple(routing.mask.shape)}")
    B, T, D = x.shape
    selected = routing.mask.detach() > 0
    counts = selected.sum(-1)
    C = int(counts.max()) if counts.numel() else 0
    if C == 0:
        return x
    # Kept tokens first, in order (a stable sort of "not kept"), then the skipped ones.
    order = (~selected).to(torch.uint8).sort(dim=-1, stable=True).indices[:, :C]
    valid = torch.arange(C, device=x.device) < counts.unsqueeze(-1)
    index = order.unsqueeze(-1).expand(B, C, D)
    out = block(x.gather(1, index))
    w = torch.where(valid, routing.weights.gather(1, order), 0.0).unsqueeze(-1).to(out.dtype)
    return x + torch.zeros_like(x).scatter_add(1, index, out * w)


class DepthRouter(nn.Module):
    """Mixture-of-depths router: a linear layer to one logit per token, then :func:`depth_route`.

    In training mode the capacity mode selects the top tokens of each sequence; in
    evaluation mode with ``causal=True`` each token decides on its own (s >= 1/2 in
    capacity mode, s >= p in threshold mode), so decoding one token at a time works.

    Args:
        d_model: token width D.
        capacity, threshold, method, temperature: as in :func:`depth_route`.
        causal: per-token decision at inference (evaluation mode).
        generator: the random source of a stochastic ``method`` (None: the global one).

    Example:
        >>> import torch, softtopk
        >>> router = softtopk.nn.DepthRouter(8, capacity=0.25)
        >>> x = torch.randn(2, 16, 8)
        >>> int(router(x).mask.sum())
        8
        >>> y = softtopk.nn.functional.depth_dispatch(x, router(x), torch.nn.Linear(8, 8))
        >>> y.shape
        torch.Size([2, 16, 8])
    """

    def __init__(
        self,
        d_model: int,
        *,
        capacity: float | None = None,
        threshold: float | None = None,
        method: str | Callable[..., Tensor] = "hard",
        temperature: float | None = None,
        causal: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, numbers.Integral) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if (capacity is None) == (threshold is None):
            raise ValueError(
                "give exactly one of capacity and threshold, "
                f"got capacity={capacity!r}, threshold={threshold!r}"
            )
        if capacity is not None:
            _check_fraction(capacity, "capacity")
        if threshold is not None:
            _check_fraction(threshold, "threshold", closed=False)
        resolve(method)
        check_temperature(temperature)
        check_bool(causal, "causal")
        self.generator = check_generator(generator)
        self.proj = nn.Linear(d_model, 1)
        self.capacity, self.threshold, self.method, self.temperature, self.causal = (
            capacity,
            threshold,
            method,
            temperature,
            causal,
        )

    def forward(self, x: Tensor) -> DepthRouting:
        logits = self.proj(x).squeeze(-1)
        return depth_route(
            logits,
            capacity=self.capacity,
            threshold=self.threshold,
            method=self.method,
            temperature=self.temperature,
            dim=-1,
            per_token=self.causal and not self.training,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, threshold={self.threshold}, method={self.method!r}, "
            f"temperature={self.temperature}, causal={self.causal}"
        )

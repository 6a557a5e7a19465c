"""Relaxed top-k beam step: keep ``beam`` of M candidates with a differentiable selection.

Beam search keeps the top ``beam`` of the M = beam * V expansions at each step, a
top-k whose gradient is zero. A relaxed step returns a (beam, M) selection matrix W
whose rows mix the candidates; the new beams are W @ (candidate states) and W @
(candidate scores), so the loss at the end of the search reaches the scores of the
candidates that were discarded.

Methods (``BEAM_METHODS``; a new one is one entry):

* ``"hard"``: one-hot rows of the top ``beam`` (plain beam search).
* ``"one-soft"``: BT-Cell's relaxation (Ray Chowdhury and Caragea 2023): the top
  beam - 1 candidates kept hard (permutation without gradient), and the last slot a
  softmax(score / t) mixture of all the remaining candidates.
* ``"soft"``: SOFT's sorted top-k indicators (Xie et al. 2020), every slot soft: row j is
  a soft one-hot of the (j+1)-th best candidate, from entropic optimal transport
  (:func:`softtopk.topk_indicators`, ``temperature`` = SOFT's epsilon, the scores are
  not rescaled).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_positive, check_tensor
from ..ops import topk_indicators


def _hard_weights(scores: Tensor, beam: int, temperature: float) -> Tensor:
    idx = torch.topk(scores.detach(), beam, dim=-1).indices
    return F.one_hot(idx, scores.shape[-1]).to(scores.dtype)


def _one_soft_weights(scores: Tensor, beam: int, temperature: float) -> Tensor:
    M = scores.shape[-1]
    order = scores.detach().argsort(dim=-1, descending=True, stable=True)
    hard = F.one_hot(order[:, : beam - 1], M).to(scores.dtype)
    rest = order[:, beam - 1 :]
    rest_scores = scores.gather(-1, rest) / temperature
    # A row whose remaining candidates are all -inf keeps the beam-th one, hard.
    dead = ~(rest_scores.detach().amax(-1, keepdim=True) > -math.inf)
    rest_scores = torch.where(dead, torch.zeros_like(rest_scores), rest_scores)
    soft = torch.softmax(rest_scores, -1)
    first = torch.zeros_like(soft)
    first[:, 0] = 1.0
    soft = torch.where(dead, first, soft)
    last = torch.zeros_like(scores).scatter(-1, rest, soft)
    return torch.cat([hard, last.unsqueeze(1)], 1)


def _sorted_soft_weights(scores: Tensor, beam: int, temperature: float) -> Tensor:
    weights = topk_indicators(scores, beam, method="soft", temperature=temperature)
    # A slot beyond the row's valid candidates is an all-zero row of SOFT's plan; it keeps
    # the hard beam-th candidate (score -inf), as the other methods do.
    valid = (scores.detach() > -math.inf).sum(-1, keepdim=True)
    dead = torch.arange(beam, device=scores.device) >= valid
    return torch.where(dead.unsqueeze(-1), _hard_weights(scores, beam, temperature), weights)


#: name -> fn(scores (R, M), beam, temperature) -> (R, beam, M) selection weights.
BEAM_METHODS: dict[str, Callable[[Tensor, int, float], Tensor]] = {
    "hard": _hard_weights,
    "one-soft": _one_soft_weights,
    "soft": _sorted_soft_weights,
}


class BeamSelection(NamedTuple):
    """A relaxed beam step's selection of ``beam`` among M candidates.

    Attributes:
        weights: (..., beam, M) selection matrix; each row sums to 1.
        scores: (..., beam) the new beam scores, weights @ candidate scores.
        indices: (..., beam) the hard choice of each slot (its largest weight), int64:
            the backpointers for decoding.
    """

    weights: Tensor
    scores: Tensor
    indices: Tensor


def beam_select(
    scores: Tensor, beam: int, *, method: str = "one-soft", temperature: float = 1.0
) -> BeamSelection:
    r"""Selects ``beam`` of the M candidates along the last dim, with a relaxed selection matrix.

    ``"one-soft"`` (BT-Cell): with sigma the order of decreasing score (no gradient),

    .. math::

        W_{j} = e_{\sigma(j)}\ (j < B),\qquad
        W_{B} = \sum_{r \ge B} \frac{e^{s_{\sigma(r)}/t}}{\sum_{r' \ge B} e^{s_{\sigma(r')}/t}}\,
                e_{\sigma(r)},\qquad \tilde s = W s

    so the last slot is a softmax mixture of every candidate not kept hard, and the
    gradient of a loss on the beams reaches the scores of the discarded candidates.
    ``"soft"`` makes every slot soft: W is SOFT's sorted top-k indicator matrix
    (:func:`softtopk.topk_indicators`), row j a soft one-hot of the (j+1)-th best.

    Args:
        scores: (..., M) candidate scores (e.g. accumulated log-probabilities); -inf
            marks an invalid candidate.
        beam: B, in [1, M].
        method: a key of :data:`BEAM_METHODS`.
        temperature: t > 0 of the soft slot ("one-soft"), SOFT's epsilon ("soft").

    Returns:
        :class:`BeamSelection`.

    Example:
        >>> import torch, softtopk
        >>> sel = softtopk.nn.functional.beam_select(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2)
        >>> sel.indices
        tensor([1, 2])
        >>> sel.weights
        tensor([[0.0000, 1.0000, 0.0000, 0.0000],
                [0.1554, 0.0000, 0.4223, 0.4223]])

    References:
        Ray Chowdhury and Caragea. "Beam Tree Recursive Cells", ICML 2023; Xie et al.
        "Differentiable Top-k with Optimal Transport", NeurIPS 2020.
    """
    scores = check_tensor(scores, "scores")
    method = check_choice(method, "method", tuple(BEAM_METHODS))
    t = check_positive(temperature, "temperature")
    M = scores.shape[-1]
    if isinstance(beam, bool) or not isinstance(beam, numbers.Integral) or not 1 <= beam <= M:
        raise ValueError(f"beam must be an int in [1, M] = [1, {M}], got {beam!r}")
    rows = scores.reshape(-1, M)
    weights = BEAM_METHODS[method](rows, int(beam), t)
    # Mask twice: w * s with w = 0 and s = -inf is NaN, and so would be its gradient in w.
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    used = weights > 0
    picked = torch.where(used, weights * torch.where(used, rows.unsqueeze(1), zero), zero)
    new_scores = picked.sum(-1)
    indices = weights.detach().argmax(-1)
    lead = scores.shape[:-1]
    return BeamSelection(
        weights.reshape(*lead, beam, M), new_scores.reshape(*lead, beam), indices.reshape(*lead, beam)
    )


def beam_gather(states: Tensor, weights: Tensor) -> Tensor:
    r"""The new beams' states: new[..., b, :] = sum_m weights[..., b, m] states[..., m, :].

    Args:
        states: ``(..., M, *)`` candidate states (any trailing shape).
        weights: (..., beam, M) from :func:`beam_select`.

    Example:
        >>> import torch, softtopk
        >>> w = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
        >>> softtopk.nn.functional.beam_gather(torch.tensor([[1.0], [2.0], [3.0]]), w)
        tensor([[2.],
                [2.]])
    """
    states = check_tensor(states, "states")
    lead = weights.shape[:-2]
    M = weights.shape[-1]
    if states.shape[: len(lead) + 1] != (*lead, M):
        raise ValueError(
            f"states must start with the shape {(*lead, M)} of weights' batch and candidates, "
            f"got {tuple(states.shape)}"
        )
    tail = states.shape[len(lead) + 1 :]
    flat = states.reshape(*lead, M, -1)
    return (weights.to(flat.dtype) @ flat).reshape(*lead, weights.shape[-2], *tail)


class BeamStep(NamedTuple):
    """What :class:`RelaxedBeamStep` returns: new scores and states, backpointers, weights."""

    scores: Tensor
    states: Tensor | tuple[Tensor, ...]
    indices: Tensor
    weights: Tensor


class RelaxedBeamStep(nn.Module):
    """One relaxed beam step: :func:`beam_select` then :func:`beam_gather` on the states.

    Args:
        beam: B.
        method: a key of :data:`BEAM_METHODS`.
        temperature: of the soft slot.

    Example:
        >>> import torch, softtopk
        >>> step = softtopk.nn.RelaxedBeamStep(2)
        >>> out = step(torch.tensor([[1.0, 3.0, 2.0]]), torch.eye(3).unsqueeze(0))
        >>> out.states
        tensor([[[0.0000, 1.0000, 0.0000],
                 [0.2689, 0.0000, 0.7311]]])
    """

    def __init__(self, beam: int, *, method: str = "one-soft", temperature: float = 1.0) -> None:
        super().__init__()
        if isinstance(beam, bool) or not isinstance(beam, numbers.Integral) or beam < 1:
            raise ValueError(f"beam must be a positive int, got {beam!r}")
        check_choice(method, "method", tuple(BEAM_METHODS))
        check_positive(temperature, "temperature")
        self.beam, self.method, self.temperature = int(beam), method, float(temperature)

    def forward(self, scores: Tensor, states: Tensor | Sequence[Tensor]) -> BeamStep:
        sel = beam_select(scores, self.beam, method=self.method, temperature=self.temperature)
        if isinstance(states, Tensor):
            new_states: Tensor | tuple[Tensor, ...] = beam_gather(states, sel.weights)
        else:
            new_states = tuple(beam_gather(s, sel.weights) for s in states)
        return BeamStep(sel.scores, new_states, sel.indices, sel.weights)

    def extra_repr(self) -> str:
        return f"beam={self.beam}, method={self.method!r}, temperature={self.temperature}"

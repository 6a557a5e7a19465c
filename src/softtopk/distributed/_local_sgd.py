"""The local-SGD adapter: DiLoCo's outer step with a compressed pseudo-gradient."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int
from ._compressor import Compressor
from ._core import CompressedAllReduce


class OuterStep:
    r"""DiLoCo's outer step: every H inner steps, average the compressed pseudo-gradients.

    Each rank runs its inner optimizer on its own data, without communication. On every
    H-th call of :meth:`step`, with :math:`\theta` the parameters of the last outer step
    and :math:`\theta_r` this rank's parameters now:

    .. math::

        \Delta_r = \theta - \theta_r,\quad
        \bar\Delta = \operatorname{CompressedAllReduce}(\Delta_r),\quad
        \theta_r \leftarrow \theta,\ \nabla\theta \leftarrow \bar\Delta,\
        \text{outer optimizer step}

    so every rank leaves the outer step with the same parameters. The pseudo-gradients
    of all parameters (of one dtype) are flattened into one message, compressed with
    error feedback (SparseLoCo: top-k of 1-3 % with 2-bit values and ``decay`` < 1;
    DiLoCo: no compression, ``Compressor(density=1.0)``, and Nesterov SGD with lr 0.7 and
    momentum 0.9 as the outer optimizer).

    Args:
        params: the parameters (e.g. ``model.parameters()``); the outer optimizer must
            hold exactly these.
        outer_optimizer: the optimizer applied to :math:`\bar\Delta` as a gradient.
        compressor: the :class:`~softtopk.distributed.Compressor` of the pseudo-gradient.
        sync_every: H, inner steps per outer step (>= 1).
        error_feedback: keep the unsent pseudo-gradient mass.
        decay: the memory's decay in (0, 1].
        dense_fallback: all-reduce densely when that is cheaper.
        process_group: the group (None: the default group).
        record: keep the last exchange's tensors (``core.last``).

    Attributes:
        core: the :class:`CompressedAllReduce` (``core.traffic`` counts bytes per outer step).
        inner_steps: calls of :meth:`step` so far.

    Example:
        >>> import torch
        >>> from softtopk.distributed import Compressor, OuterStep
        >>> model = torch.nn.Linear(4, 2)
        >>> outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
        >>> step = OuterStep(model.parameters(), outer, Compressor(density=0.1), sync_every=10)
        >>> step.sync_every, step.inner_steps
        (10, 0)

    Reference: Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
    Language Models"; Sarfi et al. 2025, "Communication Efficient LLM Pre-training with
    SparseLoCo".
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        outer_optimizer: torch.optim.Optimizer,
        compressor: Compressor,
        *,
        sync_every: int,
        error_feedback: bool = True,
        decay: float = 1.0,
        dense_fallback: bool = True,
        process_group: Any = None,
        record: bool = False,
    ) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("params is empty")
        if not all(isinstance(p, Tensor) for p in self.params):
            raise TypeError("params must be tensors (e.g. model.parameters())")
        if not isinstance(outer_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"outer_optimizer must be a torch.optim.Optimizer, got {type(outer_optimizer).__name__}"
            )
        held = {id(p) for group in outer_optimizer.param_groups for p in group["params"]}
        if held != {id(p) for p in self.params}:
            raise ValueError("outer_optimizer must hold exactly the parameters given in params")
        self.outer_optimizer = outer_optimizer
        self.sync_every = check_int(sync_every, "sync_every")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, got {sync_every}")
        self.core = CompressedAllReduce(
            compressor,
            error_feedback=error_feedback,
            decay=decay,
            dense_fallback=dense_fallback,
            process_group=process_group,
            record=record,
        )
        self.inner_steps = 0
        self.anchor = [p.detach().clone() for p in self.params]

    def step(self) -> bool:
        """Counts one inner step; on every ``sync_every``-th, runs the outer step. Returns whether it did."""
        self.inner_steps += 1
        if self.inner_steps % self.sync_every:
            return False
        groups: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault(p.dtype, []).append(i)
        with torch.no_grad():
            for dtype, members in groups.items():
                delta = torch.cat([(self.anchor[i] - self.params[i].detach()).reshape(-1) for i in members])
                self.core.average(("outer", str(dtype)), delta).wait()
                for i, piece in zip(
                    members, delta.split([self.params[i].numel() for i in members]), strict=True
                ):
                    p = self.params[i]
                    p.copy_(self.anchor[i])
                    p.grad = piece.view_as(p).clone()
        self.core.end_step()
        self.outer_optimizer.step()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                self.anchor[i].copy_(p)
                p.grad = None
        return True

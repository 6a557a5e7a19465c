"""Top-k gradient sparsification with error feedback, as a DDP communication hook.

Each rank adds its residual (the gradient mass it has not sent yet) to the bucket's
gradient, sends only the k = ceil(ratio * n) largest entries in magnitude (values and
indices, one all-gather), keeps the rest as its new residual, and sets the bucket to
the average of every rank's sparse contribution. Nothing is lost: what is sent plus
the residual equals the accumulated gradient, and the residual is sent later (error
feedback; Seide et al. 2014, Stich et al. 2018, Karimireddy et al. 2019). Without it
(``error_feedback=False``) the unsent mass is dropped, which biases training.
"""

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import check_bool


def topk_sparsify(acc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""The k largest entries of a flat tensor in magnitude, and what is left.

    .. math::

        I = \operatorname{top}_k(|a|),\qquad \text{sent} = a_I,\qquad
        r = a - \sum_{i \in I} a_i e_i

    Args:
        acc: (n,) the accumulated gradient (gradient + residual).
        k: entries to send, in [0, n].

    Returns:
        ``(values, indices, residual)``: values (k,) = acc[indices], indices (k,) int64,
        residual (n,) = acc with those entries set to 0, so that
        residual + scatter(indices, values) == acc exactly.

    Example:
        >>> import torch
        >>> from softtopk.distributed import topk_sparsify
        >>> topk_sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), 2)
        (tensor([-3.,  2.]), tensor([1, 2]), tensor([0.1000, 0.0000, 0.0000, 0.5000]))
    """
    if acc.dim() != 1:
        raise ValueError(f"acc must be a flat tensor, got shape {tuple(acc.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= acc.numel():
        raise ValueError(f"k must be an int in [0, {acc.numel()}], got {k!r}")
    indices = torch.topk(acc.abs(), int(k), sorted=False).indices
    values = acc.index_select(0, indices)
    residual = acc.index_fill(0, indices, 0.0)
    return values, indices, residual


@dataclass
class TopKCompressionState:
    """State of :func:`topk_compression_hook`: settings, residuals and traffic counters.

    Attributes:
        process_group: the group to communicate in (None: the default group).
        ratio: fraction of each bucket sent per step, in (0, 1].
        error_feedback: keep the unsent mass and add it to the next gradient.
        warmup_steps: steps with a plain (dense) all-reduce before compression starts.
        record: keep the last call's tensors per bucket in ``last`` (for checks).
        residuals: per parameter (keyed by ``id``), the flat residual of this rank.
        steps: optimiser steps seen (calls on the last bucket).
        payload_bytes: bytes this rank put into its collectives, summed over calls.
        dense_bytes: bytes of the uncompressed buckets, summed over the same calls.
        last: with ``record``, {bucket index: {"grad", "carried", "acc", "sent", "residual",
            "result"}}: the bucket's gradient, the residual added to it, their sum, what was
            sent (dense), the new residual and the averaged bucket handed back to DDP.
    """

    process_group: Any = None
    ratio: float = 0.01
    error_feedback: bool = True
    warmup_steps: int = 0
    record: bool = False
    residuals: dict[int, Tensor] = field(default_factory=dict)
    steps: int = 0
    payload_bytes: int = 0
    dense_bytes: int = 0
    last: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (
            isinstance(self.ratio, bool)
            or not isinstance(self.ratio, numbers.Real)
            or not 0 < self.ratio <= 1
        ):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        check_bool(self.error_feedback, "error_feedback")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be a non-negative int, got {self.warmup_steps!r}")

    def bytes_per_step(self) -> tuple[float, float]:
        """(compressed payload, dense bucket bytes) per step, averaged over the steps seen."""
        steps = max(self.steps, 1)
        return self.payload_bytes / steps, self.dense_bytes / steps


def _split_residual(
    state: TopKCompressionState, params: list[Tensor], sizes: list[int], flat: Tensor
) -> None:
    for p, piece in zip(params, flat.split(sizes), strict=True):
        state.residuals[id(p)] = piece


def _gather_residual(
    state: TopKCompressionState, params: list[Tensor], sizes: list[int], like: Tensor
) -> Tensor:
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    pieces = [state.residuals.get(id(p), zero.expand(n)) for p, n in zip(params, sizes, strict=True)]
    return torch.cat(pieces)


def topk_compression_hook(
    state: TopKCompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    r"""DDP communication hook: all-gather the top-k entries of each rank's bucket, with error feedback.

    On each rank r with bucket gradient g_r and residual e_r:

    .. math::

        a_r = g_r + e_r,\quad I_r = \operatorname{top}_k |a_r|,\quad
        e_r \leftarrow a_r - a_r|_{I_r},\quad
        g \leftarrow \frac1W \sum_{r=1}^{W} a_r|_{I_r}

    The message of a rank is its k values and k indices (int32 when the bucket has
    fewer than 2^31 entries) packed in one byte tensor, so one all-gather per bucket
    carries k (value size + 4) bytes per rank instead of the n value sizes of an
    all-reduce. Works with any world size (indices of different ranks may overlap: they
    are summed) and any backend that all-gathers uint8 (gloo, nccl). Residuals are kept
    per parameter, so they survive DDP's rebuild of the buckets after the first step.

    Register with ``ddp_model.register_comm_hook(TopKCompressionState(ratio=0.01), topk_compression_hook)``.

    Args:
        state: a :class:`TopKCompressionState`.
        bucket: the gradient bucket DDP passes.

    Returns:
        A future holding the averaged, decompressed bucket.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    grad = bucket.buffer()
    is_last = bucket.is_last()
    if state.steps < state.warmup_steps:
        if is_last:
            state.steps += 1
        fut = dist.all_reduce(grad.div_(world), group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    params = list(bucket.parameters())
    sizes = [g.numel() for g in bucket.gradients()]
    if sum(sizes) != grad.numel():  # not a plain concatenation: one residual for the bucket
        params, sizes = [grad], [grad.numel()]
    carried = _gather_residual(state, params, sizes, grad) if state.error_feedback else torch.zeros_like(grad)
    acc = grad + carried
    n = acc.numel()
    k = min(n, max(1, math.ceil(state.ratio * n)))
    values, indices, residual = topk_sparsify(acc, k)
    if state.error_feedback:
        _split_residual(state, params, sizes, residual)
    if state.record:
        sent = torch.zeros_like(acc).index_put_((indices,), values)
        state.last[bucket.index()] = {
            "grad": grad.clone(),
            "carried": carried,
            "acc": acc,
            "sent": sent,
            "residual": residual,
        }
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    payload = torch.cat([values.contiguous().view(torch.uint8), indices.to(index_dtype).view(torch.uint8)])
    state.payload_bytes += payload.numel()
    state.dense_bytes += n * grad.element_size()
    if is_last:
        state.steps += 1
    gathered = [torch.empty_like(payload) for _ in range(world)]
    fut = dist.all_gather(gathered, payload, group=group, async_op=True).get_future()
    value_bytes = k * values.element_size()
    bucket_index = bucket.index()

    def decompress(f: torch.futures.Future[Any]) -> Tensor:
        f.value()  # raises if the collective failed
        chunks = torch.stack(gathered)
        all_values = chunks[:, :value_bytes].contiguous().view(grad.dtype).reshape(-1)
        all_indices = chunks[:, value_bytes:].contiguous().view(index_dtype).reshape(-1).long()
        out = torch.zeros_like(grad).index_add_(0, all_indices, all_values)
        grad.copy_(out.div_(world))
        if state.record:
            state.last[bucket_index]["result"] = grad.clone()
        return grad

    return fut.then(decompress)

"""The DDP adapter: a communication hook on :class:`CompressedAllReduce`, keyed by bucket index.

No ``from __future__ import annotations`` here: DDP checks the hook's annotations at run time.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import check_int
from ._compressor import Compressor
from ._core import CompressedAllReduce


class DDPCompressionState:
    """State of :func:`ddp_compression_hook`: the core, the bucket layouts, the step count.

    The memory is keyed by bucket index. DDP may rebuild its buckets (it does after the
    first iteration, in the order gradients became ready), so each bucket's layout (its
    parameters and their sizes) is kept too; when a bucket comes with a layout other than
    the one its index had, every stored residual is split back into per-parameter pieces
    and each bucket takes the pieces of its own parameters when it next comes: the state
    of a changed bucket is rebuilt, and no residual mass is lost. With a transform
    (``Compressor(chunk=...)``) the residuals are mapped back to the parameters through
    the inverse transform, which is exact only up to rounding.

    Args:
        compressor: the :class:`~softtopk.distributed.Compressor` (density 1 with no
            quantisation and no transform: a plain all-reduce, bit-identical to torch's
            ``allreduce_hook``).
        error_feedback: keep the unsent mass per bucket.
        decay: the memory's decay in (0, 1].
        dense_fallback: all-reduce a bucket densely when that is cheaper.
        warmup_steps: steps with a plain all-reduce before compression starts.
        process_group: the group (None: the default group).
        record: keep the last call's tensors per bucket (``core.last``) and layouts.

    Attributes:
        core: the :class:`CompressedAllReduce` doing the work (``core.traffic`` counts bytes).
        steps: iterations seen (calls on the last bucket).
        rebuilds: times a bucket came with a new layout.

    Example:
        >>> from softtopk.distributed import Compressor, DDPCompressionState, ddp_compression_hook
        >>> state = DDPCompressionState(Compressor(density=0.01))
        >>> # ddp_model.register_comm_hook(state, ddp_compression_hook)
        >>> state.steps, state.rebuilds
        (0, 0)
    """

    def __init__(
        self,
        compressor: Compressor,
        *,
        error_feedback: bool = True,
        decay: float = 1.0,
        dense_fallback: bool = True,
        warmup_steps: int = 0,
        process_group: Any = None,
        record: bool = False,
    ) -> None:
        self.core = CompressedAllReduce(
            compressor,
            error_feedback=error_feedback,
            decay=decay,
            dense_fallback=dense_fallback,
            process_group=process_group,
            record=record,
        )
        self.warmup_steps = check_int(warmup_steps, "warmup_steps")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        self.steps = 0
        self.rebuilds = 0
        self.layouts: dict[int, tuple[tuple[object, int], ...]] = {}
        self._pool: dict[object, Tensor] = {}

    def prepare(self, index: int, keys: list[object], sizes: list[int], like: Tensor) -> None:
        """Before bucket ``index`` is averaged: rebuilds its memory if its layout changed.

        ``keys`` name the pieces of the bucket (one per parameter) and ``sizes`` their lengths.
        """
        layout = tuple(zip(keys, sizes, strict=True))
        known = self.layouts.get(index)
        if known == layout:
            return
        if known is not None:
            self.rebuilds += 1
            self._split_all()
        self.layouts[index] = layout
        pieces = [self._pool.pop(pid, None) for pid, _ in layout]
        if self.core.error_feedback and any(p is not None for p in pieces):
            cdtype = pieces[next(i for i, p in enumerate(pieces) if p is not None)].dtype
            flat = torch.cat(
                [
                    p if p is not None else torch.zeros(n, dtype=cdtype, device=like.device)
                    for p, (_, n) in zip(pieces, layout, strict=True)
                ]
            )
            self.core.memory.store(index, self.core.compressor.transform(flat))

    def _split_all(self) -> None:
        """Moves every stored bucket residual into per-parameter pieces (the pool)."""
        comp, memory = self.core.compressor, self.core.memory
        for index, layout in self.layouts.items():
            residual = memory.pop(index)
            if residual is None:
                continue
            n = sum(size for _, size in layout)
            flat = comp.inverse(residual, n)
            for (pid, _), piece in zip(layout, flat.split([s for _, s in layout]), strict=True):
                self._pool[pid] = piece
        self.layouts.clear()


def ddp_compression_hook(state: DDPCompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    r"""DDP communication hook: each bucket averaged by :class:`CompressedAllReduce`.

    On rank r with bucket gradient g_r (not yet divided by the world size W, as DDP
    hands it to hooks) and residual e_r of that bucket index:

    .. math::

        a_r = g_r + e_r,\quad s_r = C(a_r),\quad e_r \leftarrow a_r - s_r,\quad
        g \leftarrow \frac1W \sum_{r=1}^{W} s_r

    Register with ``ddp_model.register_comm_hook(DDPCompressionState(Compressor(density=0.01)),
    ddp_compression_hook)``. Works with any backend that all-gathers uint8 (gloo, nccl).

    Args:
        state: a :class:`DDPCompressionState`.
        bucket: the gradient bucket DDP passes.

    Returns:
        A future holding the averaged bucket.

    Reference: Lin et al. 2018, "Deep Gradient Compression"; Karimireddy et al. 2019,
    "Error Feedback Fixes SignSGD and other Gradient Compression Schemes".
    """
    grad = bucket.buffer()
    last = bucket.is_last()
    if state.steps < state.warmup_steps:
        fut = state.core.dense_average(grad)
    else:
        keys: list[object] = [id(p) for p in bucket.parameters()]
        sizes = [g.numel() for g in bucket.gradients()]
        if sum(sizes) != grad.numel() or len(keys) != len(sizes):
            keys, sizes = [("bucket", bucket.index())], [grad.numel()]  # not a plain concatenation
        state.prepare(bucket.index(), keys, sizes, grad)
        fut = state.core.average(bucket.index(), grad)
    if last:
        state.steps += 1
        state.core.end_step()
    return fut

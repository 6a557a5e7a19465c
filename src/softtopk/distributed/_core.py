"""The memory, the communicator and the pipeline that joins them to a compressor.

Three parts, as the GRACE framework separates them (Xu et al. 2021): a compressor
(:class:`~softtopk.distributed.Compressor`: which entries, how many bits, which basis),
a memory (:class:`ErrorFeedback`: what was accumulated but not sent) and a communicator
(:class:`Communicator`: the collectives and what they cost). :class:`CompressedAllReduce`
runs them in order for one tensor and is what every adapter (DDP, FSDP2, local SGD)
calls.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import check_bool, compute_dtype
from ._compressor import Compressor


class ErrorFeedback:
    r"""Error-feedback memory: per key, the mass accumulated but not sent yet.

    .. math::

        a_t = g_t + \beta\, e_{t-1},\qquad e_t = a_t - \text{sent}_t

    with :math:`\beta` = ``decay`` (1: plain error feedback, Seide et al. 2014 and
    Karimireddy et al. 2019; below 1: the decayed accumulator that plays the part of
    momentum in DeMo and SparseLoCo). A residual whose shape, dtype or device differs
    from the next tensor of its key is dropped (counted in ``resets``) rather than added.

    Args:
        decay: :math:`\beta` in (0, 1].

    Example:
        >>> import torch
        >>> from softtopk.distributed import ErrorFeedback
        >>> memory = ErrorFeedback()
        >>> memory.store("w", torch.tensor([0.5, 0.0]))
        >>> memory.accumulate("w", torch.tensor([1.0, 2.0]))
        (tensor([1.5000, 2.0000]), tensor([0.5000, 0.0000]))
    """

    def __init__(self, decay: float = 1.0) -> None:
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
            raise TypeError(f"decay must be a number in (0, 1], got {type(decay).__name__} {decay!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.decay = float(decay)
        self.residuals: dict[Hashable, Tensor] = {}
        self.resets = 0

    def accumulate(self, key: Hashable, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(x + decay * residual, decay * residual)``; ``(x, None)`` when nothing is carried."""
        r = self.residuals.get(key)
        if r is not None and (r.shape != x.shape or r.dtype != x.dtype or r.device != x.device):
            del self.residuals[key]
            self.resets += 1
            r = None
        if r is None:
            return x, None
        carried = r if self.decay == 1.0 else r * self.decay
        return x + carried, carried

    def store(self, key: Hashable, residual: Tensor | None) -> None:
        """Keeps ``residual`` for ``key`` (None: nothing left to carry)."""
        if residual is None:
            self.residuals.pop(key, None)
        else:
            self.residuals[key] = residual

    def pop(self, key: Hashable) -> Tensor | None:
        """Removes and returns the residual of ``key``."""
        return self.residuals.pop(key, None)


class Communicator:
    r"""The collectives of one process group, and the bytes each rank puts on the wire.

    Bytes on the wire follow the ring algorithms: an all-reduce of b bytes sends
    2 (W - 1) b / W bytes per rank, an all-gather of b bytes per rank sends (W - 1) b.
    Sparse pairs are therefore cheaper than a dense all-reduce only while
    W b_sparse < 2 b_dense; :meth:`sparse_is_cheaper` decides with that rule.

    .. math::

        \text{wire}_{\text{all-reduce}}(b) = \tfrac{2 (W - 1)}{W} b,\qquad
        \text{wire}_{\text{all-gather}}(b) = (W - 1)\, b

    Args:
        process_group: the group (None: the default group).

    Example:
        >>> from softtopk.distributed import Communicator
        >>> Communicator.wire_bytes("all_reduce", 1000, 4), Communicator.wire_bytes("all_gather", 100, 4)
        (1500.0, 300.0)
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    @property
    def group(self) -> Any:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @staticmethod
    def wire_bytes(collective: str, message_bytes: int, world: int) -> float:
        """Bytes one rank sends in a ring ``"all_reduce"`` or ``"all_gather"`` of ``message_bytes``."""
        if collective == "all_reduce":
            return 2.0 * (world - 1) * message_bytes / world
        if collective == "all_gather":
            return float((world - 1) * message_bytes)
        raise ValueError(f"collective must be 'all_reduce' or 'all_gather', got {collective!r}")

    @staticmethod
    def sparse_is_cheaper(collective: str, sparse_bytes: int, dense_bytes: int, world: int) -> bool:
        """Whether a message of ``sparse_bytes`` costs less than an all-reduce of ``dense_bytes``.

        Decided as for two or more ranks, so that one process takes the path many would.
        """
        w = max(world, 2)
        return Communicator.wire_bytes(collective, sparse_bytes, w) < Communicator.wire_bytes(
            "all_reduce", dense_bytes, w
        )

    def all_reduce(self, tensor: Tensor) -> torch.futures.Future[Any]:
        """Sums ``tensor`` in place over the group (asynchronous)."""
        return dist.all_reduce(tensor, group=self.group, async_op=True).get_future()

    def all_gather(self, payload: Tensor, out: list[Tensor]) -> torch.futures.Future[Any]:
        """Every rank's ``payload`` into ``out`` (asynchronous; equal sizes on every rank)."""
        return dist.all_gather(out, payload, group=self.group, async_op=True).get_future()


@dataclass
class Traffic:
    """Bytes this rank put into its collectives, in total and per step.

    Attributes:
        steps: steps closed (see :meth:`CompressedAllReduce.end_step`).
        payload_bytes: message bytes (values or codes, indices, scales) over all steps.
        wire_bytes: bytes sent by this rank under the ring model of :class:`Communicator`.
        dense_bytes: bytes of the uncompressed tensors, in their own dtype.
        dense_wire_bytes: what a dense all-reduce of those tensors would send.
        sparse_messages: messages sent as (index, value) pairs or shared-index values.
        dense_messages: messages sent as a dense all-reduce (fallback, warm-up or density 1).
        history: per closed step, ``{"payload", "wire", "dense", "dense_wire"}`` bytes.
    """

    steps: int = 0
    payload_bytes: int = 0
    wire_bytes: float = 0.0
    dense_bytes: int = 0
    dense_wire_bytes: float = 0.0
    sparse_messages: int = 0
    dense_messages: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    _open: dict[str, float] = field(default_factory=dict, repr=False)

    def add(self, payload: int, wire: float, dense: int, dense_wire: float, sparse: bool) -> None:
        """Counts one message."""
        self.payload_bytes += payload
        self.wire_bytes += wire
        self.dense_bytes += dense
        self.dense_wire_bytes += dense_wire
        if sparse:
            self.sparse_messages += 1
        else:
            self.dense_messages += 1
        for name, value in (
            ("payload", payload),
            ("wire", wire),
            ("dense", dense),
            ("dense_wire", dense_wire),
        ):
            self._open[name] = self._open.get(name, 0) + value

    def end_step(self) -> None:
        """Closes the current step (a step with no message is not counted)."""
        if self._open:
            self.history.append(self._open)
            self._open = {}
            self.steps += 1

    def ratio(self) -> float:
        """Wire bytes over the wire bytes of a dense all-reduce of the same tensors."""
        return self.wire_bytes / self.dense_wire_bytes if self.dense_wire_bytes else float("nan")


class CompressedAllReduce:
    r"""The average of a tensor over the ranks, compressed, with error feedback per key.

    For a tensor g of n entries on rank r (key κ, compressor C, transform T):

    .. math::

        a_r = T(g_r) + \beta e_r^\kappa,\quad
        s_r = C(a_r),\quad e_r^\kappa \leftarrow a_r - s_r,\quad
        g \leftarrow T^{-1}\Bigl(\frac1W \sum_{r=1}^{W} s_r\Bigr)

    Top-k messages are (index, value) pairs exchanged by one all-gather; random-k ones
    carry values only (every rank draws the same indices), summed by an all-reduce or
    all-gathered as codes. When a dense all-reduce of a costs fewer bytes on the wire
    (:meth:`Communicator.sparse_is_cheaper`) and ``dense_fallback`` is set, a is sent
    dense instead. A compressor with density 1, no quantisation and no transform sends
    the tensor exactly as torch's ``allreduce_hook`` does (divide by W, then sum), so the
    result is bit-identical to it; the memory is not used then.

    Args:
        compressor: a :class:`~softtopk.distributed.Compressor`.
        error_feedback: keep the unsent mass and add it to the next tensor of its key.
        decay: the memory's decay :math:`\beta` in (0, 1].
        dense_fallback: send densely when that is cheaper.
        process_group: the group to average over (None: the default group).
        record: keep, per key, the last call's tensors in ``last``: ``"grad"`` (the
            input), ``"carried"``, ``"acc"``, ``"sent"``, ``"residual"`` (in the transformed
            basis) and ``"result"``; with ``sent + residual == acc`` exactly.

    Example:
        >>> from softtopk.distributed import CompressedAllReduce, Compressor
        >>> core = CompressedAllReduce(Compressor(density=0.01, bits=2))
        >>> core.memory.decay, core.traffic.steps
        (1.0, 0)
    """

    def __init__(
        self,
        compressor: Compressor,
        *,
        error_feedback: bool = True,
        decay: float = 1.0,
        dense_fallback: bool = True,
        process_group: Any = None,
        record: bool = False,
    ) -> None:
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a Compressor, got {type(compressor).__name__}")
        self.compressor = compressor
        self.error_feedback = check_bool(error_feedback, "error_feedback")
        self.dense_fallback = check_bool(dense_fallback, "dense_fallback")
        self.record = check_bool(record, "record")
        self.memory = ErrorFeedback(decay)
        self.communicator = Communicator(process_group)
        self.traffic = Traffic()
        self.last: dict[Hashable, dict[str, Tensor]] = {}
        self.counters: dict[Hashable, int] = {}
        self._seen: set[Hashable] = set()

    def end_step(self) -> None:
        """Closes the traffic counters of a step (also done when a key comes a second time)."""
        self.traffic.end_step()
        self._seen.clear()

    def dense_average(self, tensor: Tensor) -> torch.futures.Future[Tensor]:
        """The plain average (torch's ``allreduce_hook``), in place, counted as dense traffic."""
        world = self.communicator.world
        size = tensor.numel() * tensor.element_size()
        wire = Communicator.wire_bytes("all_reduce", size, world)
        self.traffic.add(size, wire, size, wire, sparse=False)
        tensor.div_(world)
        return self.communicator.all_reduce(tensor).then(lambda f: (f.value(), tensor)[1])

    def average(self, key: Hashable, tensor: Tensor) -> torch.futures.Future[Tensor]:
        """Replaces ``tensor`` (contiguous) by its compressed average over the ranks.

        Returns a future that completes with ``tensor`` once the average is written.
        """
        if key in self._seen:
            self.end_step()
        self._seen.add(key)
        if self.compressor.is_identity:
            return self.dense_average(tensor)
        world, comp = self.communicator.world, self.compressor
        flat = tensor.view(-1)
        n, dtype, cdtype = flat.numel(), flat.dtype, compute_dtype(flat.dtype)
        x = comp.transform(flat.to(cdtype))
        acc, carried = self.memory.accumulate(key, x) if self.error_feedback else (x, None)
        m, item = acc.numel(), flat.element_size()
        dense_size = n * item
        dense_wire = Communicator.wire_bytes("all_reduce", dense_size, world)
        collective = "all_reduce" if comp.method == "randk" and comp.bits is None else "all_gather"
        size = sum(comp.message_bytes(m, item))
        if self.dense_fallback and not Communicator.sparse_is_cheaper(collective, size, m * item, world):
            return self._dense(key, flat, tensor, x, acc, carried, dense_size, dense_wire)
        counter = self.counters.get(key, 0)
        self.counters[key] = counter + 1
        enc = comp.encode(acc, dtype, key=key, counter=counter)
        if self.error_feedback:
            self.memory.store(key, enc.residual)
        self.traffic.add(size, Communicator.wire_bytes(collective, size, world), dense_size, dense_wire, True)
        if self.record:
            self._record(key, flat, acc, carried, enc.sent, enc.residual)
        if collective == "all_reduce":
            values = enc.payload.div_(world)
            fut = self.communicator.all_reduce(values)

            def finish(f: torch.futures.Future[Any]) -> Tensor:
                f.value()
                out = torch.zeros(m, dtype=cdtype, device=flat.device)
                return self._write(key, tensor, out.index_copy_(0, enc.indices, values.to(cdtype)), n)

            return fut.then(finish)
        gathered = [torch.empty_like(enc.payload) for _ in range(world)]
        fut = self.communicator.all_gather(enc.payload, gathered)
        shared = enc.indices if enc.shared else None

        def decompress(f: torch.futures.Future[Any]) -> Tensor:
            f.value()  # raises if the collective failed
            out = torch.zeros(m, dtype=cdtype, device=flat.device)
            for payload in gathered:
                indices, values = comp.decode(payload, m, dtype, cdtype, shared)
                out.index_add_(0, indices, values)
            return self._write(key, tensor, out.div_(world), n)

        return fut.then(decompress)

    def _dense(
        self,
        key: Hashable,
        flat: Tensor,
        tensor: Tensor,
        x: Tensor,
        acc: Tensor,
        carried: Tensor | None,
        dense_size: int,
        dense_wire: float,
    ) -> torch.futures.Future[Tensor]:
        world = self.communicator.world
        message = acc.to(flat.dtype, copy=True)
        sent = message.to(acc.dtype, copy=True)
        residual = acc - sent  # exact: rounding to a narrower float is exact to subtract
        if self.error_feedback:
            self.memory.store(key, residual if residual.dtype != message.dtype else None)
        size = message.numel() * message.element_size()
        self.traffic.add(
            size, Communicator.wire_bytes("all_reduce", size, world), dense_size, dense_wire, False
        )
        if self.record:
            self._record(key, flat, acc, carried, sent, residual)
        message.div_(world)
        fut = self.communicator.all_reduce(message)
        n = flat.numel()
        return fut.then(lambda f: (f.value(), self._write(key, tensor, message.to(acc.dtype), n))[1])

    def _write(self, key: Hashable, tensor: Tensor, out: Tensor, n: int) -> Tensor:
        result = self.compressor.inverse(out, n)
        tensor.view(-1).copy_(result)
        if self.record:
            self.last[key]["result"] = result.clone()
        return tensor

    def _record(
        self, key: Hashable, flat: Tensor, acc: Tensor, carried: Tensor | None, sent: Tensor, residual: Tensor
    ) -> None:
        self.last[key] = {
            "grad": flat.clone(),
            "carried": carried.clone() if carried is not None else torch.zeros_like(acc),
            "acc": acc.clone(),
            "sent": sent,
            "residual": residual,
        }

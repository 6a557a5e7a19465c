"""``softtopk.topk``: the hard top-k of ``torch.topk``, by threshold selection, deterministic.

The rows go through one ``torch.library`` custom op,
``torch.ops.softtopk.topk(x, k, largest, sorted) -> (values, indices)`` on rows (B, n):
numba kernels on CPU tensors (a selection, no sort of the row), ``torch.topk`` with its
ties put in index order on other devices and with ``SOFTTOPK_BACKEND=torch`` (the
reference route and the test oracle), shapes only on meta and fake tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _backend, _buffers
from .._checks import FLOAT_DTYPES, check_bool, check_dim, check_int, has_values, in_dual_level, is_tracing

#: Bit layout per dtype: (integer view, magnitude mask, bits of +inf).
_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def lowest_index_topk(x: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """``torch.topk`` of rows (B, n), sorted, with ties broken by the lowest index.

    ``torch.topk`` picks some of the entries equal to the k-th value when they do not
    all fit; here the first ones by index are taken, and entries of equal value are
    listed by index (NaN lies above every number, as in ``torch.topk``). Sync-free: one
    ``torch.topk``, O(n) tensor ops, and two sorts of the k results. Under tracing
    (torch.compile, torch.func) it is ``torch.topk`` itself.
    """
    B, n = x.shape
    if B == 0 or k == 0 or is_tracing():
        # Under torch.compile inductor fails on the tie fix (an unbound buffer in its
        # generated code, torch 2.13): traced calls keep torch.topk's choice among ties.
        return torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    values, indices = torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    kth = values[:, -1:]
    nan, kth_nan = torch.isnan(x), torch.isnan(kth)
    if largest:
        better = (x > kth) | (nan & ~kth_nan)
    else:
        better = (x < kth) | (kth_nan & ~nan)
    tied = (x == kth) | (nan & kth_nan)
    # The entries tied with the k-th value take the output's last slots, in index order.
    first = better.sum(-1, keepdim=True)
    slot = first + tied.cumsum(-1) - 1
    slot = torch.where(tied & (slot < k), slot, k)
    pos = torch.arange(n, device=x.device).expand(B, n)
    fixed = torch.zeros(B, k + 1, dtype=indices.dtype, device=x.device).scatter(-1, slot, pos)[:, :k]
    rank = torch.arange(k, device=x.device)
    indices = torch.where(rank >= first, fixed, indices)
    # Equal values elsewhere in the list by index: sort by index, then stably by value.
    indices = indices.sort(-1).values
    values = x.gather(-1, indices)
    values, order = values.sort(dim=-1, descending=largest, stable=True)
    return values, indices.gather(-1, order)


def _reference(x: Tensor, k: int, largest: bool, sorted: bool) -> tuple[Tensor, Tensor]:
    """The rows' top-k with ties to the lowest index, NaN above every number."""
    values, indices = lowest_index_topk(x, k, largest)
    if not sorted:
        indices, order = torch.sort(indices, dim=-1)
        values = values.gather(-1, order)
    return values, indices


def topk_rows_impl(x: Tensor, k: int, largest: bool, sorted: bool) -> tuple[Tensor, Tensor]:
    """What ``torch.ops.softtopk.topk`` computes on real tensors (rows (B, n))."""
    B, n = x.shape
    if B == 0 or k == 0 or _backend.route(x) != "cpu":
        return _reference(x, k, largest, sorted)
    cpu = _backend.kernels("ops._topk_cpu")
    view, magmask, infbits = _BITS[x.dtype]
    x = x.contiguous()
    bits = x.view(view).numpy()
    floats = x.dtype in (torch.float32, torch.float64)
    values = torch.empty((B, k), dtype=x.dtype)
    indices = torch.empty((B, k), dtype=torch.int64)
    args = (
        x.numpy() if floats else bits,
        bits,
        k,
        sorted,
        floats,
        magmask,
        infbits,
        1 if largest else -1,
        values.view(view).numpy(),
        indices.numpy(),
    )
    if _backend.serial(x.numel()):
        cpu.topk_serial(*args)
    else:
        with _backend.numba_threads():
            cpu.topk(*args, _backend.chunks())
    return values, indices


def hard_mask_rows_impl(x: Tensor, K: int, k: Tensor) -> Tensor:
    """The hard mask of float32/float64 CPU rows (B, n) by the numba kernel, K = ceil(max k) >= 1.

    Row b gets clip(k_b - j, 0, 1) on its j-th largest entry (ties to the lowest index),
    0 on -inf entries and NaN throughout when it holds a NaN.
    """
    cpu = _backend.kernels("ops._topk_cpu")
    view, magmask, infbits = _BITS[x.dtype]
    x = x.contiguous()
    y = _buffers.output(tuple(x.shape), x.numpy().dtype)  # large blocks reused: see softtopk._buffers
    kv = np.ascontiguousarray(k.detach().numpy(), dtype=np.float64)
    args = (x.numpy(), x.view(view).numpy(), K, kv, magmask, infbits, y)
    if _backend.serial(x.numel()):
        cpu.mask_serial(*args)
    else:
        with _backend.numba_threads():
            cpu.mask(*args, _backend.chunks())
    return torch.from_numpy(y)


@torch.library.custom_op("softtopk::topk", mutates_args=())
def topk_rows(x: Tensor, k: int, largest: bool, sorted: bool) -> tuple[Tensor, Tensor]:
    return topk_rows_impl(x, k, largest, sorted)


@topk_rows.register_fake
def _(x: Tensor, k: int, largest: bool, sorted: bool) -> tuple[Tensor, Tensor]:
    B = x.shape[0]
    return x.new_empty((B, k)), x.new_empty((B, k), dtype=torch.int64)


@topk_rows.register_vmap
def _(info, in_dims, x, k, largest, sorted):  # noqa: ANN001
    d = in_dims[0]
    xs = x.movedim(d, 0) if d is not None else x.unsqueeze(0).expand(info.batch_size, *x.shape)
    size, B, n = xs.shape
    values, indices = topk_rows(xs.reshape(size * B, n), k, largest, sorted)
    return (values.reshape(size, B, k), indices.reshape(size, B, k)), (0, 0)


def _scatter_grad(grad_values: Tensor, indices: Tensor, n: int) -> Tensor:
    zeros = grad_values.new_zeros((indices.shape[0], n))
    if is_tracing():  # torch.func transforms have no batching rule for the in-place form
        return zeros.scatter(-1, indices, grad_values)
    return zeros.scatter_(-1, indices, grad_values)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(output[1])
    ctx.save_for_forward(output[1])
    ctx.n = inputs[0].shape[-1]


def _jvp(ctx: Any, dx: Tensor | None, *unused: Any) -> tuple[Tensor | None, None]:
    """Forward mode: the values' tangent is the input's tangent at the selected entries."""
    (indices,) = ctx.saved_tensors
    return (None if dx is None else dx.gather(-1, indices)), None


def _backward(ctx: Any, grad_values: Tensor, grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
    (indices,) = ctx.saved_tensors
    return _scatter_grad(grad_values, indices, ctx.n), None, None, None


topk_rows.register_autograd(_backward, setup_context=_setup_context)


class _EagerTopK(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch cost (eager calls)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: int, largest: bool, sorted: bool) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        values, indices = topk_rows_impl(x, k, largest, sorted)
        ctx.mark_non_differentiable(indices)
        _setup_context(ctx, (x,), (values, indices))
        return values, indices

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _backward(ctx, grad_values, grad_indices)

    jvp = staticmethod(_jvp)


class _TopK(torch.autograd.Function):
    """The custom op with its backward, in the form torch.func transforms accept."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: int, largest: bool, sorted: bool) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return torch.ops.softtopk.topk(x, k, largest, sorted)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        _setup_context(ctx, inputs, output)

    backward = staticmethod(_backward)


class _TopKWithJvp(_TopK):
    """:class:`_TopK` with forward mode (Dynamo does not trace a custom ``jvp``)."""

    jvp = staticmethod(_jvp)


def _rows_topk(x: Tensor, k: int, largest: bool, sorted: bool) -> tuple[Tensor, Tensor]:
    """Top-k of validated rows (B, n) through the op (or its eager twin)."""
    if torch.compiler.is_compiling():
        return _TopK.apply(x, k, largest, sorted)
    if is_tracing() or not has_values(x):
        return _TopKWithJvp.apply(x, k, largest, sorted)
    if (x.requires_grad and torch.is_grad_enabled()) or in_dual_level():
        return _EagerTopK.apply(x, k, largest, sorted)
    return topk_rows_impl(x, k, largest, sorted)


def topk(
    x: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
) -> torch.return_types.topk:
    r"""The k largest (or smallest) entries along ``dim`` and their indices, as ``torch.topk``.

    .. math::

        \text{indices} = (\sigma(1), \dots, \sigma(k)),\qquad
        x_{\sigma(1)} \succeq x_{\sigma(2)} \succeq \dots,\qquad
        \text{values}_j = x_{\sigma(j)}

    with the order of ``torch.topk``: -0.0 equals 0.0, NaN lies above +inf (so with
    ``largest=True`` NaN entries come first, and with ``largest=False`` they come after
    every number). Equal entries are taken by lowest index, deterministically (the one
    difference from ``torch.topk``, whose choice among equal entries is unspecified).

    On CPU tensors the rows are solved by a threshold selection without sorting them: a
    strided sample brackets the k-th value, one pass collects the entries above the
    bracket, a quickselect among those finds the k-th, and only the k kept entries are
    sorted. The values are bit-identical to the input entries. Other devices use
    ``torch.topk`` with its ties put in index order (same result).

    Args:
        x: a tensor of float16, bfloat16, float32 or float64 (0-d is treated as one entry).
        k: how many entries to return, an int in [0, x.shape[dim]].
        dim: the dimension to select along.
        largest: the k largest entries (True) or the k smallest (False).
        sorted: return them in order (largest first, or smallest first for
            ``largest=False``, ties by index); with False, in increasing index order.

    Returns:
        ``(values, indices)`` (the named tuple of ``torch.topk``): tensors shaped like x
        with ``k`` at ``dim``; values are differentiable (the gradient goes to the
        selected entries, as with ``torch.topk``).

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([1.0, 3.0, 3.0, float("nan"), 2.0])
        >>> softtopk.topk(x, 3)
        torch.return_types.topk(
        values=tensor([nan, 3., 3.]),
        indices=tensor([3, 1, 2]))
        >>> values, indices = softtopk.topk(x, 3, sorted=False)
        >>> indices
        tensor([1, 2, 3])

    References:
        The threshold search of FlashInfer's and vLLM's top-k sampling kernels and RTop-K
        (Xie et al. 2024), applied to exact selection.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"x must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    k = check_int(k, "k")
    largest = check_bool(largest, "largest")
    sorted = check_bool(sorted, "sorted")
    scalar = x.dim() == 0
    v = x.reshape(1) if scalar else x
    dim = check_dim(dim, v.dim())
    n = v.shape[dim]
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, n] = [0, {n}] along dim={dim}, got {k}")
    last = dim == v.dim() - 1
    moved = v if last else v.movedim(dim, -1)
    batch = moved.shape[:-1]
    flat = moved.dim() == 2
    rows = moved if flat else moved.reshape(math.prod(batch), n)
    values, indices = _rows_topk(rows, k, largest, sorted)
    if not flat:
        values, indices = values.reshape(*batch, k), indices.reshape(*batch, k)
    if not last:
        values, indices = values.movedim(-1, dim), indices.movedim(-1, dim)
    if scalar:
        values, indices = values.reshape(()), indices.reshape(())
    return torch.return_types.topk((values, indices))

"""Output arrays of the CPU kernels, with large blocks reused across calls.

A kernel's output (the mask, the gradient) is allocated on every call. glibc's malloc
serves blocks below its mmap threshold, at most 32 MiB, from a heap that reuses freed
memory; a larger block is a fresh mapping, and the kernel's first write to each of its
pages is a page fault in which the system zeroes the page. At (64, 131072) float32, an
output of exactly 32 MiB, that costs about 3 ms a call, as long as the whole kernel's
forward.

:func:`output` keeps such blocks once their array is gone (``weakref.finalize`` on the
array handed out: ``torch.from_numpy`` holds it while the tensor's storage lives) and
hands a freed block of the same size out again, as PyTorch's CUDA caching allocator
does on a GPU. ``SOFTTOPK_POOL_BYTES`` bounds the freed bytes kept (default 1 GiB, the
outputs of an SAE batch of (4096, 32768) float32 and its gradient; 0 keeps none), and
:func:`release` hands them back to the system.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np

#: Blocks of at least this many bytes are pooled; below, malloc's heap reuses them.
POOL_MIN_BYTES = 32 << 20
#: The default bound on the freed bytes kept (``SOFTTOPK_POOL_BYTES`` overrides it).
POOL_BYTES = 1 << 30

# reentrant: a garbage collection inside a locked section may run a finaliser (_keep)
_lock = threading.RLock()
_free: dict[int, list[np.ndarray]] = {}
_free_bytes = 0


def pool_bytes() -> int:
    """The bound on the freed bytes kept: ``SOFTTOPK_POOL_BYTES``, checked, or POOL_BYTES."""
    value = os.environ.get("SOFTTOPK_POOL_BYTES", "").strip()
    if not value:
        return POOL_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"SOFTTOPK_POOL_BYTES must be a non-negative integer (bytes); got {value!r}")
    return limit


def output(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array, from a freed block of the same size when one is kept."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < POOL_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    pool_bytes()  # a bad SOFTTOPK_POOL_BYTES raises here, not in a finaliser
    global _free_bytes
    with _lock:
        blocks = _free.get(nbytes)
        block = blocks.pop() if blocks else None
        if block is not None:
            _free_bytes -= nbytes
    if block is None:
        block = np.empty(nbytes, dtype=np.uint8)
    array = block.view(dtype).reshape(shape)
    weakref.finalize(array, _keep, block).atexit = False
    return array


def contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` itself when C-contiguous, else a C-contiguous copy in an :func:`output` array."""
    if array.flags.c_contiguous:
        return array
    copy = output(array.shape, array.dtype)
    np.copyto(copy, array)
    return copy


def _keep(block: np.ndarray) -> None:
    """Puts a block whose array is gone back in the pool, within the bound."""
    global _free_bytes
    limit = pool_bytes()
    with _lock:
        if _free_bytes + block.nbytes <= limit:
            _free.setdefault(block.nbytes, []).append(block)
            _free_bytes += block.nbytes


def release() -> int:
    """Drops every freed block kept (the system gets the memory back); returns their bytes."""
    global _free_bytes
    with _lock:
        dropped = _free_bytes
        _free.clear()
        _free_bytes = 0
    return dropped


def kept_bytes() -> int:
    """The freed bytes the pool holds now."""
    return _free_bytes

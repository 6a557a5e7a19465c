"""Output arrays of the CPU kernels, with blocks of 512 KiB and more reused across calls.

A kernel's output (the mask, the gradient) is allocated on every call, and the system
zeroes each page of fresh memory at its first write (a page fault). glibc's malloc maps
a block of more than 32 MiB afresh on every call, and gives the top of its heap back to
the system once more than twice its mmap threshold lies free there: a forward and
backward frees two outputs of the same size, so that at (32, 32768) float32 (4 MiB
each) every call took 1000 to 1500 page faults, 1.7 to 4.4 ms of system time against
2.1 ms for the kernels; at (64, 131072), 32 MiB each, about 3 ms per output.

:func:`output` keeps a block once its array is gone (a weak reference to the array handed
out: ``torch.from_numpy`` holds it while the tensor's storage lives) and hands a
kept block of the same size out again, as PyTorch's CUDA caching allocator does on a
GPU. ``SOFTTOPK_POOL_BYTES`` bounds the bytes kept (default 1 GiB, the outputs of an SAE
batch of (4096, 32768) float32 and its gradient; 0 keeps none): beyond it the sizes
used least recently are dropped first. :func:`release` hands every kept block back.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import OrderedDict, deque

import numpy as np

#: Blocks of at least this many bytes are pooled (below, a page fault storm costs less
#: than the pool's bookkeeping, about 4 µs an output).
POOL_MIN_BYTES = 1 << 19
#: The default bound on the freed bytes kept (``SOFTTOPK_POOL_BYTES`` overrides it).
POOL_BYTES = 1 << 30

# _lock guards _free and _free_bytes. A weak reference's callback may run inside a locked
# section (a garbage collection, a signal handler), so it never waits for the lock: it
# queues its block in _returned, and whoever holds the lock moves the queue into the pool.
_lock = threading.Lock()
_returned: deque[np.ndarray] = deque()
# the blocks of the arrays handed out and alive, by a weak reference to the array
_live: dict[int, tuple[weakref.ref, np.ndarray]] = {}
# kept blocks by size, the sizes used least recently first
_free: OrderedDict[int, list[np.ndarray]] = OrderedDict()
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
    """An uninitialised C-contiguous array, from a freed block of the same size when one is kept.

    The caller wraps the array itself (``torch.from_numpy(array)``, which holds it while
    the tensor's storage lives): the pool watches that array object, and a NumPy view of
    it (``array[1:]``) does not keep its block out of the pool.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < POOL_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    pool_bytes()  # a bad SOFTTOPK_POOL_BYTES raises here, not in a weak reference's callback
    global _free_bytes
    with _lock:
        _settle()
        blocks = _free.get(nbytes)
        block = blocks.pop() if blocks else None
        if block is not None:
            _free_bytes -= nbytes
            if blocks:
                _free.move_to_end(nbytes)
            else:
                del _free[nbytes]
        _settle()  # blocks returned while the lock was held
    if block is None:
        block = np.empty(nbytes, dtype=np.uint8)
    array = block.view(dtype).reshape(shape)
    ref = weakref.ref(array, _gone)
    _live[id(ref)] = (ref, block)  # kept until the array is gone (arrays are not hashable)
    return array


def contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` itself when C-contiguous, else a C-contiguous copy in an :func:`output` array."""
    if array.flags.c_contiguous:
        return array
    copy = output(array.shape, array.dtype)
    np.copyto(copy, array)
    return copy


def _gone(ref: weakref.ref) -> None:
    """The callback of an output's weak reference: its block goes back to the pool."""
    entry = _live.pop(id(ref), None)
    if entry is None:
        return
    _returned.append(entry[1])
    if _lock.acquire(blocking=False):  # else its holder settles the queue
        try:
            _settle()
        finally:
            _lock.release()


def _settle() -> None:
    """With the lock held: the returned blocks into the pool, the least recent dropped beyond the bound."""
    global _free_bytes
    if not _returned:  # (the common case: no environment read on every output)
        return
    try:
        limit = pool_bytes()
    except ValueError:  # output() raises it; the returned blocks are dropped
        limit = 0
    while _returned:
        block = _returned.popleft()
        size = block.nbytes
        if size > limit:
            continue
        _free.setdefault(size, []).append(block)
        _free.move_to_end(size)
        _free_bytes += size
        while _free_bytes > limit:
            oldest, blocks = next(iter(_free.items()))
            blocks.pop(0)
            _free_bytes -= oldest
            if not blocks:
                del _free[oldest]


def release() -> int:
    """Drops every freed block kept (the system gets the memory back); returns their bytes."""
    global _free_bytes
    with _lock:
        _settle()
        dropped = _free_bytes
        _free.clear()
        _free_bytes = 0
    return dropped


def kept_bytes() -> int:
    """The freed bytes the pool holds now."""
    with _lock:
        _settle()
        return _free_bytes

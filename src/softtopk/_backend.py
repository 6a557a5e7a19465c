"""Which implementation a custom op runs, and the numba runtime that the CPU kernels share.

``SOFTTOPK_BACKEND`` picks the route of every compiled operator:

============  ==================================================================
value         route
============  ==================================================================
``auto``      the default: numba kernels for CPU tensors, the tensor-op reference
              for every other device (CUDA included: the Triton kernels have been
              tested under the interpreter only, so on a GPU they are opt-in)
``torch``     the tensor-op reference everywhere (the test oracle)
``cpu``       the numba kernels (CPU tensors only)
``triton``    the Triton kernels; on CPU tensors they run under the Triton
              interpreter (set ``TRITON_INTERPRET=1``), which is how they are tested
============  ==================================================================

numba is imported on first use of a CPU kernel, never by ``import softtopk``. Its
parallel loops run on as many threads as torch uses (:func:`numba_threads`). Compiled
kernels are cached on disk (numba's ``cache=True``): next to the package when that is
writable, else in numba's user-wide cache directory (``NUMBA_CACHE_DIR`` overrides both).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "cpu", "triton")


def backend() -> str:
    """The value of ``SOFTTOPK_BACKEND`` (``"auto"`` when unset), checked."""
    value = os.environ.get("SOFTTOPK_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"SOFTTOPK_BACKEND must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


@functools.cache
def has_numba() -> bool:
    return importlib.util.find_spec("numba") is not None


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def route(x: Tensor) -> str:
    """The route (``"cpu"``, ``"triton"`` or ``"torch"``) for an op on ``x``'s device."""
    chosen = backend()
    device = x.device.type
    if chosen == "auto":
        if device == "cpu":
            return "cpu" if has_numba() else "torch"
        return "torch"
    if chosen == "cpu" and device != "cpu":
        raise ValueError(f"SOFTTOPK_BACKEND='cpu' runs on CPU tensors only, got a tensor on {x.device}")
    if chosen == "cpu" and not has_numba():
        raise ImportError("SOFTTOPK_BACKEND='cpu' needs numba (pip install numba)")
    if chosen == "triton" and not has_triton():
        raise ImportError("SOFTTOPK_BACKEND='triton' needs triton (pip install triton)")
    return chosen


def kernels(name: str) -> ModuleType:
    """Imports a kernel module of the package (e.g. ``"threshold._cpu"``) on first use."""
    return importlib.import_module(f"softtopk.{name}")


@contextlib.contextmanager
def numba_threads() -> Iterator[None]:
    """Runs numba's parallel loops on as many threads as torch uses, and leaves torch's count alone.

    numba would otherwise use every core whatever ``torch.set_num_threads`` said. With
    numba's OpenMP threading layer (the usual one next to torch) a parallel launch also
    resizes the OpenMP pool that torch shares, so torch's count is put back afterwards.
    """
    import numba

    torch_threads = torch.get_num_threads()
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def chunks() -> int:
    """How many runs of rows a parallel kernel splits a batch into (8 per thread)."""
    return 8 * max(1, torch.get_num_threads())


#: Batches with fewer entries than this run on the calling thread: waking worker threads
#: costs more than the work.
SERIAL_ELEMENTS = 1 << 15


def serial(numel: int) -> bool:
    """Whether a CPU kernel over ``numel`` entries runs on the calling thread."""
    return numel < SERIAL_ELEMENTS or torch.get_num_threads() == 1

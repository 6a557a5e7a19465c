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
kernels are cached on disk (numba's ``cache=True``), so that a new process loads them
instead of compiling them again: in ``NUMBA_CACHE_DIR`` when it is set, else next to the
package's sources when that folder is writable, else (a read-only site-packages) in
``$SOFTTOPK_CACHE/numba`` (default ``~/.cache/softtopk/numba``), else in a temporary
folder for the process (:func:`kernel_cache_dir`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
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
    if chosen == "auto":
        if x.is_cpu:  # (cheaper than x.device.type, which builds a device object)
            return "cpu" if has_numba() else "torch"
        return "torch"
    if chosen == "cpu" and not x.is_cpu:
        raise ValueError(f"SOFTTOPK_BACKEND='cpu' runs on CPU tensors only, got a tensor on {x.device}")
    if chosen == "cpu" and not has_numba():
        raise ImportError("SOFTTOPK_BACKEND='cpu' needs numba (pip install numba)")
    if chosen == "triton" and not has_triton():
        raise ImportError("SOFTTOPK_BACKEND='triton' needs triton (pip install triton)")
    return chosen


def kernels(name: str) -> ModuleType:
    """Imports a kernel module of the package (e.g. ``"threshold._cpu"``) on first use.

    numba picks the cache folder of a ``cache=True`` function when the function is
    decorated, that is while its module is imported: the import runs with numba's cache
    folder set to :func:`kernel_cache_dir` (and put back afterwards), so that only this
    package's kernels are cached there.
    """
    full = f"softtopk.{name}"
    module = sys.modules.get(full)
    if module is not None:
        return module
    spec = importlib.util.find_spec(full)
    folder = None if spec is None or spec.origin is None else kernel_cache_dir(Path(spec.origin).parent)
    if folder is None:
        return importlib.import_module(full)
    import numba

    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(folder)
    try:
        return importlib.import_module(full)
    finally:
        numba.config.CACHE_DIR = previous


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (made if missing), as numba tests it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


@functools.cache
def _fallback_cache_dir() -> Path:
    """The user's cache folder for compiled kernels, or a temporary one when it is read-only."""
    root = Path(os.environ.get("SOFTTOPK_CACHE") or Path.home() / ".cache" / "softtopk")
    folder = root / "numba"
    if _writable(folder):
        return folder
    return Path(tempfile.mkdtemp(prefix="softtopk-numba-"))


def kernel_cache_dir(source_dir: Path) -> Path | None:
    """Where numba caches the kernels of the sources in ``source_dir``.

    None leaves the choice to numba: ``NUMBA_CACHE_DIR`` when it is set, else the
    ``__pycache__`` folder next to the sources when it is writable. Otherwise (an install
    in a read-only site-packages) the folder ``$SOFTTOPK_CACHE/numba`` (default
    ``~/.cache/softtopk/numba``), or a temporary folder when that is read-only too: numba
    would otherwise try its own user-wide folder and, failing that, refuse to decorate
    the kernels at all.
    """
    if os.environ.get("NUMBA_CACHE_DIR") or not has_numba():
        return None
    if _writable(source_dir / "__pycache__"):
        return None
    return _fallback_cache_dir()


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

"""Published packages timed next to softtopk's operators when they are installed.

Each peer becomes a ``bench`` contender in the group ``"peer"`` only if it imports; a
missing peer is simply absent (``softtopk bench --list`` says which were found). None of
them is a dependency of softtopk. What is timed, each with its own default knob:

* ``torchsort.soft_rank`` (Blondel et al. 2020, l2, strength 1): soft ranks, not a mask;
  the reference cost of the O(n log n) permutahedron route.
* ``difftopk NeuralSort top-k`` (Petersen et al. 2022; Grover et al. 2019, tau 1): the
  mask as the sum of the last k columns of NeuralSort's n x n relaxed permutation
  (ascending), O(n^2) memory per row, so it runs only up to n = 2048.
* ``pytopk NoisedTopK`` (Garcin et al. 2022, epsilon 1, 5 samples): the perturbed k-th
  largest value (one number per row), the core of their top-k losses.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import Tensor

PeerFn = Callable[[Tensor, int], Tensor]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torchsort_soft_rank() -> PeerFn:
    import torchsort

    def fn(x: Tensor, k: int) -> Tensor:
        return torchsort.soft_rank(
            x.reshape(-1, x.shape[-1]), regularization="l2", regularization_strength=1.0
        )

    return fn


def difftopk_neuralsort() -> PeerFn:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice about torch-sparse
        import difftopk
    sorter = difftopk.NeuralSort(tau=1.0)

    def fn(x: Tensor, k: int) -> Tensor:
        perm = sorter(x.reshape(-1, x.shape[-1]))  # (B, item, rank), ranks ascending
        return perm[:, :, -k:].sum(-1)

    return fn


def pytopk_noised() -> PeerFn:
    import pytopk

    def fn(x: Tensor, k: int) -> Tensor:
        return pytopk.NoisedTopK(k=k, epsilon=1.0, n_sample=5, dim=-1)(x)

    return fn


#: name -> (module to find, factory, largest n it is run at, what it computes)
PEERS: dict[str, tuple[str, Callable[[], PeerFn], int, str]] = {
    "torchsort.soft_rank": ("torchsort", torchsort_soft_rank, 1 << 62, "soft ranks (l2, strength 1)"),
    "difftopk.neuralsort": ("difftopk", difftopk_neuralsort, 2048, "NeuralSort top-k mask, tau 1, O(n^2)"),
    "pytopk.noised_topk": ("pytopk", pytopk_noised, 1 << 62, "perturbed k-th value, eps 1, 5 samples"),
}


def available() -> dict[str, tuple[PeerFn, int, str]]:
    """The peers that import here: name -> (fn(x, k), largest n, note)."""
    found = {}
    for name, (module, factory, max_n, note) in PEERS.items():
        if not _installed(module):
            continue
        try:
            found[name] = (factory(), max_n, note)
        except Exception as err:  # a broken install is reported, not fatal
            found[name] = (_broken(err), 0, f"failed to import: {err}")
    return found


def _broken(err: Exception) -> PeerFn:
    def fn(x: Tensor, k: int) -> Tensor:
        raise RuntimeError(f"peer failed to import: {err}")

    return fn

"""Small reproductions of the papers' experiments on real data (``softtopk experiments``).

Each module builds one experiment's settings (tables) from the operator registry, so an
operator registered later appears in every experiment without code changes:

* :mod:`.classification`: (a) top-k cross-entropy under label noise (LetterRecognition
  k = 5, Fashion-MNIST k = 2) against cross-entropy;
* :mod:`.knn`: (b) differentiable kNN on Fashion-MNIST against raw-pixel kNN;
* :mod:`.moe`: (c) sparse mixture-of-experts router against hard top-2 and dense softmax;
* :mod:`.pruning`: (d) magnitude pruning at 90-99 % sparsity against one-shot pruning;
* :mod:`.recsys`: (e) top-k selection on MovieLens with DFTopK's recipe against pointwise
  BCE and ListNet;
* :mod:`.sae`: (f) top-k sparse autoencoders (TopK, BatchTopK, soft masks) on MLP activations;
* :mod:`.sampling`: (g) inclusion probabilities of k-subset samplers against the soft mask.

The shared protocol (temperature grid on validation, then seeds) is in :mod:`._runner`,
the report in :mod:`.report`.
"""

from types import ModuleType

from . import classification, knn, moe, pruning, recsys, sae, sampling
from ._runner import Method, Row, RunResult, Setting, SettingResult, mask_operators, run_setting

#: name -> module, in the order of the report.
EXPERIMENTS: dict[str, ModuleType] = {
    m.NAME: m for m in (classification, knn, moe, pruning, recsys, sae, sampling)
}

__all__ = [
    "EXPERIMENTS",
    "Method",
    "Row",
    "RunResult",
    "Setting",
    "SettingResult",
    "mask_operators",
    "run_setting",
]

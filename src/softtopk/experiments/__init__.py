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
* :mod:`.imbalanced`: (f) Garcin et al.'s balanced and imbalanced top-k hinge losses on
  heavy-tailed classes against cross-entropy and top-k cross-entropy;
* :mod:`.listops`: (g) BT-Cell's relaxed beam top-k on generated ListOps, with length and
  argument out-of-distribution splits, against a hard beam and a left-to-right cell;
* :mod:`.distributed`: (h) top-k gradient compression with error feedback, PowerSGD and
  DiLoCo in gloo processes: final loss against bytes on the wire;
* :mod:`.sae`: (i) top-k sparse autoencoders (TopK, BatchTopK, soft masks) on MLP activations;
* :mod:`.sampling`: (j) inclusion probabilities of k-subset samplers against the soft mask;
* :mod:`.lm_moe`: (k) a small MoE language model on Python sources: hard, auxiliary-loss-free,
  ReLU and soft-mask routers;
* :mod:`.mod`: (l) a small mixture-of-depths language model: top-k (MoD) against
  threshold-p (MoDification) token routing, loss against the fraction of tokens processed.

The shared protocol (the same number of configurations for every method, chosen on
validation, then seeds) is in :mod:`._runner`, the report in :mod:`.report`, the
paper-claims table in :mod:`.claims`.
"""

from types import ModuleType

from . import (
    classification,
    distributed,
    imbalanced,
    knn,
    listops,
    lm_moe,
    mod,
    moe,
    pruning,
    recsys,
    sae,
    sampling,
)
from ._runner import (
    PROTOCOL,
    Method,
    Row,
    RunResult,
    Setting,
    SettingResult,
    lr_grid,
    mask_operators,
    run_setting,
    smoothing_grid,
)

#: name -> module, in the order of the report.
EXPERIMENTS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        classification,
        knn,
        moe,
        pruning,
        recsys,
        imbalanced,
        listops,
        distributed,
        sae,
        sampling,
        lm_moe,
        mod,
    )
}

__all__ = [
    "EXPERIMENTS",
    "PROTOCOL",
    "Method",
    "Row",
    "RunResult",
    "Setting",
    "SettingResult",
    "lr_grid",
    "mask_operators",
    "run_setting",
    "smoothing_grid",
]

"""Losses built on the top-k operators.

* :func:`topk_cross_entropy` / :class:`TopKCrossEntropyLoss`: top-k cross-entropy over any
  mask operator (the P_K mixture of Petersen et al. 2022).
* :func:`fenchel_young_topk_loss`: the Fenchel-Young loss of the perturbed top-k
  (Berthet et al. 2020), whose gradient is y_t(x) - target.
* :func:`smoothed_kth_value`, :func:`balanced_topk_hinge_loss`,
  :func:`imbalanced_topk_hinge_loss`, :func:`ldam_margins`: the noised smoothing of the
  top-k calibrated hinge loss (Garcin et al. 2022, the ``pytopk`` package).
* :func:`dftopk_cascade_loss`, :func:`lcron_loss`, :class:`CascadeLoss`: cascade-ranking
  losses for recommendation (DFTopK, LCRON); :func:`lambda_loss`: LambdaLoss-style NDCG,
  the learning-to-rank baseline.
"""

from ._classification import TopKCrossEntropyLoss, topk_cross_entropy
from ._perturbed import fenchel_young_topk_loss
from ._ranking import (
    CascadeLoss,
    CascadeTerms,
    dftopk_cascade_loss,
    lambda_loss,
    lcron_loss,
    uncertainty_weighted,
)
from ._topk_hinge import (
    balanced_topk_hinge_loss,
    imbalanced_topk_hinge_loss,
    ldam_margins,
    smoothed_kth_value,
)

__all__ = [
    "CascadeLoss",
    "CascadeTerms",
    "TopKCrossEntropyLoss",
    "balanced_topk_hinge_loss",
    "dftopk_cascade_loss",
    "fenchel_young_topk_loss",
    "imbalanced_topk_hinge_loss",
    "lambda_loss",
    "lcron_loss",
    "ldam_margins",
    "smoothed_kth_value",
    "topk_cross_entropy",
    "uncertainty_weighted",
]

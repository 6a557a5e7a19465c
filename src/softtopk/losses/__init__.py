"""Losses built on the top-k operators.

* :func:`fenchel_young_topk_loss`: the Fenchel-Young loss of the perturbed top-k
  (Berthet et al. 2020), whose gradient is y_t(x) - target.
* :func:`smoothed_kth_value`, :func:`balanced_topk_hinge_loss`,
  :func:`imbalanced_topk_hinge_loss`, :func:`ldam_margins`: the noised smoothing of the
  top-k calibrated hinge loss (Garcin et al. 2022, the ``pytopk`` package).
"""

from ._perturbed import fenchel_young_topk_loss
from ._topk_hinge import (
    balanced_topk_hinge_loss,
    imbalanced_topk_hinge_loss,
    ldam_margins,
    smoothed_kth_value,
)

__all__ = [
    "balanced_topk_hinge_loss",
    "fenchel_young_topk_loss",
    "imbalanced_topk_hinge_loss",
    "ldam_margins",
    "smoothed_kth_value",
]

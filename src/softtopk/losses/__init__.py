"""Losses built on soft top-k: top-k cross-entropy, cascade-ranking losses, LambdaLoss.

The Fenchel-Young top-k loss and the smoothed top-k hinge losses (issue 4) join this
package from their own branch.
"""

from ._classification import TopKCrossEntropyLoss, topk_cross_entropy
from ._ranking import (
    CascadeLoss,
    CascadeTerms,
    dftopk_cascade_loss,
    lambda_loss,
    lcron_loss,
    uncertainty_weighted,
)

__all__ = [
    "CascadeLoss",
    "CascadeTerms",
    "TopKCrossEntropyLoss",
    "dftopk_cascade_loss",
    "lambda_loss",
    "lcron_loss",
    "topk_cross_entropy",
    "uncertainty_weighted",
]

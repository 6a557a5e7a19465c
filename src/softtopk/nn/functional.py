"""Functional forms of the layers in :mod:`softtopk.nn` (as ``torch.nn.functional``).

Each module of :mod:`softtopk.nn` holds configuration (and, for routers, the linear
projection) and calls one of these functions.
"""

from ._beam import BEAM_METHODS, BeamSelection, beam_gather, beam_select
from ._depth import DepthRouting, depth_dispatch, depth_route
from ._knn import neighbour_scores, soft_knn, soft_knn_loss
from ._pruning import hard_magnitude_prune, magnitude_prune, polynomial_sparsity
from ._router import (
    RouterOutput,
    balanced_assignment,
    expert_capacity,
    group_limit,
    moe_dispatch,
    topk_route,
)
from ._sae import (
    BatchTopK,
    SAEOutput,
    auxk_loss,
    batch_topk_activation,
    fraction_of_variance_unexplained,
    jumprelu,
    topk_activation,
)

__all__ = [
    "BEAM_METHODS",
    "BatchTopK",
    "BeamSelection",
    "DepthRouting",
    "RouterOutput",
    "SAEOutput",
    "auxk_loss",
    "balanced_assignment",
    "beam_gather",
    "batch_topk_activation",
    "beam_select",
    "depth_dispatch",
    "depth_route",
    "expert_capacity",
    "fraction_of_variance_unexplained",
    "group_limit",
    "hard_magnitude_prune",
    "jumprelu",
    "magnitude_prune",
    "moe_dispatch",
    "neighbour_scores",
    "polynomial_sparsity",
    "soft_knn",
    "soft_knn_loss",
    "topk_activation",
    "topk_route",
]

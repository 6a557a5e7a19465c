"""PyTorch modules: thin wrappers that hold configuration and call the functional ops.

The functional forms are in :mod:`softtopk.nn.functional`.
"""

from . import functional
from ._beam import BeamStep, RelaxedBeamStep
from ._depth import DepthRouter
from ._knn import SoftKNN
from ._pruning import MagnitudePruner, MagnitudePruning, polynomial_sparsity
from ._router import TopKRouter
from ._sae import TopKSAE
from ._topk import TopKMag, TopKMask

__all__ = [
    "BeamStep",
    "DepthRouter",
    "MagnitudePruner",
    "MagnitudePruning",
    "RelaxedBeamStep",
    "SoftKNN",
    "TopKMag",
    "TopKMask",
    "TopKRouter",
    "TopKSAE",
    "functional",
    "polynomial_sparsity",
]

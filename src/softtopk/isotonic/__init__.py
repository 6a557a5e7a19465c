"""Isotonic regression, projections onto the permutahedron, soft_sort and soft_rank.

* :func:`isotonic_regression`: L2 (weighted) and KL, increasing or decreasing, any dim,
  exact PAV (numba on CPU, tensor-op rounds elsewhere) or certified Dykstra, with the
  closed-form block backward taken from the solver's own partition.
* :func:`permutahedron_projection`, :func:`soft_rank`, :func:`soft_sort` (Blondel et al.
  2020), equal to torchsort's operators where those apply (2-D, last dim).
* :func:`isotonic_sparse_mask`: Sander et al.'s own sort + isotonic route to the sparse
  top-k mask, used by ``topk_mask(..., method="sparse", solver="pav" | "dykstra")``.
"""

from ._function import IsotonicInfo, isotonic_regression
from ._permutahedron import permutahedron_projection, soft_rank, soft_sort
from ._topk import isotonic_sparse_mask

__all__ = [
    "IsotonicInfo",
    "isotonic_regression",
    "isotonic_sparse_mask",
    "permutahedron_projection",
    "soft_rank",
    "soft_sort",
]

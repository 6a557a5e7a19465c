"""Collection settings for the whole tree (the doctests of src/softtopk included)."""

from __future__ import annotations

import importlib.util

# The Triton kernels import triton at module level; without triton (an optional
# dependency) their module is left out of the doctest collection.
collect_ignore = [] if importlib.util.find_spec("triton") else ["src/softtopk/threshold/_triton.py"]

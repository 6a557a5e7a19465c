"""Helpers of the numba CPU kernels (softtopk.threshold._cpu), against NumPy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from softtopk.threshold import _cpu

SPECIAL = [0.0, -0.0, 1e-300, -1e-300, 709.78, 709.79, 710.0, -708.39, -708.4, -745.13, -745.14, -746.0]


def _exp_of(w: np.ndarray) -> np.ndarray:
    """_cpu._exp on every entry of w, through the vectorised loop that uses it."""
    ev = np.empty(w.shape[0] + 1)
    _cpu._anchor(w, w.shape[0], 0.0, 1.0, ev)
    assert ev[-1] == 0.0  # the anchor
    return ev[:-1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-800.0, 800.0), min_size=1, max_size=200))
def test_vectorised_exp_within_one_ulp_of_numpy(ws):
    w = np.array(ws + SPECIAL)
    got = _exp_of(w)
    with np.errstate(over="ignore"):
        want = np.exp(w)
    normal = np.isfinite(want) & (want >= np.finfo(np.float64).tiny)
    assert np.all(np.abs(got[normal] - want[normal]) <= np.spacing(want[normal]))
    # subnormal results (and 0) within one of the smallest subnormal, inf exactly
    sub = np.isfinite(want) & ~normal
    assert np.all(np.abs(got[sub] - want[sub]) <= 5e-324)
    assert np.array_equal(got[want == np.inf], want[want == np.inf])


def test_vectorised_exp_at_infinities_and_nan():
    got = _exp_of(np.array([np.inf, -np.inf, np.nan, 1e308, -1e308]))
    assert got[0] == np.inf and got[1] == 0.0 and np.isnan(got[2])
    assert got[3] == np.inf and got[4] == 0.0

"""The distributed experiment at toy size (digits, two gloo processes, 60 steps per scheme)."""

from __future__ import annotations

import math

import pytest

from softtopk.experiments import EXPERIMENTS, run_setting


@pytest.mark.slow
def test_distributed_experiment_at_toy_size():
    module = EXPERIMENTS["distributed"]
    (setting,) = module.settings("toy")
    res = run_setting(setting, seeds=1)
    rows = {r.method: r.mean for r in res.rows}
    assert (
        rows["dense all-reduce"]["loss / dense"] == 1.0 and rows["dense all-reduce"]["bytes / dense"] == 1.0
    )
    for mean in rows.values():
        assert all(math.isfinite(v) for v in mean.values())
        assert 0.5 < mean["test accuracy"] <= 1.0
    b = {name: mean["bytes / dense"] for name, mean in rows.items()}
    # bytes: 8 per float32 pair, 4.25 per 2-bit pair, plus the scale; ordered by density
    assert b["top-k 10% + EF"] == pytest.approx(0.2, rel=0.02)
    assert b["top-k 0.1% + EF"] < b["top-k 1% + EF"] < b["top-k 10% + EF"] < b["PowerSGD rank 4"] < 1.0
    assert b["top-k 1% + EF, 2-bit"] < b["top-k 1% + EF"]
    assert b["DiLoCo (dense outer)"] == pytest.approx(1 / 5)  # one dense exchange every H = 5 steps
    assert rows["top-k 10% + EF"]["loss / dense"] < rows["top-k 0.1% + EF"]["loss / dense"]

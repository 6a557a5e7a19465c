"""The SAE and sampling experiments at toy size: sanity, and the property each one shows."""

from __future__ import annotations

import math

import pytest
import torch

from softtopk.experiments import run_setting, sae, sampling
from tests.experiments.test_experiments import check_sane, settings_or_skip


@pytest.mark.slow
def test_sae_experiment_at_toy_size():
    torch.set_num_threads(1)
    (setting,) = settings_or_skip(sae, only=["sparse"])
    res = run_setting(setting, seeds=1)
    check_sane([res])
    rows = {r.method: r.mean for r in res.rows}
    assert set(rows) == {"TopK", "TopK, no AuxK", "BatchTopK", "TopK [sparse]", "BatchTopK [sparse]"}
    for name, m in rows.items():
        assert 0.5 < m["explained var"] < 1.0, (name, m)
        assert 0.0 <= m["dead %"] <= 100.0 and 0.0 < m["spliced acc"] <= 1.0
    k = sae.SIZES["toy"][0].k
    assert rows["TopK"]["L0"] == k and rows["TopK"]["train L0"] == k
    assert rows["BatchTopK"]["train L0"] == k
    assert rows["BatchTopK"]["L0 gap %"] < 10.0  # toy size; the default size asks for 5 %


def test_sampling_experiment_at_toy_size():
    mc, exact = settings_or_skip(sampling)
    r_mc, r_exact = run_setting(mc, seeds=1), run_setting(exact, seeds=1)
    rows = {r.method: r.mean for r in r_mc.rows}
    for mask in sampling.MASKS:
        ours, gumbel = rows[f"sample_k (systematic) [{mask}]"], rows[f"Gumbel top-k on log y [{mask}]"]
        assert ours["mean abs(P-y)"] < gumbel["mean abs(P-y)"]
        assert ours["miss y=1"] == 0.0 and ours["draw y=0"] == 0.0
    exact_rows = {r.method: r.mean for r in r_exact.rows}
    for mask in sampling.MASKS:
        assert exact_rows[f"sample_k (systematic) [{mask}]"]["max abs(pi-y)"] < 1e-9
        assert exact_rows[f"Gumbel top-k on log y [{mask}]"]["max abs(pi-y)"] > 0.02
    assert not math.isnan(exact_rows["Gumbel top-k on log y [sparse]"]["min pi (y=1)"])

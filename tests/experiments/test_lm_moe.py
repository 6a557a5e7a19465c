"""The MoE and mixture-of-depths language-model experiments at toy size, and their causality."""

from __future__ import annotations

import math

import pytest
import torch

from softtopk.experiments import lm_moe, run_setting


@pytest.mark.slow
def test_lm_moe_at_toy_size():
    (setting,) = lm_moe.settings("toy", only=["sparse"], grid=(1.0,))
    res = run_setting(setting, seeds=1)
    rows = {r.method: r for r in res.rows}
    assert set(rows) == {
        "hard top-2 (Mixtral)",
        "aux-free bias (DeepSeek-V3)",
        "ReLU routing (ReMoE)",
        "router [sparse]",
    }
    for row in res.rows:
        for name, value in row.mean.items():
            assert math.isfinite(value), (row.method, name)
        # a byte model starts at log(256) = 5.55 nats and learns something in a few steps
        assert row.mean["test loss"] < math.log(256), row.method
        assert row.mean["max/mean load"] >= 1.0 and row.mean["router ms/step"] > 0
        assert row.losses[-1] < row.losses[0], (row.method, row.losses)
    for name in ("hard top-2 (Mixtral)", "aux-free bias (DeepSeek-V3)", "router [sparse]"):
        assert rows[name].mean["experts/token (eval)"] == 2.0  # exactly k in eval
    assert rows["hard top-2 (Mixtral)"].mean["experts/token (train)"] == 2.0
    assert rows["ReLU routing (ReMoE)"].mean["experts/token (eval)"] <= 2.0
    assert rows["router [sparse]"].mean["experts/token (train)"] >= 2.0


def test_lm_moe_model_is_causal_and_refuses_expert_choice():
    cfg = lm_moe.SIZES["toy"][0]
    torch.manual_seed(0)
    model = lm_moe.MoELM(cfg, lm_moe.RouterSpec({"method": "sparse", "renormalize": True})).eval()
    tokens = torch.randint(0, 256, (2, cfg.context))
    changed = tokens.clone()
    changed[:, -1] = (tokens[:, -1] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # the future does not reach the past
    try:
        lm_moe.MoELM(cfg, lm_moe.RouterSpec({"routing": "expert"}))
    except ValueError as err:
        assert "not causal" in str(err)
    else:
        raise AssertionError("expert choice in a causal LM must be refused")


@pytest.mark.slow
def test_mod_at_toy_size():
    from softtopk.experiments import mod

    (setting,) = mod.settings("toy", only=["sparse"], grid=(1.0,))
    res = run_setting(setting, seeds=1)
    rows = {r.method: r for r in res.rows}
    assert set(rows) == {
        "dense (every token)",
        "top-k (MoD, capacity 0.5)",
        "threshold-p (MoDification, p = 0.5)",
        "top-k [sparse]",
        "threshold-p [sparse]",
    }
    for row in res.rows:
        assert all(math.isfinite(v) for v in row.mean.values()), row.method
        assert row.mean["test loss"] < math.log(256)
        assert 0.0 <= row.mean["fraction processed (test)"] <= 1.0
    assert rows["dense (every token)"].mean["fraction processed (test)"] == 1.0
    assert rows["top-k (MoD, capacity 0.5)"].mean["fraction processed (train)"] == 0.5  # ceil(0.5 * 16) / 16


def test_mod_model_is_causal_in_decoding():
    from softtopk.experiments import mod

    cfg = mod.SIZES["toy"][0]
    torch.manual_seed(0)
    for router in ({"capacity": 0.5, "method": "hard"}, {"threshold": 0.5, "method": "hard"}):
        model = mod.MoDLM(cfg, router).eval()
        tokens = torch.randint(0, 256, (2, cfg.context))
        changed = tokens.clone()
        changed[:, -1] = (tokens[:, -1] + 1) % 256
        with torch.no_grad():
            a, b = model(tokens), model(changed)
        torch.testing.assert_close(a[:, :-1], b[:, :-1])

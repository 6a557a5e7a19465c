"""The experiments: the shared protocol, operator selection, and every experiment at toy size.

The toy runs take seconds each; they check sanity (the training loss falls, metrics are
in range) and one result of the literature that must hold even at this size: on
LetterRecognition with 50 % label noise a top-k loss beats cross-entropy on top-5
accuracy (Berrada et al. 2018; Garcin et al. 2022).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch

from softtopk import registry
from softtopk.data import DataNotFoundError
from softtopk.experiments import (
    EXPERIMENTS,
    Method,
    RunResult,
    Setting,
    classification,
    mask_operators,
    run_setting,
)
from softtopk.experiments._runner import depends_on_temperature, temperature_grid
from softtopk.experiments.report import verdict, write_report


def settings_or_skip(module, **kwargs):
    try:
        return module.settings("toy", **kwargs)
    except DataNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide the data of {module.NAME}: {err}")
        pytest.skip(str(err))


def fake_method(name, group, temperatures, calls):
    """val score peaks at t = 1; test score is the opposite, so a leak would show."""

    def run(t, seed):
        calls.append((name, t, seed))
        v = -abs(math.log10(t)) if t is not None else 0.0
        return RunResult(test={"m": -v + seed, "aux": 1.0}, val={"m": v}, losses=[3.0, 2.0, 1.0], seconds=0.1)

    return Method(name, group, run, temperatures)


def test_protocol_picks_the_temperature_on_validation_then_runs_the_seeds():
    calls = []
    setting = Setting(
        "s",
        "toy",
        [
            fake_method("op", "operator", [0.1, 1.0, 10.0], calls),
            fake_method("base", "baseline", [None], calls),
        ],
        select="m",
        metrics=["m", "aux"],
    )
    result = run_setting(setting, seeds=3)
    op, base = result.rows
    assert op.temperature == 1.0
    assert calls[:5] == [("op", 0.1, 0), ("op", 1.0, 0), ("op", 10.0, 0), ("op", 1.0, 1), ("op", 1.0, 2)]
    assert calls[5:] == [("base", None, 0), ("base", None, 1), ("base", None, 2)]
    assert op.mean["m"] == pytest.approx(1.0) and op.std["m"] == pytest.approx(1.0)  # seeds 0, 1, 2
    assert op.grid == {"0.1": -1.0, "1.0": 0.0, "10.0": -1.0}
    assert op.losses == [3.0, 2.0, 1.0] and len(op.runs) == 5
    with pytest.raises(ValueError, match="seeds"):
        run_setting(setting, seeds=0)


def test_operator_selection_follows_the_registry(monkeypatch):
    ops, _ = mask_operators()
    names = [op.name for op in ops]
    assert "hard" not in names  # temperature-free: each experiment's explicit baseline
    assert "magnitude" not in names  # another kind
    expected = [
        op.name for op in registry.OPERATORS.values() if op.kind == "mask" and depends_on_temperature(op)
    ]
    assert names == expected and "sparse" in names
    assert "magnitude" in [op.name for op in mask_operators(kinds=("mask", "magnitude"))[0]]
    assert [op.name for op in mask_operators(["lapsum"])[0]] == ["lapsum"]
    with pytest.raises(ValueError, match="unknown operator"):
        mask_operators(["nope"])
    # an operator added later appears without code changes; one with a size limit is left out with a note
    small = replace(registry.OPERATORS["entropic"], name="tiny-n", bench_max_elements=10)
    monkeypatch.setitem(registry.OPERATORS, "tiny-n", small)
    kept, notes = mask_operators(shape=(4, 25))
    assert "tiny-n" not in [op.name for op in kept] and any("tiny-n" in n for n in notes)
    assert "tiny-n" in [op.name for op in mask_operators(shape=(2, 5))[0]]
    assert temperature_grid(registry.OPERATORS["sparse"], (0.1, 1.0, 10.0)) == [0.01, 0.1, 1.0]


def test_registry_order_of_experiments():
    assert list(EXPERIMENTS) == ["classification", "knn", "moe", "pruning", "recsys", "sae", "sampling"]


def run_toy(module, only=("sparse",), grid=(1.0,), seeds=1):
    results = []
    for setting in settings_or_skip(module, only=list(only), grid=grid):
        results.append(run_setting(setting, seeds=seeds))
    return results


def check_sane(results):
    for res in results:
        for row in res.rows:
            for name, value in row.mean.items():
                assert not math.isnan(value), (row.method, name)
            if len(row.losses) > 2:
                assert row.losses[-1] < row.losses[0], (res.setting.key, row.method, row.losses)


def test_classification_letter_noise_topk_loss_beats_cross_entropy():
    torch.set_num_threads(2)
    (res,) = run_toy(classification, grid=(100.0,))  # sparse at t = 10 (the grid is tested above)
    check_sane([res])
    rows = {r.method: r for r in res.rows}
    ce, topk = rows["cross-entropy"], rows["top-k CE [sparse]"]
    assert res.setting.title == "LetterRecognition, k = 5, 50% label noise"
    assert topk.mean["top5"] > ce.mean["top5"] + 0.01, (topk.mean, ce.mean)
    assert 0.5 < ce.mean["top5"] < 1.0


@pytest.mark.parametrize("name", ["knn", "moe", "pruning", "recsys"])
def test_experiment_at_toy_size(name):
    results = run_toy(EXPERIMENTS[name])
    check_sane(results)
    (res,) = results
    rows = {r.method: r for r in res.rows}
    for row in res.rows:
        for metric, value in row.mean.items():
            if metric != "mismatch" and "active" not in metric:
                assert 0.0 <= value <= 1.0, (row.method, metric, value)
    if name == "knn":
        assert rows["raw-pixel kNN"].mean["9-NN acc"] > 0.9  # digits: raw kNN is already good
    if name == "moe":
        assert rows["hard top-2 router"].mean["active experts"] == 2.0
        assert rows["dense softmax router"].mean["active experts"] == 4.0
        sparse = rows["router [sparse]"].mean["active experts"]
        assert 2.0 <= sparse < 4.0  # the sparse router runs about k experts per token, not all
    if name == "pruning":
        assert (
            rows["dense (no pruning)"].mean["accuracy (hard)"]
            > rows["one-shot magnitude"].mean["accuracy (hard)"]
        )
    if name == "recsys":
        assert rows["pointwise BCE"].mean["Recall@10@20"] > 0.2 - 1e-9 or rows["ListNet (ratings)"]


def test_report_files(tmp_path):
    calls = []
    setting = Setting(
        "s", "a toy table", [fake_method("op", "operator", [0.1, 1.0], calls)], "m", ["m", "aux"]
    )
    base = Setting("s", "a toy table", [fake_method("b", "baseline", [None], calls)], "m", ["m"])
    res = run_setting(setting, seeds=2)
    res.rows += run_setting(base, seeds=2).rows
    path = write_report({"toy": ("Toy experiment", [res])}, tmp_path, header="# head", environment={"x": 1})
    text = path.read_text()
    assert "## Toy experiment" in text and "| op |" in text and "0.500 ± 0.707" in text
    assert "What the data say" in text and verdict(res)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiments"]["toy"]["s"]["rows"][0]["temperature"] == 1.0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "toy-s.png").is_file() and (tmp_path / "toy-s-loss.png").is_file()

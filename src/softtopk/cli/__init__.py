"""The ``softtopk`` command line: ``softtopk bench`` (more subcommands to come)."""

from __future__ import annotations

import argparse
import sys

from . import bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softtopk",
        description="Differentiable top-k operators: benchmarks and experiments.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench_parser = sub.add_parser(
        "bench", help="time and peak memory of every operator, as ratios to torch.topk"
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

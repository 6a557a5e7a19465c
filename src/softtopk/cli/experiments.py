"""``softtopk experiments``: the papers' experiments in miniature, on real data, with a report.

Every registered operator takes part (``--only`` narrows the list); every method,
baselines included, gets the same number of configurations, chosen on a validation
split, then ``--seeds`` seeds at the chosen configuration. Writes ``report.md`` (tables,
what the data say, plots), PNG plots and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from .. import __version__
from ..data import DataNotFoundError
from ._progress import Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..experiments import EXPERIMENTS

    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"experiments to run: {', '.join(EXPERIMENTS)} (default: all)",
    )
    parser.add_argument(
        "--size",
        default="default",
        choices=["toy", "quick", "default"],
        help="toy: seconds, for tests; quick: a short demonstration (recsys only, used by make run); "
        "default: the documented size",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds at the chosen temperature (default 3)")
    parser.add_argument(
        "--grid",
        type=lambda s: tuple(float(v) for v in s.split(",")),
        help="temperature multipliers of each operator's default, e.g. 0.1,1,10 (default: per experiment)",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="OP", help="registered operators to include (default: all)"
    )
    parser.add_argument("--data-dir", type=Path, help="extra folder searched first for raw data files")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("experiments-results"), help="folder for the report")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def environment() -> dict[str, object]:
    env: dict[str, object] = {
        "softtopk": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "softtopk " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def main(args: argparse.Namespace) -> int:
    from ..experiments import EXPERIMENTS
    from ..experiments._runner import PROTOCOL, PROTOCOL_VERSION, SettingResult, check_grids, run_method
    from ..experiments.report import markdown_table, verdict, write_report

    names = args.names or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print(f"--seeds must be at least 1, got {args.seeds}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    env["protocol"] = PROTOCOL_VERSION
    start = time.perf_counter()
    results = {}
    path, minutes = None, 0.0
    for name in names:
        module = EXPERIMENTS[name]
        if args.size not in module.SIZES:
            print(f"{name} has no size {args.size!r}; it has {', '.join(module.SIZES)}", file=sys.stderr)
            return 2
        try:
            settings = module.settings(args.size, only=args.only, grid=args.grid, data_dir=args.data_dir)
        except DataNotFoundError as err:
            print(f"{name}: {err}", file=sys.stderr)
            return 3
        done = []
        for setting in settings:
            check_grids(setting)
            total = sum(len(m.temperatures) + args.seeds - 1 for m in setting.methods)
            t0 = time.perf_counter()
            rows = []
            with Progress(total, f"{name} {setting.key}", enabled=not args.quiet) as bar:
                for method in setting.methods:
                    rows.append(run_method(method, setting.select, args.seeds, bar.step))
            result = SettingResult(setting, rows, args.seeds, time.perf_counter() - t0)
            done.append(result)
            print(f"\n{module.TITLE}: {setting.title}  ({result.seconds / 60:.1f} min)")
            print(markdown_table(result))
            line = verdict(result)
            if line:
                print(line)
            # the report is rewritten after every setting: a run stopped early keeps what it finished
            results[name] = (module.TITLE, done)
            minutes = (time.perf_counter() - start) / 60
            last = name == names[-1] and len(done) == len(settings)
            header = _header(env, args, minutes, PROTOCOL, partial=not last)
            path = write_report(results, args.out, header=header, environment=env)
    print(f"\nwrote {path} ({minutes:.1f} min)")
    return 0


def _header(env: dict, args: argparse.Namespace, minutes: float, protocol: str, *, partial: bool) -> str:
    return "\n".join(
        [
            "# softtopk experiments",
            "",
            f"- date: {env['date']}",
            f"- machine: {env['platform']}, {env['processor']}, {env['cpu_count']} CPUs, "
            f"torch {env['torch']} with {env['torch_threads']} threads"
            + (f", {env['cuda_device']}" if "cuda_device" in env else ""),
            f"- command: `{env['command']}` (size {args.size}, {args.seeds} seeds, total {minutes:.1f} min)",
            f"- protocol: {protocol}",
        ]
        + (["- **partial**: written while the run was going; later settings are missing"] if partial else [])
    )

"""``softtopk experiments``: the papers' experiments in miniature, on real data, with a report.

Every registered operator takes part (``--only`` narrows the list); every method,
baselines included, gets the same number of configurations, chosen on a validation
split, then ``--seeds`` seeds at the chosen configuration. Writes ``report.md`` (tables,
what the data say, plots), PNG plots and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import __version__
from ..data import DataNotFoundError
from ._progress import Progress

if TYPE_CHECKING:  # the experiments package is imported when the command runs
    from ..experiments._runner import Setting, SettingResult


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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="read back the settings already in OUT/results.json instead of running them again "
        "(that run must have had the same --size, --seeds, --grid, --only and protocol)",
    )


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
    env["options"] = {knob: getattr(args, knob) for knob in _SAME_OPTIONS}
    previous: dict = {}
    if args.resume:
        try:
            previous = _previous_run(args, PROTOCOL_VERSION)
        except ValueError as err:
            print(f"--resume: {err}", file=sys.stderr)
            return 2
        if previous:  # a chain of resumed runs names the run that started it
            env["resumed"] = previous["environment"].get("resumed", previous["environment"])
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
            result = _read_back(previous, name, setting, args.seeds)
            if result is not None:
                print(f"\n{module.TITLE}: {setting.title}  (read back from the earlier run)")
            else:
                total = sum(len(m.temperatures) + args.seeds - 1 for m in setting.methods)
                t0 = time.perf_counter()
                rows = []
                with Progress(total, f"{name} {setting.key}", enabled=not args.quiet) as bar:
                    for method in setting.methods:
                        rows.append(run_method(method, setting.select, args.seeds, bar.step))
                result = SettingResult(setting, rows, args.seeds, time.perf_counter() - t0)
                print(f"\n{module.TITLE}: {setting.title}  ({result.seconds / 60:.1f} min)")
                print(markdown_table(result))
                line = verdict(result)
                if line:
                    print(line)
            done.append(result)
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
        + (
            [
                f"- resumed: the settings this command found in the run of {env['resumed']['date']} "
                f"(`{env['resumed']['command']}`) were read back, not run again; each table gives its own "
                "wall time"
            ]
            if "resumed" in env
            else []
        )
        + (["- **partial**: written while the run was going; later settings are missing"] if partial else [])
    )


# the options a resumed run must share with the run it resumes
_SAME_OPTIONS = ("size", "seeds", "grid", "only")


def _previous_run(args: argparse.Namespace, protocol_version: str) -> dict:
    """The results.json under ``args.out``, checked to come from a run with the same settings.

    Returns ``{}`` when there is none. Raises ValueError when it was run with another
    protocol, size, seed count, grid or operator list: its tables would not be comparable.
    """
    path = args.out / "results.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    env = data["environment"]
    if env.get("protocol") != protocol_version:
        written = env.get("protocol")
        raise ValueError(f"{path} was written under protocol {written!r}, not {protocol_version!r}")
    if "options" in env:
        old = env["options"]
    else:  # written before the options were recorded: read them off its command line
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        parsed = parser.parse_args(shlex.split(env["command"])[2:])
        old = {knob: getattr(parsed, knob) for knob in _SAME_OPTIONS}
    for knob in _SAME_OPTIONS:
        mine = getattr(args, knob)
        theirs = old[knob] if knob != "grid" or old[knob] is None else tuple(old[knob])
        if theirs != mine:
            raise ValueError(f"{path} was written with --{knob} {theirs!r}, this command has {mine!r}")
    return data


def _read_back(previous: dict, name: str, setting: Setting, seeds: int) -> SettingResult | None:
    """The earlier run's result of ``setting``, or None if it has none with these methods.

    ``previous`` comes from :func:`_previous_run`, which checked its options (seeds included).
    """
    from ..experiments._runner import Row, SettingResult

    saved = previous.get("experiments", {}).get(name, {}).get(setting.key)
    if saved is None:
        return None
    rows = [Row(**r) for r in saved["rows"]]
    if [r.method for r in rows] != [m.name for m in setting.methods]:
        return None  # the setting's methods changed since: run it again
    return SettingResult(setting, rows, seeds, saved["seconds"])

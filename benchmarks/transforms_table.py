"""Runs tests/test_transforms.py and writes the operator x transform table of its outcomes.

    PYTHONPATH=src python benchmarks/transforms_table.py            # every test (compile included)
    PYTHONPATH=src python benchmarks/transforms_table.py --fast     # vmap and meta only
    PYTHONPATH=src python benchmarks/transforms_table.py -k dynamic --base a.md --out b.md
    PYTHONPATH=src python benchmarks/transforms_table.py --no-run --base a.md --base b.md

``-k`` selects tests (as pytest's -k), so that parts of the table can run in parallel;
``--base`` keeps the cells of earlier tables that this run did not fill, ``--no-run``
only merges them.

Each cell aggregates the tests of one operator under one transform: "pass" when all of
them passed, "FAIL" (with the first line of the error) when one failed, "not run" when
the test file leaves the operator out of that transform (the reason is in the notes).
The table goes to docs/api/transforms.md (``--out`` to change).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {
    "test_vmap": "vmap",
    "test_vmap_stochastic_same": "vmap",
    "test_vmap_stochastic_different": "vmap",
    "test_vmap_stochastic_error_mode": "vmap",
    "test_compile_fullgraph": "compile(fullgraph=True)",
    "test_compile_refuses_generator_noise": "compile(fullgraph=True)",
    "test_compile_dynamic": "compile(dynamic=True)",
    "test_meta": "meta device",
    "test_forward_mode_equals_the_reverse_mode_jacobian": "forward mode",
    "test_operators_without_forward_mode_raise": "forward mode",
    "test_forward_over_forward_equals_reverse_over_reverse": "jacfwd(jacfwd)",
}
HEADER = [
    "vmap",
    "compile(fullgraph=True)",
    "compile(dynamic=True)",
    "meta device",
    "forward mode",
    "jacfwd(jacfwd)",
]
#: The cell of an operator without forward mode whose test that it raises passed.
RAISES = "NotImplementedError (no jvp)"


class Collector:
    """A pytest plugin keeping (operator, column) -> outcomes of the call phase."""

    def __init__(self, on_report=None) -> None:  # noqa: ANN001
        self.cells: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        self.on_report = on_report

    def pytest_runtest_logreport(self, report) -> None:  # noqa: ANN001
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        func, _, params = report.nodeid.split("::")[-1].partition("[")
        if func not in COLUMNS:
            return
        params = params[:-1]  # the closing bracket of the parameter id
        name = params.split("-", 1)[-1] if params.startswith("dtype") else params
        message = ""
        if report.failed:
            text = str(report.longrepr).strip().splitlines()
            errors = [line for line in text if line.startswith("E ")]
            message = (errors[0][1:].strip() if errors else text[-1])[:120]
        self.cells[(name, COLUMNS[func])].append((report.outcome, message))
        if self.on_report is not None:
            self.on_report()


def cell(outcomes: list[tuple[str, str]] | None) -> str:
    if not outcomes:
        return "not run"
    failed = [m for o, m in outcomes if o == "failed"]
    if failed:
        return "FAIL: " + failed[0].replace("|", "/")
    if all(o == "skipped" for o, _ in outcomes):
        return "skipped"
    return f"pass ({len(outcomes)})" if len(outcomes) > 1 else "pass"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="skip the slow (compile) tests")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "api" / "transforms.md")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression")
    parser.add_argument("--base", type=Path, action="append", default=[], help="an earlier table to merge")
    parser.add_argument("--no-run", action="store_true", help="only merge the --base tables")
    args = parser.parse_args(argv)
    base: dict[tuple[str, str], str] = {}
    for page in args.base:
        base.update(read_table(page))
    sys.path.insert(0, str(ROOT))
    from tests import test_transforms as suite

    command = "PYTHONPATH=src python benchmarks/transforms_table.py" + (" --fast" if args.fast else "")

    def write(final: bool = False) -> None:
        args.out.write_text("\n".join(table(collector, suite, args.fast, command, final, base)) + "\n")

    collector = Collector(on_report=write)
    marks = "not slow" if args.fast else "slow or not slow"
    select = [] if args.select is None else ["-k", args.select]
    code = 0
    if not args.no_run:
        code = pytest.main(
            [
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                marks,
                *select,
                str(ROOT / "tests" / "test_transforms.py"),
            ],
            plugins=[collector],
        )
    write(final=True)
    print(f"wrote {args.out} (pytest exit code {int(code)})")
    return int(code)


def read_table(page: Path) -> dict[tuple[str, str], str]:
    """The cells of an earlier table that hold a test outcome."""
    cells = {}
    for line in page.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        parts = [p.strip() for p in line.strip("|").split(" | ")]
        name = parts[0].strip("`")
        for column, text in zip(HEADER, parts[1:], strict=False):
            if text.startswith(("pass", "FAIL", "skipped", RAISES)):
                cells[(name, column)] = text
    return cells


def table(collector: Collector, suite, fast: bool, command: str, final: bool, base) -> list[str]:  # noqa: ANN001
    """The page's lines from the outcomes collected so far (and the ``base`` cells)."""
    lines = [
        "# Transforms: vmap, torch.compile, meta tensors, forward mode",
        "",
        "Every registered operator (and the isotonic family's public functions) under the "
        "transforms PyTorch users apply to it, as tested by `tests/test_transforms.py`:",
        "",
        "* **vmap**: `torch.func.vmap` equals the loop (leading and inner vmapped dims), and "
        '`vmap(grad(f))` the per-row gradients. Stochastic operators: `randomness="same"` equals '
        'the loop with the same seed, `"different"` draws independent samples, torch\'s default '
        '`"error"` raises.',
        "* **compile(fullgraph=True)**: values and gradients equal eager. Stochastic operators "
        "compile with their noise passed in (`noise_samples=`, `gumbel=`); noise drawn from a "
        "`torch.Generator` runs eagerly (a graph break), and `fullgraph=True` refuses it with an "
        "error that says why (a compiled graph would not reproduce the generator's draws).",
        "* **compile(dynamic=True)**: values and gradients equal eager on two shapes.",
        "* **meta device**: the right shape and dtype, forward and backward (float32 and float64), "
        "nothing computed.",
        "* **forward mode**: `torch.func.jvp` and eager dual tensors (`torch.autograd.forward_ad`) "
        "give J u with J from reverse mode. The operators without a jvp raise "
        "NotImplementedError (also nested, where torch itself fails on an internal assertion).",
        "* **jacfwd(jacfwd)**: nested forward mode equals reverse over reverse (second "
        "derivatives). torch.func does not run an outer jvp through an autograd.Function's "
        "jvp (pytorch/pytorch#197867: every second derivative came out 0), so the threshold "
        "family and isotonic regression take a tensor-op route there.",
        "",
        f"A cell says `pass (n)` when its n tests passed. Generated by `{command}` with torch "
        f"{torch.__version__} on {platform.machine()} CPU"
        + ("." if final else " (partial: the run was still going)."),
        "",
        "| operator | " + " | ".join(HEADER) + " |",
        "|---|" + "---|" * len(HEADER),
    ]
    for name in suite.NAMES:
        row = []
        for column in HEADER:
            raising = name in suite.NO_FORWARD and column in ("forward mode", "jacfwd(jacfwd)")
            outcomes = collector.cells.get((name, "forward mode" if raising else column))
            if raising and outcomes and all(o == "passed" for o, _ in outcomes):
                row.append(RAISES)
                continue
            if outcomes is None and (name, column) in base:
                row.append(base[(name, column)])
            elif outcomes is None and column.startswith("compile") and name not in suite.COMPILED:
                row.append("not run: compiles=False (see the note)")
            elif outcomes is None and fast and column.startswith("compile"):
                row.append("not run (--fast)")
            else:
                row.append(cell(outcomes))
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
    from softtopk.registry import OPERATORS

    notes = [
        f"* `{name}`: {OPERATORS[name].note}"
        for name in suite.NAMES
        if name in OPERATORS and name not in suite.COMPILED
    ]
    if notes:
        lines += ["", "Operators the compile tests leave out, with their registry notes:", "", *notes]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())

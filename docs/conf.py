"""Sphinx configuration: the API pages are built from the docstrings; nothing needs the network.

``operators.md`` (the table of registered operators) is generated from
``softtopk.registry.OPERATORS`` at every build, so an operator registered later appears
without editing the docs.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

import softtopk  # noqa: E402
from softtopk.registry import OPERATORS  # noqa: E402

project = "softtopk"
author = "softtopk developers"
release = version = softtopk.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# NamedTuple fields are documented by autodoc already; "Attributes:" sections become
# :ivar: fields so that the two do not describe the same object twice.
napoleon_use_ivar = True
suppress_warnings = ["myst.header"]
try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # the default theme ships with Sphinx
    html_theme = "alabaster"
html_title = f"softtopk {release}"


def _flag(value: object) -> str:
    return "yes" if value else "no"


def write_operator_table() -> None:
    """docs/operators.md: one row per registered operator, from the registry."""
    lines = [
        "# Registered operators",
        "",
        "Generated from `softtopk.registry.OPERATORS` when the docs are built. Every operator",
        "here passes the conformance suite and is picked up by `softtopk bench`,",
        "`softtopk experiments` and `softtopk plot` without code changes.",
        "",
        "| name | kind | reproduces | sums to k | sparse | d/dk | compiles | vmaps | default temperature |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op in OPERATORS.values():
        lines.append(
            f"| `{op.name}` | {op.kind} | {op.paper or '—'} | {_flag(op.sums_to_k)} | {_flag(op.sparse)} | "
            f"{_flag(op.k_grad)} | {_flag(op.compiles)} | {_flag(op.vmaps)} | {op.temperature:g} |"
        )
    lines += ["", "```{eval-rst}", ".. autoclass:: softtopk.registry.Operator", "   :no-index:", "```", ""]
    text = "\n".join(lines)
    path = HERE / "operators.md"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def write_results_page() -> None:
    """docs/results.md: the committed experiments report (docs/experiments/report.md), if any."""
    lines = ["# Experiment results", ""]
    if (HERE / "experiments" / "report.md").is_file():
        lines += [
            "The latest full run of `softtopk experiments` (`make experiments`), with its date,",
            "machine and command:",
            "",
            "```{toctree}",
            ":maxdepth: 3",
            "",
            "experiments/report",
            "```",
        ]
    if (HERE / "experiments" / "other-operators-partial.md").is_file():
        lines += [
            "",
            "Tables from a run of the other operators that was stopped before its end (labelled as partial):",
            "",
            "```{toctree}",
            ":maxdepth: 1",
            "",
            "experiments/other-operators-partial",
            "```",
        ]
    else:
        lines += [
            "No report is committed yet: `make data && make experiments` writes docs/experiments/report.md."
        ]
    listed = {"experiments/report", "experiments/other-operators-partial"}
    others = sorted(
        path.relative_to(HERE).with_suffix("").as_posix() for path in (HERE / "experiments").rglob("*.md")
    )
    others = [name for name in others if name not in listed]
    if others:
        lines += [
            "",
            "The claims table and the reports of single experiments run on their own:",
            "",
            "```{toctree}",
            ":maxdepth: 1",
            "",
            *others,
            "```",
        ]
    text = "\n".join(lines) + "\n"
    path = HERE / "results.md"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


write_operator_table()
write_results_page()

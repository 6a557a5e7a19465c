"""``softtopk plot``: every registered operator on a 1-D family of inputs (Sander et al. 2023, Fig. 1).

The input is x(s) = (s, 1, 0.5, -0.5, -1) with k = 2 by default: the hard top-2 mask
takes the first entry once s passes 0.5, the second-largest of the others. For each
operator the first output y_1(s) is drawn at three temperatures (its registered default
times ``--multipliers``), with the hard mask dashed, and, in a second figure, its
derivative dy_1/ds from autograd. A sparse operator is exactly 0 or 1 away from the
switch and its derivative has compact support; a smooth one never reaches 0 or 1.
Magnitude operators (``kind == "magnitude"``) are drawn on the same family (their
output is the kept value, not a 0/1 indicator).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from ..registry import OPERATORS, Operator

BASE = (1.0, 0.5, -0.5, -1.0)


def family(s: Tensor, others: tuple[float, ...] = BASE) -> Tensor:
    """Rows (s_i, others...) for every value s_i: shape (len(s), 1 + len(others))."""
    rest = torch.tensor(others, dtype=s.dtype).expand(len(s), len(others))
    return torch.cat([s[:, None], rest], dim=1)


def curve(op: Operator, s: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """y_1(s) and dy_1/ds for ``op`` on :func:`family` (float64)."""
    x = family(s).requires_grad_()
    torch.manual_seed(0)
    y = op(x, k, dim=-1, temperature=temperature)
    (grad,) = torch.autograd.grad(y[:, 0].sum(), x, allow_unused=True)
    d = torch.zeros_like(s) if grad is None else grad[:, 0]
    return y[:, 0].detach(), d.detach()


def hard_curve(op: Operator, s: Tensor, k: int) -> Tensor:
    """The hard limit: torch.topk's mask (or hard top-k magnitude for a magnitude operator)."""
    x = family(s)
    if op.kind == "magnitude":
        keep = torch.zeros_like(x).scatter(-1, x.abs().topk(k, dim=-1).indices, 1.0)
        return (x * keep)[:, 0]
    return torch.zeros_like(x).scatter(-1, x.topk(k, dim=-1).indices, 1.0)[:, 0]


def summary(op: Operator, s: Tensor, k: int, temperature: float) -> str:
    """A line: exact zeros and the largest slope at ``temperature``."""
    x = family(s)
    torch.manual_seed(0)
    with torch.no_grad():
        y = op(x, k, dim=-1, temperature=temperature)
    _, d = curve(op, s, k, temperature)
    zeros = (y == 0).double().mean().item()
    return (
        f"  {op.name:<16} t={temperature:<8g} exact zeros {zeros:6.1%} of outputs, "
        f"max |dy1/ds| {d.abs().max().item():8.3f}, y1 range [{y[:, 0].min():.3f}, {y[:, 0].max():.3f}]"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=2, help="budget k (default 2, of 5 entries)")
    parser.add_argument(
        "--multipliers",
        type=lambda v: tuple(float(a) for a in v.split(",")),
        default=(1.0, 3.0, 10.0),
        help="temperatures as multiples of each operator's default (default 1,3,10)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="OP",
        help="registered operators to draw (default: all masks and magnitudes)",
    )
    parser.add_argument("--points", type=int, default=801, help="values of s in [-2.5, 2.5]")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="folder for the PNG files")


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.k <= len(BASE):
        print(f"--k must be in [1, {len(BASE)}], got {args.k}", file=sys.stderr)
        return 2
    names = args.only or [n for n, op in OPERATORS.items() if op.kind in ("mask", "magnitude")]
    unknown = [n for n in names if n not in OPERATORS]
    if unknown:
        print(f"unknown operator(s) {unknown}; known: {', '.join(OPERATORS)}", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("softtopk plot needs matplotlib: pip install 'softtopk[bench]'", file=sys.stderr)
        return 2
    ops = [OPERATORS[n] for n in names]
    other = [op.name for op in ops if op.kind not in ("mask", "magnitude")]
    if other:
        print(f"softtopk plot draws mask and magnitude operators only, got {other}", file=sys.stderr)
        return 2
    s = torch.linspace(-2.5, 2.5, args.points, dtype=torch.float64)
    cols = min(4, len(ops))
    rows = (len(ops) + cols - 1) // cols
    args.out.mkdir(parents=True, exist_ok=True)
    figs = {
        "values": plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False),
        "derivatives": plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False),
    }
    print(f"x(s) = (s, {', '.join(map(str, BASE))}), k = {args.k}; y1 = first output")
    for i, op in enumerate(ops):
        hard = hard_curve(op, s, args.k)
        for kind, (_, axes) in figs.items():
            ax = axes[i // cols][i % cols]
            if kind == "values":
                ax.plot(s, hard, "k--", lw=1, label="hard")
            for m in args.multipliers:
                t = op.temperature * m
                y, d = curve(op, s, args.k, t)
                ax.plot(s, y if kind == "values" else d, label=f"t={t:g}")
            ax.set_title(f"{op.name} ({op.kind})", fontsize=9)
            ax.set_xlabel("s", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.legend(fontsize=7)
        for m in args.multipliers:
            print(summary(op, s, args.k, op.temperature * m))
    paths = []
    for kind, (fig, axes) in figs.items():
        for j in range(len(ops), rows * cols):
            axes[j // cols][j % cols].axis("off")
        label = "y1(s)" if kind == "values" else "dy1/ds"
        fig.suptitle(f"{label} for x = (s, {', '.join(map(str, BASE))}), k = {args.k}", fontsize=10)
        fig.tight_layout()
        path = args.out / f"operators-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    print("wrote " + " and ".join(map(str, paths)))
    return 0

"""PNG plots of ``softtopk bench`` results: time against n on log-log axes, one line per contender."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def plot_bench(rows: list[Any], out: Path, environment: dict[str, object] | None = None) -> list[Path]:
    """One figure per (batch, k rule) with two panels (fwd, fwd+bwd); returns the files written.

    Rows are grouped by batch size; k is whatever each row used (the legend says how k was
    chosen only through the file name). A figure needs at least two row lengths n.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    by_batch: dict[int, list[Any]] = defaultdict(list)
    for r in rows:
        if not math.isnan(r.ms):
            by_batch[r.batch].append(r)
    paths = []
    styles = {
        "floor": ("k", "--"),
        "sort route": (None, ":"),
        "published": (None, "-."),
        "peer": (None, "-."),
    }
    for batch, group in sorted(by_batch.items()):
        if len({r.n for r in group}) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
        for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
            lines: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
            for r in group:
                if r.mode == mode:
                    lines[(r.contender, r.group)].append((r.n, r.ms))
            for (name, grp), points in sorted(lines.items()):
                points.sort()
                if len({p[0] for p in points}) < 1:
                    continue
                # several k per n: keep the smallest k's time (the first listed per n)
                seen: dict[int, float] = {}
                for n, ms in points:
                    seen.setdefault(n, ms)
                xs, ys = list(seen), list(seen.values())
                color, ls = styles.get(grp, (None, "-"))
                ax.loglog(
                    xs, ys, marker="o", ms=3, ls=ls, color=color if name == "torch.topk" else None, label=name
                )
            ax.set_title(f"{mode}, batch {batch}", fontsize=10)
            ax.set_xlabel("n (row length)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("median time per call (ms)")
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if environment:
            fig.suptitle(
                f"softtopk bench, {environment.get('processor', '')}, "
                f"{environment.get('cpu_count', '?')} CPUs, "
                f"torch {environment.get('torch', '')}, {environment.get('torch_threads', '?')} threads"
                + (f", {environment['cuda_device']}" if "cuda_device" in environment else ""),
                fontsize=9,
            )
        fig.tight_layout()
        path = Path(out) / f"bench-time-batch{batch}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

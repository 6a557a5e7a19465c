"""The Markdown report of an ``experiments`` run: tables, PNG plots and a JSON of every run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from ._runner import Row, SettingResult


def _fmt(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if seeds == 1 or math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def best_row(result: SettingResult, metric: str, group: str | None = None) -> Row | None:
    """The row with the best mean of ``metric`` (optionally within a group)."""
    sign = -1.0 if metric in result.setting.lower_is_better else 1.0
    rows = [
        r
        for r in result.rows
        if (group is None or r.group == group) and not math.isnan(r.mean.get(metric, math.nan))
    ]
    return max(rows, key=lambda r: sign * r.mean[metric]) if rows else None


def verdict(result: SettingResult) -> str:
    """One sentence on the headline metric: the best operator against the best baseline."""
    metric = result.setting.metrics[0]
    op, base = best_row(result, metric, "operator"), best_row(result, metric, "baseline")
    if op is None or base is None:
        return ""
    diff = op.mean[metric] - base.mean[metric]
    spread = math.hypot(op.std.get(metric, 0.0), base.std.get(metric, 0.0))
    if metric in result.setting.lower_is_better:
        diff = -diff
    if abs(diff) <= spread:
        return (
            f"On {metric}, the best operator ({op.method}, {op.mean[metric]:.3f}) and the best baseline "
            f"({base.method}, {base.mean[metric]:.3f}) are within the seed spread ({spread:.3f})."
        )
    winner, loser = (op, base) if diff > 0 else (base, op)
    kind = "operator" if diff > 0 else "baseline"
    return (
        f"On {metric}, the best {kind} wins: {winner.method} {winner.mean[metric]:.3f} against "
        f"{loser.method} {loser.mean[metric]:.3f} (difference {abs(diff):.3f}, seed spread {spread:.3f})."
    )


def markdown_table(result: SettingResult) -> str:
    """The setting as a Markdown table: test metrics, the configuration chosen and the grid's scores."""
    s = result.setting
    head = [
        "method",
        *s.metrics,
        "chosen on validation",
        "grid (validation " + s.select + ")",
        "s / run (cpu)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [r.method]
        cells += [_fmt(r.mean.get(m, math.nan), r.std.get(m, math.nan), result.seeds) for m in s.metrics]
        cells.append("— (nothing to tune)" if r.temperature is None else f"{r.knob} {r.temperature:g}")
        cells.append(", ".join(f"{t}: {v:.3f}" for t, v in r.grid.items()) or "—")
        cells.append(f"{r.seconds:.1f} ({r.cpu_seconds:.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_setting(result: SettingResult, folder: Path, stem: str) -> list[Path]:
    """A bar chart of the headline metric (mean, error bar = std over seeds) and the loss curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the tables are not
        return []
    metric = result.setting.metrics[0]
    rows = [r for r in result.rows if not math.isnan(r.mean.get(metric, math.nan))]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    colors = ["#888888" if r.group == "baseline" else "#1f77b4" for r in rows]
    ax.barh(
        range(len(rows)),
        [r.mean[metric] for r in rows],
        xerr=[r.std.get(metric, 0.0) for r in rows],
        color=colors,
        capsize=3,
    )
    ax.set_yticks(range(len(rows)), [r.method for r in rows])
    ax.invert_yaxis()
    lo = min(r.mean[metric] - r.std.get(metric, 0.0) for r in rows)
    hi = max(r.mean[metric] + r.std.get(metric, 0.0) for r in rows)
    pad = 0.15 * (hi - lo) + 1e-3
    ax.set_xlim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    ax.set_xlabel(f"test {metric} (mean ± std over {result.seeds} seeds; grey: baselines)")
    ax.set_title(result.setting.title, fontsize=10)
    fig.tight_layout()
    path = folder / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    curves = [r for r in result.rows if len(r.losses) > 1]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in curves:
            ax.plot(
                range(1, len(r.losses) + 1),
                r.losses,
                label=r.method,
                ls="--" if r.group == "baseline" else "-",
            )
        ax.set_xlabel("epoch (or evaluation step)")
        ax.set_ylabel("training loss (each method its own loss)")
        ax.set_title(result.setting.title, fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{stem}-loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if result.setting.plots is not None:
        paths += result.setting.plots(result, folder, stem)
    return paths


def write_report(
    results: dict[str, tuple[str, list[SettingResult]]],
    folder: Path,
    *,
    header: str,
    environment: dict[str, object],
) -> Path:
    """Writes ``report.md``, one PNG per setting and ``results.json`` under ``folder``.

    ``results`` maps an experiment name to (its title, its setting results).
    """
    folder.mkdir(parents=True, exist_ok=True)
    md = [header, ""]
    data: dict[str, object] = {"environment": environment, "experiments": {}}
    for name, (title, setting_results) in results.items():
        md += [f"## {title}", ""]
        exp: dict[str, object] = {}
        for res in setting_results:
            stem = f"{name}-{res.setting.key}"
            md += [f"### {res.setting.title}", "", res.setting.description, ""]
            md += [markdown_table(res), ""]
            line = verdict(res)
            if line:
                md += [f"**What the data say.** {line}", ""]
            md += [f"Wall time of this table: {res.seconds / 60:.1f} min.", ""]
            for path in plot_setting(res, folder, stem):
                md += [f"![{res.setting.title}]({path.name})", ""]
            exp[res.setting.key] = {
                "title": res.setting.title,
                "description": res.setting.description,
                "select": res.setting.select,
                "metrics": res.setting.metrics,
                "seeds": res.seeds,
                "seconds": res.seconds,
                "rows": [asdict(r) for r in res.rows],
            }
        data["experiments"][name] = exp  # type: ignore[index]
    path = folder / "report.md"
    path.write_text("\n".join(md))
    (folder / "results.json").write_text(json.dumps(data, indent=1, default=str))
    return path

"""The paper-claims table: each paper's claim, the experiment that tests it, the figures and a verdict.

Built from the ``results.json`` files that ``softtopk experiments`` writes, so that it can
be regenerated after any re-run::

    python -m softtopk.experiments.claims                      # docs/experiments/claims.md
    python -m softtopk.experiments.claims A/results.json B/results.json --out claims.md

With no file given it reads ``docs/experiments/results.json`` and
``docs/experiments/runs/*/results.json``; where several files hold the same experiment,
the most recent run (its ``environment.date``) is used. Every verdict is computed from
the numbers by one rule: method A beats method B on a metric when the difference of
their means over the seeds exceeds the spread, sqrt(std_A^2 + std_B^2); within the
spread they tie. A claim is "reproduced" when the comparisons it names go its way in
the majority of the settings it is tested on, "not reproduced" otherwise, and "not
testable here" when no experiment on this machine can test it (the table says why).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE, PENDING = (
    "reproduced",
    "not reproduced",
    "not testable here",
    "pending",
)


@dataclass
class Source:
    """Where an experiment's numbers come from: the file and its run's environment."""

    path: str
    date: str
    command: str
    protocol: str


class Results:
    """The experiments of several ``results.json`` files, the newest run of each experiment kept."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.experiments: dict[str, dict[str, dict]] = {}
        self.sources: dict[str, Source] = {}
        for path in paths:
            data = json.loads(Path(path).read_text())
            env = data.get("environment", {})
            src = Source(
                str(path),
                str(env.get("date", "")),
                str(env.get("command", "")),
                str(env.get("protocol", "earlier protocol (baselines untuned)")),
            )
            for name, settings in data.get("experiments", {}).items():
                old = self.sources.get(name)
                if old is None or _date(src.date) >= _date(old.date):
                    self.experiments[name] = settings
                    self.sources[name] = src

    def setting(self, experiment: str, key: str) -> dict | None:
        return self.experiments.get(experiment, {}).get(key)

    def row(self, experiment: str, key: str, method: str) -> dict | None:
        s = self.setting(experiment, key)
        if s is None:
            return None
        return next((r for r in s["rows"] if r["method"] == method), None)

    def keys(self, experiment: str, prefix: str = "") -> list[str]:
        return [k for k in self.experiments.get(experiment, {}) if k.startswith(prefix)]


def _date(text: str) -> float:
    try:
        return time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return 0.0


def fmt(row: dict | None, metric: str) -> str:
    """``mean ± std`` of ``metric`` in ``row`` (n/a when absent)."""
    if row is None or metric not in row["mean"] or math.isnan(row["mean"][metric]):
        return "n/a"
    return f"{row['mean'][metric]:.3f} ± {row['std'].get(metric, 0.0):.3f}"


def compare(a: dict | None, b: dict | None, metric: str, lower_is_better: bool = False) -> int:
    """+1 if row ``a`` beats row ``b`` on ``metric`` beyond the seed spread, -1 if it loses, 0 if tied.

    Raises KeyError when either row lacks the metric (callers check with :func:`fmt` first).
    """
    if a is None or b is None:
        raise KeyError(metric)
    diff = a["mean"][metric] - b["mean"][metric]
    if lower_is_better:
        diff = -diff
    spread = math.hypot(a["std"].get(metric, 0.0), b["std"].get(metric, 0.0))
    if abs(diff) <= spread:
        return 0
    return 1 if diff > 0 else -1


def best(rows: list[dict], metric: str) -> dict | None:
    """The row with the highest mean of ``metric``."""
    rows = [r for r in rows if r is not None and not math.isnan(r["mean"].get(metric, math.nan))]
    return max(rows, key=lambda r: r["mean"][metric]) if rows else None


def _rows(res: Results, experiment: str, key: str, prefix: str, group: str | None = None) -> list[dict]:
    s = res.setting(experiment, key)
    if s is None:
        return []
    return [r for r in s["rows"] if r["method"].startswith(prefix) and (group is None or r["group"] == group)]


def _label(key: str) -> str:
    return {
        "letter-k5-noise0": "Letter clean",
        "letter-k5-noise50": "Letter 50% noise",
        "fashion-mnist-k2-noise50": "F-MNIST 50% noise",
        "fashion-mnist-k9": "F-MNIST",
        "fashion-mnist-E8-k2": "F-MNIST, 8 experts",
        "letter-k5-ratio50": "Letter long tail",
        "fashion-mnist-k2-ratio100": "F-MNIST long tail",
    }.get(key, key)


def _verdict(outcomes: list[bool]) -> str:
    if not outcomes:
        return NOT_TESTABLE
    return REPRODUCED if sum(outcomes) > len(outcomes) / 2 else NOT_REPRODUCED


Measure = Callable[[Results], tuple[str, str, list[str]]]  # -> (measured, verdict, experiments used)


def _missing(*experiments: str) -> tuple[str, str, list[str]]:
    return (f"no results of {', '.join(experiments)} in the files read", PENDING, list(experiments))


def sander_moe(res: Results) -> tuple[str, str, list[str]]:
    key = "fashion-mnist-E8-k2"
    sparse, hard = res.row("moe", key, "router [sparse]"), res.row("moe", key, "hard top-2 router")
    if sparse is None or hard is None:
        return _missing("moe")
    c = compare(sparse, hard, "accuracy")
    text = (
        f"accuracy: sparse router {fmt(sparse, 'accuracy')}, hard top-2 {fmt(hard, 'accuracy')}; active "
        f"experts per test token {fmt(sparse, 'active experts')} against 2"
    )
    return text, REPRODUCED if c >= 0 else NOT_REPRODUCED, ["moe"]


def sander_pruning(res: Results) -> tuple[str, str, list[str]]:
    keys = res.keys("pruning")
    if not keys:
        return _missing("pruning")
    parts, outcomes = [], []
    for key in keys:
        mag = res.row("pruning", key, "topk_mag [magnitude]")
        ste = res.row("pruning", key, "hard top-k, straight-through")
        one = res.row("pruning", key, "one-shot magnitude")
        if mag is None or ste is None:
            continue
        pct = key.rsplit("sparsity", 1)[-1]
        parts.append(
            f"{pct}%: topk_mag {fmt(mag, 'accuracy (hard)')}, straight-through "
            f"{fmt(ste, 'accuracy (hard)')}, one-shot {fmt(one, 'accuracy (hard)')}"
        )
        outcomes.append(compare(mag, ste, "accuracy (hard)") >= 0)
    if not parts:
        return _missing("pruning")
    return "; ".join(parts), _verdict(outcomes), ["pruning"]


def soft_knn(res: Results) -> tuple[str, str, list[str]]:
    key = "fashion-mnist-k9"
    metric = "9-NN acc"
    soft = [
        r for r in (res.row("knn", key, "soft kNN [soft]"), res.row("knn", key, "soft kNN [entropic]")) if r
    ]
    raw, ce = res.row("knn", key, "raw-pixel kNN"), res.row("knn", key, "CE embedding + kNN")
    if not soft or raw is None or ce is None:
        return _missing("knn")
    op = best(soft, metric)
    text = (
        f"{op['method']} {fmt(op, metric)}, raw-pixel kNN {fmt(raw, metric)}, CE embedding + kNN "
        f"{fmt(ce, metric)} (entropic = SOFT's two-anchor plan, exactly)"
    )
    ok = compare(op, raw, metric) > 0 and compare(op, ce, metric) >= 0
    return text, REPRODUCED if ok else NOT_REPRODUCED, ["knn"]


def _operator_vs_field(res: Results, experiment: str, keys: list[str], name: str, prefix: str, metric_of):  # noqa: ANN001, ANN202
    """Operator ``name`` against the best other operator of each setting: (parts, outcomes)."""
    parts, outcomes = [], []
    for key in keys:
        metric = metric_of(key)
        row = res.row(experiment, key, f"{prefix}[{name}]")
        others = [
            r for r in _rows(res, experiment, key, prefix, "operator") if r["method"] != f"{prefix}[{name}]"
        ]
        other = best(others, metric)
        if row is None or other is None:
            continue
        parts.append(
            f"{_label(key)}: {name} {fmt(row, metric)}, best other {other['method']} {fmt(other, metric)}"
        )
        outcomes.append(compare(row, other, metric) >= 0)
    return parts, outcomes


def _topk_metric(key: str) -> str:
    return "top5" if "-k5-" in key else "top2"


def lapsum(res: Results) -> tuple[str, str, list[str]]:
    parts, outcomes = _operator_vs_field(
        res, "classification", res.keys("classification"), "lapsum", "top-k CE ", _topk_metric
    )
    if not parts:
        return _missing("classification")
    return "; ".join(parts), _verdict(outcomes), ["classification"]


def dftopk(res: Results) -> tuple[str, str, list[str]]:
    keys = res.keys("recsys")
    parts, outcomes = _operator_vs_field(
        res, "recsys", keys, "dftopk", "BCE(mask) ", lambda k: "Recall@10@20"
    )
    if not parts:
        return _missing("recsys")
    listnet = best([res.row("recsys", k, "ListNet (ratings)") for k in keys], "Recall@10@20")
    extra = f"; ListNet on the ratings {fmt(listnet, 'Recall@10@20')}" if listnet else ""
    return "Recall@10@20: " + "; ".join(parts) + extra, _verdict(outcomes), ["recsys"]


def garcin_noise(res: Results) -> tuple[str, str, list[str]]:
    parts, outcomes = [], []
    for key in res.keys("classification"):
        if "noise0" in key:
            continue
        metric = _topk_metric(key)
        hinge = res.row("classification", key, "top-k hinge [Garcin, balanced]")
        ce = res.row("classification", key, "cross-entropy")
        if hinge is None or ce is None:
            continue
        parts.append(f"{_label(key)} {metric}: hinge {fmt(hinge, metric)}, cross-entropy {fmt(ce, metric)}")
        outcomes.append(compare(hinge, ce, metric) > 0)
    if not parts:
        return _missing("classification")
    return "; ".join(parts), _verdict(outcomes), ["classification"]


def garcin_tail(res: Results) -> tuple[str, str, list[str]]:
    parts, outcomes = [], []
    for key in res.keys("imbalanced"):
        k = key.split("-k", 1)[1].split("-", 1)[0]
        metric = f"top{k} tail"
        imb = res.row("imbalanced", key, "top-k hinge [imbalanced]")
        bal = res.row("imbalanced", key, "top-k hinge [balanced]")
        ce = res.row("imbalanced", key, "cross-entropy")
        la = res.row("imbalanced", key, "logit-adjusted CE")
        if imb is None or bal is None or ce is None:
            continue
        parts.append(
            f"{_label(key)} {metric}: imbalanced hinge {fmt(imb, metric)}, balanced {fmt(bal, metric)}, "
            f"CE {fmt(ce, metric)}, logit-adjusted CE {fmt(la, metric)}"
        )
        outcomes.append(compare(imb, ce, metric) > 0 and compare(imb, bal, metric) >= 0)
    if not parts:
        return _missing("imbalanced")
    return "; ".join(parts), _verdict(outcomes), ["imbalanced"]


def berthet(res: Results) -> tuple[str, str, list[str]]:
    parts, outcomes = [], []
    for key in res.keys("classification"):
        metric = _topk_metric(key)
        pert = res.row("classification", key, "top-k CE [perturbed]")
        others = [
            r
            for r in _rows(res, "classification", key, "top-k CE ", "operator")
            if r["method"] not in ("top-k CE [perturbed]", "top-k CE [subset]")
        ]
        other = best(others, metric)
        if pert is None or other is None:
            continue
        parts.append(
            f"{_label(key)}: perturbed {fmt(pert, metric)}, best deterministic {other['method']} "
            f"{fmt(other, metric)}"
        )
        outcomes.append(compare(pert, other, metric) >= 0)
    if not parts:
        return _missing("classification")
    return "; ".join(parts), _verdict(outcomes), ["classification"]


def sorting(res: Results) -> tuple[str, str, list[str]]:
    parts, outcomes = [], []
    names = ("neuralsort", "softsort", "odd_even", "bitonic")
    for key in res.keys("classification"):
        metric = _topk_metric(key)
        ce = res.row("classification", key, "cross-entropy")
        rows = [res.row("classification", key, f"top-k CE [{n}]") for n in names]
        op = best([r for r in rows if r], metric)
        if op is None or ce is None:
            continue
        parts.append(f"{_label(key)}: {op['method']} {fmt(op, metric)}, cross-entropy {fmt(ce, metric)}")
        outcomes.append(compare(op, ce, metric) > 0)
    if not parts:
        return _missing("classification")
    return "; ".join(parts), _verdict(outcomes), ["classification"]


def btcell(res: Results) -> tuple[str, str, list[str]]:
    keys = res.keys("listops")
    parts, outcomes = [], []
    for key in keys:
        rows = res.setting("listops", key)["rows"]
        one = next((r for r in rows if r["method"].endswith("[one-soft]")), None)
        hard = next((r for r in rows if r["method"].endswith("[hard]")), None)
        chain = next((r for r in rows if r["method"] == "left-to-right cell"), None)
        if one is None or hard is None or chain is None:
            continue
        for metric in ("iid", "longer", "more args"):
            parts.append(
                f"{metric}: one-soft {fmt(one, metric)}, hard beam {fmt(hard, metric)}, "
                f"left-to-right {fmt(chain, metric)}"
            )
        for metric in ("longer", "more args"):
            outcomes.append(compare(one, hard, metric) > 0 and compare(one, chain, metric) > 0)
    if not parts:
        return _missing("listops")
    return "; ".join(parts), _verdict(outcomes), ["listops"]


def modification(res: Results) -> tuple[str, str, list[str]]:
    if "mod" not in res.experiments:
        return "pending: the mixture-of-depths experiment has not been merged or run yet", PENDING, ["mod"]
    parts, outcomes = [], []
    frac = "fraction processed (test)"
    for key, s in res.experiments["mod"].items():
        rows = s["rows"]
        pairs = [
            (
                next((r for r in rows if r["method"].startswith("top-k (")), None),
                next((r for r in rows if r["method"].startswith("threshold-p (")), None),
            ),
            (
                next((r for r in rows if r["method"] == "top-k [sparse]"), None),
                next((r for r in rows if r["method"] == "threshold-p [sparse]"), None),
            ),
        ]
        dense = next((r for r in rows if r["method"].startswith("dense")), None)
        if dense is not None:
            parts.append(f"{key}: dense {fmt(dense, 'test loss')}")
        for topk, thr in pairs:
            if topk is None or thr is None:
                continue
            parts.append(
                f"{topk['method']} {fmt(topk, 'test loss')} at {fmt(topk, frac)} of tokens, "
                f"{thr['method']} {fmt(thr, 'test loss')} at {fmt(thr, frac)}"
            )
            # the claim: threshold-p is no worse than top-k (test loss, lower is better)
            # while processing at most as many tokens
            no_worse = compare(thr, topk, "test loss", lower_is_better=True) >= 0
            outcomes.append(no_worse and thr["mean"][frac] <= topk["mean"][frac] + 1e-9)
    if not outcomes:
        return _missing("mod")
    return "; ".join(parts), _verdict(outcomes), ["mod"]


def lcron(res: Results) -> tuple[str, str, list[str]]:
    return (
        "needs a multi-stage cascade with per-stage labels (RecFlow's retrieval -> pre-ranking funnel); "
        "no such data is on this machine, and a cascade built on MovieLens would test a funnel we invented. "
        "softtopk.losses.lcron_loss has unit tests only",
        NOT_TESTABLE,
        [],
    )


@dataclass(frozen=True)
class Claim:
    """One row of the table."""

    paper: str
    claim: str
    command: str
    measure: Measure


CLAIMS: list[Claim] = [
    Claim(
        "Sander et al. 2023 (sparse top-k)",
        "A sparse soft top-k router trains a mixture of experts as well as the hard top-k router, with "
        "about k experts per token",
        "softtopk experiments moe",
        sander_moe,
    ),
    Claim(
        "Sander et al. 2023 (sparse top-k)",
        "Training through the soft top-k in magnitude prunes a network at high sparsity at least as well as "
        "training through the hard top-k (straight-through)",
        "softtopk experiments pruning",
        sander_pruning,
    ),
    Claim(
        "Xie et al. 2020 (SOFT)",
        "An end-to-end kNN classifier trained through the OT top-k beats kNN on raw inputs and matches a "
        "network trained with cross-entropy",
        "softtopk experiments knn",
        soft_knn,
    ),
    Claim(
        "Struski et al. 2025 (LapSum)",
        "LapSum's soft top-k trains top-k classifiers at least as well as the other relaxations",
        "softtopk experiments classification",
        lapsum,
    ),
    Claim(
        "Zhu et al. 2025 (DFTopK)",
        "DFTopK's un-normalised sigmoid top-k gives better top-k recall in recommendation than the "
        "normalised relaxations (LapSum, sparse, NeuralSort)",
        "softtopk experiments recsys",
        dftopk,
    ),
    Claim(
        "Garcin et al. 2022 (noised top-k hinge)",
        "The smoothed top-k hinge loss beats cross-entropy on top-k accuracy under label noise",
        "softtopk experiments classification",
        garcin_noise,
    ),
    Claim(
        "Garcin et al. 2022 (noised top-k hinge)",
        "On heavy-tailed classes the imbalanced top-k hinge (LDAM margins) raises top-k accuracy on the rare "
        "classes over cross-entropy and the balanced hinge",
        "softtopk experiments imbalanced",
        garcin_tail,
    ),
    Claim(
        "Berthet et al. 2020 (perturbed optimizers)",
        "The perturbed top-k (a Monte-Carlo mean of hard masks) trains as well as deterministic relaxations",
        "softtopk experiments classification",
        berthet,
    ),
    Claim(
        "Zhang et al. 2024 (MoDification)",
        "Threshold-p token routing matches top-k routing in a mixture-of-depths model at the same "
        "fraction of tokens processed",
        "softtopk experiments mod",
        modification,
    ),
    Claim(
        "Ray Chowdhury and Caragea 2023 (BT-Cell)",
        "A beam-tree cell with the relaxed (OneSoft) beam top-k generalises on ListOps to longer expressions "
        "and more arguments, beyond a hard beam and a non-parsing cell",
        "softtopk experiments listops",
        btcell,
    ),
    Claim(
        "NeuralSort / SoftSort / diffsort (Petersen et al. 2022)",
        "Top-k cross-entropy over relaxed sorting beats softmax cross-entropy on top-k accuracy",
        "softtopk experiments classification",
        sorting,
    ),
    Claim(
        "Wang et al. 2025 (LCRON)",
        "Training a cascade end to end with a relaxed joint Recall@k@m loss beats training its stages apart",
        "(none)",
        lcron,
    ),
]


def claims_table(res: Results) -> str:
    """The Markdown page: the table, then where each experiment's numbers come from."""
    lines = [
        "| paper | claim | command | measured (mean ± std over the seeds) | verdict |",
        "|---|---|---|---|---|",
    ]
    used: list[str] = []
    for c in CLAIMS:
        measured, verdict, experiments = c.measure(res)
        refs = []
        for e in experiments:
            if e in res.sources:
                if e not in used:
                    used.append(e)
                refs.append(f"[{used.index(e) + 1}]")
        cmd = f"`{c.command}`" if c.command.startswith("softtopk") else c.command
        cell = measured + (" " + " ".join(refs) if refs else "")
        lines.append(f"| {c.paper} | {c.claim} | {cmd} | {cell} | **{verdict}** |")
    lines += ["", "Sources:", ""]
    for i, e in enumerate(used, start=1):
        s = res.sources[e]
        lines.append(f"{i}. `{e}`: `{s.path}`, run {s.date}, `{s.command}`, protocol: {s.protocol}")
    return "\n".join(lines)


HEADER = """# Paper claims, checked

Each paper of the library, its claim in one line, the experiment here that tests it (the
command regenerates the numbers), what was measured (test mean ± sample std over 3 seeds
unless the source says otherwise) and the verdict. Rule: A beats B when the difference of
the means exceeds the seed spread sqrt(std_A^2 + std_B^2); a claim is reproduced when the
comparisons it names go its way in the majority of the settings. The experiments are small
CPU versions of the papers' (MLPs, thousands of rows, minutes per run): a claim not
reproduced here is not refuted at the papers' scale, but it did not hold at this one.

Generated by `python -m softtopk.experiments.claims` from the results files listed under
the table; do not edit by hand.
"""


def default_paths(root: Path = Path("docs/experiments")) -> list[Path]:
    """``root/results.json`` and ``root/runs/*/results.json``, those that exist."""
    paths = [root / "results.json", *sorted(root.glob("runs/*/results.json"))]
    return [p for p in paths if p.is_file()]


def write_claims(paths: Sequence[Path], out: Path) -> Path:
    """Writes the claims page built from ``paths`` to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(HEADER + "\n" + claims_table(Results(paths)) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m softtopk.experiments.claims", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "results", nargs="*", type=Path, help="results.json files (default: docs/experiments)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/experiments/claims.md"))
    args = parser.parse_args(argv)
    paths = args.results or default_paths()
    if not paths:
        print("no results.json found; pass the files to read", file=sys.stderr)
        return 2
    print(f"wrote {write_claims(paths, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

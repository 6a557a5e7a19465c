"""The protocol shared by every experiment: a temperature grid on validation, then seeds.

Every operator gets the same small grid of temperatures (multiples of its registered
default, so operators whose temperatures mean different things are treated alike). One
run per grid value with seed 0 picks the temperature with the best *validation* score;
seeds 1, 2, ... then run at that temperature, and the table reports the mean and the
sample standard deviation of the *test* metrics over all seeds (the seed-0 run at the
chosen temperature is one of them). Baselines without a temperature run the seeds only.
Each run trains on the training split minus the validation split, so the test set is
never seen before the final numbers.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..registry import OPERATORS, Operator

#: Multipliers of each operator's registered default temperature (an experiment may override).
DEFAULT_GRID = (0.1, 1.0, 10.0)


@dataclass
class RunResult:
    """What one training run returns.

    Attributes:
        test: test metrics (name -> value; higher is better unless the experiment says so).
        val: validation metrics; the grid search reads ``val[select]``.
        losses: the training loss after each epoch (or evaluation step).
        seconds: wall time of the run, training and evaluation.
        cpu_seconds: CPU time of this process during the run (all threads); on a shared
            machine it is a steadier measure of cost than the wall time.
        extra: anything else worth keeping in the JSON (e.g. per-expert load).
    """

    test: dict[str, float]
    val: dict[str, float]
    losses: list[float]
    seconds: float = math.nan
    cpu_seconds: float = math.nan
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class Method:
    """One row of a table: an operator (with a temperature grid) or a baseline.

    ``run(temperature, seed)`` trains and evaluates once; ``temperatures`` is the grid
    (``[None]`` for a baseline that has none).
    """

    name: str
    group: str  # "operator" or "baseline"
    run: Callable[[float | None, int], RunResult]
    temperatures: list[float | None] = field(default_factory=lambda: [None])
    note: str = ""


@dataclass
class Row:
    """A method's outcome in one setting (one line of the Markdown table)."""

    method: str
    group: str
    temperature: float | None
    grid: dict[str, float]  # str(temperature) -> validation score of seed 0
    mean: dict[str, float]
    std: dict[str, float]
    seconds: float  # mean wall seconds per run
    cpu_seconds: float  # mean CPU seconds per run
    losses: list[float]  # mean training-loss curve over seeds
    runs: list[dict[str, object]]  # every run, for the JSON
    note: str = ""


@dataclass
class Setting:
    """One table of an experiment: its methods and how to read them."""

    key: str
    title: str
    methods: list[Method]
    select: str  # validation metric that picks the temperature (higher is better)
    metrics: list[str]  # test metrics shown, headline first
    description: str = ""
    lower_is_better: tuple[str, ...] = ()
    # extra figures of the report: plots(result, folder, stem) -> paths of the PNGs written
    plots: Callable[..., list] | None = None


@dataclass
class SettingResult:
    """The rows of one setting, with what was run."""

    setting: Setting
    rows: list[Row]
    seeds: int
    seconds: float


def mask_operators(
    only: Sequence[str] | None = None,
    *,
    shape: tuple[int, int] | None = None,
    kinds: tuple[str, ...] = ("mask",),
) -> tuple[list[Operator], list[str]]:
    """The registered operators an experiment can use, and notes on those left out.

    Keeps the operators of the given ``kinds`` whose output depends on the temperature
    (a temperature-free operator, the hard mask, is each experiment's explicit baseline),
    whose ``bench_max_elements`` admits the experiment's largest call, ``shape`` = (rows,
    n) (an O(n^2) operator registers such a limit), and, if ``only`` is given, whose name
    is in it.
    """
    kept, notes = [], []
    if only:
        unknown = sorted(set(only) - set(OPERATORS))
        if unknown:
            raise ValueError(f"only names unknown operator(s) {unknown}; known: {', '.join(OPERATORS)}")
    for op in OPERATORS.values():
        if only and op.name not in only:
            continue
        if op.kind not in kinds:
            continue
        if not depends_on_temperature(op):
            continue
        if shape is not None and op.bench_max_elements is not None:
            rows, n = shape
            if rows * n > op.bench_max_elements:
                notes.append(
                    f"{op.name}: left out, calls of {rows} x {n} exceed its limit of "
                    f"{op.bench_max_elements} elements"
                )
                continue
        kept.append(op)
    return kept, notes


def depends_on_temperature(op: Operator) -> bool:
    """Whether ``op``'s output changes with the temperature on a fixed probe input."""
    probe = torch.tensor([[0.3, -1.2, 2.0, 0.9, 0.1, -0.4]], dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(0)
        a = op(probe, 2, dim=-1, temperature=op.temperature)
        torch.manual_seed(0)
        b = op(probe, 2, dim=-1, temperature=op.temperature * 30.0)
    return not torch.allclose(a, b)


def temperature_grid(op: Operator, grid: Sequence[float]) -> list[float | None]:
    """``op``'s registered default temperature times each multiplier of ``grid``."""
    return [float(f"{op.temperature * m:.6g}") for m in grid]


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    mean = statistics.fmean(finite)
    return mean, statistics.stdev(finite) if len(finite) > 1 else 0.0


def _record(temperature: float | None, seed: int, r: RunResult) -> dict[str, object]:
    return {
        "temperature": temperature,
        "seed": seed,
        "test": r.test,
        "val": r.val,
        "seconds": r.seconds,
        "cpu_seconds": r.cpu_seconds,
        "extra": r.extra,
    }


def run_method(method: Method, select: str, seeds: int, progress: Callable[[str], None] | None = None) -> Row:
    """Grid on validation with seed 0, then seeds 1.. at the chosen temperature."""
    grid_runs: dict[float | None, RunResult] = {}
    for t in method.temperatures:
        if progress:
            progress(f"{method.name} t={t} seed=0")
        grid_runs[t] = method.run(t, 0)

    def score(t: float | None) -> float:
        v = grid_runs[t].val.get(select, math.nan)
        return -math.inf if math.isnan(v) else v

    chosen = max(method.temperatures, key=score)
    results = [grid_runs[chosen]]
    for seed in range(1, seeds):
        if progress:
            progress(f"{method.name} t={chosen} seed={seed}")
        results.append(method.run(chosen, seed))
    names = list(results[0].test)
    mean, std = {}, {}
    for name in names:
        mean[name], std[name] = _mean_std([r.test.get(name, math.nan) for r in results])
    length = min(len(r.losses) for r in results)
    losses = [statistics.fmean(r.losses[i] for r in results) for i in range(length)]
    runs = [_record(t, 0, r) for t, r in grid_runs.items()]
    runs += [_record(chosen, s, r) for s, r in enumerate(results[1:], start=1)]
    every = [*grid_runs.values(), *results[1:]]
    return Row(
        method=method.name,
        group=method.group,
        temperature=chosen,
        grid={str(t): grid_runs[t].val.get(select, math.nan) for t in method.temperatures if t is not None},
        mean=mean,
        std=std,
        seconds=statistics.fmean(r.seconds for r in every),
        cpu_seconds=statistics.fmean(r.cpu_seconds for r in every),
        losses=losses,
        runs=runs,
        note=method.note,
    )


def run_setting(
    setting: Setting, seeds: int = 3, progress: Callable[[str], None] | None = None
) -> SettingResult:
    """Runs every method of ``setting`` under the shared protocol."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    start = time.perf_counter()
    rows = []
    for method in setting.methods:
        rows.append(
            run_method(
                method,
                setting.select,
                seeds,
                (lambda s: progress(f"{setting.key}: {s}")) if progress else None,
            )
        )
    return SettingResult(setting, rows, seeds, time.perf_counter() - start)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds torch's global generator and returns a fresh generator with the same seed."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def timed(fn: Callable[[], RunResult]) -> RunResult:
    """Runs ``fn`` and stores its wall and CPU time in the result."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu
    return result

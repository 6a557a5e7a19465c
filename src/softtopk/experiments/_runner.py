"""The protocol shared by every experiment: the same number of configurations for every method.

Every method, baselines included, has a grid of N configurations (:data:`PROTOCOL`
states the rule): operators and the straight-through hard top-k their temperature
(multiples of the registered default, so operators whose temperatures mean different
things are treated alike), cross-entropy its label smoothing, other trained baselines
their learning rate; only a baseline that trains nothing runs one configuration. One run
per configuration with seed 0 picks the configuration with the best *validation* score;
seeds 1, 2, ... then run at it, and the table reports the mean and the sample standard
deviation of the *test* metrics over all seeds (the seed-0 run at the chosen
configuration is one of them). Each run trains on the training split minus the
validation split and keeps its checkpoint with the best validation score, so the test
set is never seen before the final numbers.
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

#: Cross-entropy's label-smoothing values; a grid of size N takes the first N (sorted).
SMOOTHING_ORDER = (0.0, 0.1, 0.3, 0.05, 0.2, 0.4, 0.02, 0.15, 0.5)

#: Names the protocol in ``results.json`` (readers tell runs of other protocols apart).
PROTOCOL_VERSION = "equal-configurations-1"

#: The protocol, as the report header states it.
PROTOCOL = (
    "every method, baselines included, gets the same number N of configurations (N = the "
    "temperature grid's size, 3 by default), each trained with seed 0 and scored on the validation "
    "split (carved from the training data; no test row is in it): the operators and the "
    "straight-through hard top-k (hard mask forward, (I - 11^T/n)/t backward) their temperature "
    "(multiples of the registered default), cross-entropy its label smoothing (0, 0.1, 0.3), the "
    "other trained baselines their learning rate (x1/3, x1, x3); a baseline that trains nothing "
    "(raw-pixel kNN, popularity) runs once. Every trained run keeps the checkpoint with the best "
    "validation score (early stopping, checked every epoch or evaluation step). The best "
    "configuration on validation then runs the other seeds; tables give the test mean ± sample std "
    "over the seeds. Stochastic operators draw fresh noise on every call from a generator seeded "
    "per run."
)


def smoothing_grid(n: int) -> list[float | None]:
    """Cross-entropy's label-smoothing grid of size ``n``: (0, 0.1, 0.3) for n = 3."""
    if not 1 <= n <= len(SMOOTHING_ORDER):
        raise ValueError(f"a label-smoothing grid has 1 to {len(SMOOTHING_ORDER)} values, got n = {n}")
    return sorted(SMOOTHING_ORDER[:n])


def lr_grid(lr: float, n: int) -> list[float | None]:
    """A learning-rate grid of size ``n`` around ``lr``, a factor 3 apart: (lr/3, lr, 3 lr) for n = 3."""
    if n < 1:
        raise ValueError(f"a learning-rate grid needs n >= 1, got {n}")
    return [float(f"{lr * 3.0 ** (i - (n - 1) / 2):.3g}") for i in range(n)]


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
    """One row of a table: an operator or a baseline, with its grid of configurations.

    ``run(value, seed)`` trains and evaluates once with one value of the method's knob;
    ``temperatures`` is the grid of that knob (the temperature of an operator, the label
    smoothing of cross-entropy, ...), and ``knob`` names it in the report. A baseline
    that trains nothing has the grid ``[None]`` and ``untrained=True``; every other
    method of a setting must have a grid of the same size (:func:`run_setting` checks).
    """

    name: str
    group: str  # "operator" or "baseline"
    run: Callable[[float | None, int], RunResult]
    temperatures: list[float | None] = field(default_factory=lambda: [None])
    note: str = ""
    knob: str = "temperature"
    untrained: bool = False


@dataclass
class Row:
    """A method's outcome in one setting (one line of the Markdown table)."""

    method: str
    group: str
    temperature: float | None  # the chosen value of ``knob``
    grid: dict[str, float]  # str(value) -> validation score of seed 0
    mean: dict[str, float]
    std: dict[str, float]
    seconds: float  # mean wall seconds per run
    cpu_seconds: float  # mean CPU seconds per run
    losses: list[float]  # mean training-loss curve over seeds
    runs: list[dict[str, object]]  # every run, for the JSON
    note: str = ""
    knob: str = "temperature"


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
    k: float | None = None,
    kinds: tuple[str, ...] = ("mask",),
) -> tuple[list[Operator], list[str]]:
    """The registered operators an experiment can use, and notes on those left out.

    Keeps the operators of the given ``kinds`` (other routes to a registered operator,
    ``route_of``, would repeat its results and are skipped) whose output depends on the temperature
    (a temperature-free operator, the hard mask, is each experiment's explicit baseline),
    whose ``bench_max_elements`` admits the experiment's largest call, ``shape`` = (rows,
    n) (an O(n^2) operator registers such a limit), whose ``max_kn`` admits rows x ``k``
    x n (an O(k n)-memory operator registers it), and, if ``only`` is given, whose name
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
        if op.kind not in kinds or op.route_of:
            continue  # another kind, or another route to a registered operator
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
        if shape is not None and k is not None and op.max_kn is not None:
            rows, n = shape
            if rows * k * n > op.max_kn:
                notes.append(
                    f"{op.name}: left out, calls of {rows} x {n} at k = {k:g} need O(k n) memory "
                    f"beyond its limit of {op.max_kn} elements"
                )
                continue
        kept.append(op)
    return kept, notes


def depends_on_temperature(op: Operator) -> bool:
    """Whether ``op``'s output changes with the temperature on a fixed probe input."""
    probe = torch.tensor([[0.3, -1.2, 2.0, 0.9, 0.1, -0.4]], dtype=torch.float64)
    with torch.no_grad():
        a = op(probe, 2, -1, temperature=op.temperature, generator=torch.Generator().manual_seed(0))
        b = op(probe, 2, -1, temperature=op.temperature * 30.0, generator=torch.Generator().manual_seed(0))
    return not torch.allclose(a, b)


def bind(op: Operator, generator: torch.Generator | None) -> Callable[..., torch.Tensor]:
    """``op`` as a plain ``fn(x, k, dim=-1, *, temperature)`` that draws its noise from ``generator``.

    For layers and losses that take a callable ``method``: a stochastic operator then uses
    the run's own generator (fresh noise on every call, the same sequence for a seed).
    """

    def fn(x: torch.Tensor, k: object, dim: int = -1, *, temperature: float) -> torch.Tensor:
        return op(x, k, dim, temperature=temperature, generator=generator)

    fn.__name__ = op.name
    return fn


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


def check_grids(setting: Setting) -> None:
    """Raises ValueError unless every trained method of ``setting`` has a grid of the same size.

    A method with ``untrained=True`` must have the single configuration ``[None]``.
    """
    sizes = {m.name: len(m.temperatures) for m in setting.methods if not m.untrained}
    for m in setting.methods:
        if m.untrained and list(m.temperatures) != [None]:
            raise ValueError(f"{setting.key}: untrained method {m.name!r} must have the grid [None]")
        if not m.temperatures:
            raise ValueError(f"{setting.key}: method {m.name!r} has an empty grid")
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"{setting.key}: every trained method needs the same number of configurations, got {sizes} "
            "(give a baseline lr_grid or smoothing_grid, or mark one that trains nothing untrained=True)"
        )


def run_method(method: Method, select: str, seeds: int, progress: Callable[[str], None] | None = None) -> Row:
    """Grid on validation with seed 0, then seeds 1.. at the chosen configuration."""
    grid_runs: dict[float | None, RunResult] = {}
    for t in method.temperatures:
        if progress:
            progress(f"{method.name} {_short(method.knob)}={t} seed=0")
        grid_runs[t] = method.run(t, 0)

    def score(t: float | None) -> float:
        v = grid_runs[t].val.get(select, math.nan)
        return -math.inf if math.isnan(v) else v

    chosen = max(method.temperatures, key=score)
    results = [grid_runs[chosen]]
    for seed in range(1, seeds):
        if progress:
            progress(f"{method.name} {_short(method.knob)}={chosen} seed={seed}")
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
        knob=method.knob,
    )


def _short(knob: str) -> str:
    return "t" if knob == "temperature" else knob.replace(" ", "_")


def run_setting(
    setting: Setting, seeds: int = 3, progress: Callable[[str], None] | None = None
) -> SettingResult:
    """Runs every method of ``setting`` under the shared protocol."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    check_grids(setting)
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

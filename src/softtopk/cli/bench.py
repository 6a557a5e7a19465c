"""``softtopk bench``: time and peak memory of every operator against baselines, as ratios.

Every figure is also given as a ratio to ``torch.topk``'s forward, measured in the same
run, because absolute times on a shared machine are noisy while ratios are stable.
Baselines in the same run:

* ``torch.topk`` (values; the floor a user would otherwise pick) and ``torch.sort``;
* ``<op>[sort]``: the O(n log n) sort + cumulative-sum route of the same operator
  (``solver="sort"``), the best the papers' sort route can do in vectorised torch;
* ``soft[sinkhorn-200]``: two-anchor SOFT with 200 Sinkhorn iterations, as published;
* the published packages that are installed (group ``peer``, see :mod:`._peers`):
  torchsort ``soft_rank``, difftopk NeuralSort top-k, pytopk ``NoisedTopK``.

``--suite sort`` times soft_rank / soft_sort (l2 and kl) and exact isotonic regression
instead, against ``torch.sort`` and, when it is installed, torchsort's C++ operators
(the same maths), and prints torchsort's time over ours for every size.

Timing: two warm-up calls, then the median of at least ``--repeat`` calls (more while the
total stays under ``--budget`` seconds); CUDA timings synchronise. Peak memory is the
largest amount allocated during one call beyond what was allocated before it (CPU: the
profiler's allocation events; CUDA: ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import __version__
from ..isotonic import isotonic_regression, soft_rank, soft_sort
from ..ops import soft_sinkhorn_mask, topk_mask
from ..registry import OPERATORS

QUICK_SIZES = [(64, 100), (64, 1000), (64, 10_000), (64, 65_536)]
FULL_SIZES = QUICK_SIZES + [(16, 100_000), (4, 1_000_000), (1, 400_000), (1, 4_000_000)]
SORT_SIZES = [(256, 1000), (4096, 100), (1, 100_000), (16, 100_000)]


@dataclass
class Contender:
    """Something to time: ``fn(x, k)`` returns a tensor whose backward is timed too."""

    name: str
    group: str  # "floor", "operator", "sort route", "published"
    fn: Callable[[Tensor, int], Tensor]
    max_elements: int = 1 << 62  # skip larger problems (reason printed)
    max_n: int = 1 << 62  # skip longer rows (O(n^2) peers)
    note: str = ""


@dataclass
class Row:
    """One measurement: a contender at one size in one mode (CSV/JSON row)."""

    contender: str
    group: str
    mode: str
    batch: int
    n: int
    k: int
    dtype: str
    device: str
    ms: float
    ratio: float
    peak_bytes: float
    peak_ratio: float
    repeats: int
    note: str = ""


@dataclass
class Config:
    """What to sweep and how to time it."""

    sizes: list[tuple[int, int]] = field(default_factory=lambda: list(QUICK_SIZES))
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    temperature: float | None = None
    repeat: int = 5
    budget: float = 1.0
    contenders: list[str] | None = None
    skip_slow_after: float = 20.0
    suite: str = "topk"
    ks: list[str] = field(default_factory=lambda: ["n/256"])
    peers: bool = True


def default_k(n: int) -> int:
    """The budget used across the sweep: n/256, at least 1 (k = 256 at n = 65536)."""
    return max(1, n // 256)


def parse_k(spec: str, n: int) -> int:
    """A budget for rows of n: an int (``"10"``) or a fraction of n (``"n/256"``), at least 1, at most n."""
    spec = spec.strip().lower()
    try:
        k = n // int(spec[2:]) if spec.startswith("n/") else int(spec)
    except ValueError:
        raise ValueError(f"k must be an int or n/<int>, got {spec!r}") from None
    return min(max(1, k), n)


def contenders(temperature: float | None, peers: bool = True) -> list[Contender]:
    def op(name: str) -> Callable[[Tensor, int], Tensor]:
        spec = OPERATORS[name]
        t = spec.temperature if temperature is None else temperature
        return lambda x, k: spec(x, k, temperature=t)

    def sort_route(method: str) -> Callable[[Tensor, int], Tensor]:
        t = 0.1 if temperature is None else temperature
        return lambda x, k: topk_mask(x, k, method=method, temperature=t, solver="sort")

    out = [
        Contender("torch.topk", "floor", lambda x, k: torch.topk(x, k, dim=-1).values),
        Contender("torch.sort", "floor", lambda x, k: torch.sort(x, dim=-1).values),
    ]
    out += [
        Contender(name, "operator", op(name), max_elements=spec.bench_max_elements or 1 << 62)
        for name, spec in OPERATORS.items()
        if name != "hard" and not spec.route_of and spec.kind in ("mask", "magnitude")
    ]
    out += [
        Contender("sparse[sort]", "sort route", sort_route("sparse")),
        Contender("lapsum[sort]", "sort route", sort_route("lapsum")),
        Contender(
            "soft[sinkhorn-200]",
            "published",
            lambda x, k: soft_sinkhorn_mask(x, k, epsilon=0.1, max_iter=200),
            note="Xie et al. 2020: 200 log-domain Sinkhorn iterations, implicit backward",
        ),
    ]
    if peers:
        from ._peers import available

        out += [
            Contender(name, "peer", fn, max_n=max_n, note=note)
            for name, (fn, max_n, note) in available().items()
        ]
    return out


def sort_contenders(temperature: float | None) -> list[Contender]:
    """soft_rank / soft_sort (ours and torchsort's) and isotonic regression; k is unused."""
    t = 1.0 if temperature is None else temperature
    out = [
        Contender("torch.topk", "floor", lambda x, k: torch.topk(x, k, dim=-1).values),
        Contender("torch.sort", "floor", lambda x, k: torch.sort(x, dim=-1).values),
        Contender("isotonic[pav]", "operator", lambda x, k: isotonic_regression(x)),
    ]
    for reg in ("l2", "kl"):
        out.append(
            Contender(
                f"soft_rank[{reg}]",
                "operator",
                lambda x, k, r=reg: soft_rank(x, temperature=t, regularization=r),
            )
        )
        out.append(
            Contender(
                f"soft_sort[{reg}]",
                "operator",
                lambda x, k, r=reg: soft_sort(x, temperature=t, regularization=r),
            )
        )
    try:
        import torchsort  # type: ignore[import-not-found]
    except ImportError:  # the peer is optional; its rows are simply absent
        return out
    for reg in ("l2", "kl"):
        for op in ("soft_rank", "soft_sort"):
            fn = getattr(torchsort, op)
            out.append(
                Contender(
                    f"torchsort.{op}[{reg}]",
                    "published",
                    lambda x, k, f=fn, r=reg: f(x, regularization=r, regularization_strength=t),
                    note="torchsort 0.1.10 C++ (CPU build)",
                )
            )
    return out


def sort_summary(rows: list[Row]) -> str:
    """torchsort time / our time for every size, operator and mode (> 1: we are faster)."""
    by = {(r.contender, r.mode, r.batch, r.n): r.ms for r in rows}
    lines = ["\ntorchsort / softtopk (same run; > 1 means softtopk is faster):"]
    for batch, n in sorted({(r.batch, r.n) for r in rows}, key=lambda s: (s[1], s[0])):
        for op in ("soft_rank", "soft_sort"):
            for reg in ("l2", "kl"):
                for mode in ("fwd", "fwd+bwd"):
                    ours = by.get((f"{op}[{reg}]", mode, batch, n), math.nan)
                    theirs = by.get((f"torchsort.{op}[{reg}]", mode, batch, n), math.nan)
                    if math.isnan(ours) or math.isnan(theirs):
                        continue
                    lines.append(f"  ({batch}, {n}) {op}[{reg}] {mode:<8} {theirs / ours:6.2f}")
        for name in ("isotonic[pav]", "soft_rank[l2]"):
            ms = by.get((name, "fwd", batch, n), math.nan)
            if not math.isnan(ms):
                per = 1e6 * ms / (batch * n * math.log2(max(n, 2)))
                lines.append(f"  ({batch}, {n}) {name} fwd: {per:.3f} ns per n log2 n")
    return "\n".join(lines)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, repeat: int, budget: float) -> tuple[float, int]:
    """Median seconds of ``fn`` after two warm-up calls; at least ``repeat`` calls."""
    for _ in range(2):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > 5.0 and len(times) >= 3:
            break
    return statistics.median(times), len(times)


def peak_memory(fn: Callable[[], object], device: str) -> float:
    """Largest number of bytes allocated during ``fn`` beyond those allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # the profiler's event API is not public; report "unknown"
        return math.nan
    current = peak = 0
    for _, nbytes in deltas:
        current += nbytes
        peak = max(peak, current)
    return float(peak)


def _calls(c: Contender, x: Tensor, k: int) -> dict[str, Callable[[], object]]:
    xr = x.clone().requires_grad_()
    cot: dict[str, Tensor] = {}

    def forward() -> object:
        with torch.no_grad():
            return c.fn(x, k)

    def forward_backward() -> object:
        y = c.fn(xr, k)
        if "v" not in cot or cot["v"].shape != y.shape:
            cot["v"] = torch.randn_like(y)
        y.backward(cot["v"])
        xr.grad = None
        return y

    return {"fwd": forward, "fwd+bwd": forward_backward}


def run(config: Config, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Runs the sweep and returns one row per (contender, size, mode)."""
    torch.manual_seed(0)
    if config.suite == "sort":
        chosen = sort_contenders(config.temperature)
    else:
        chosen = contenders(config.temperature, config.peers)
    if config.contenders:
        unknown = sorted(set(config.contenders) - {c.name for c in chosen})
        if unknown:
            raise ValueError(f"unknown contender(s) {unknown}; known: {[c.name for c in chosen]}")
        chosen = [c for c in chosen if c.name in config.contenders or c.name == "torch.topk"]
    rows: list[Row] = []
    too_slow: set[str] = set()
    cases = [(b, n, k) for b, n in config.sizes for k in sorted({parse_k(s, n) for s in config.ks})]
    for batch, n, k in cases:
        x = torch.randn(batch, n, dtype=config.dtype, device=config.device)
        input_bytes = x.numel() * x.element_size()
        base_fwd, _ = time_call(lambda: torch.topk(x, k, dim=-1), config.device, config.repeat, config.budget)
        for c in chosen:
            for mode, call in _calls(c, x, k).items():
                label = f"{c.name} {mode} {batch}x{n}"
                if progress:
                    progress(label)
                skip = ""
                if x.numel() > c.max_elements:
                    skip = f"skipped: more than {c.max_elements} elements"
                elif n > c.max_n:
                    skip = f"skipped: rows longer than {c.max_n}"
                elif (c.name, mode) in too_slow:
                    skip = f"skipped: a smaller size took over {config.skip_slow_after:.0f} s"
                if skip:
                    rows.append(
                        Row(
                            c.name,
                            c.group,
                            mode,
                            batch,
                            n,
                            k,
                            str(config.dtype),
                            config.device,
                            math.nan,
                            math.nan,
                            math.nan,
                            math.nan,
                            0,
                            skip,
                        )
                    )
                    continue
                seconds, repeats = time_call(call, config.device, config.repeat, config.budget)
                peak = peak_memory(call, config.device)
                if seconds > config.skip_slow_after / 10:
                    too_slow.add((c.name, mode))
                rows.append(
                    Row(
                        c.name,
                        c.group,
                        mode,
                        batch,
                        n,
                        k,
                        str(config.dtype),
                        config.device,
                        seconds * 1e3,
                        seconds / base_fwd,
                        peak,
                        peak / input_bytes,
                        repeats,
                        c.note,
                    )
                )
    return rows


def environment() -> dict[str, object]:
    """Where the figures come from."""
    env: dict[str, object] = {
        "softtopk": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def format_table(rows: list[Row]) -> str:
    """One block per size; each line: contender, mode, ms, x torch.topk fwd, peak memory."""
    lines = []
    sizes = sorted({(r.batch, r.n, r.k) for r in rows}, key=lambda s: (s[1], s[0], s[2]))
    for batch, n, k in sizes:
        lines.append(f"\n({batch}, {n}), k = {k}")
        lines.append(f"  {'contender':<22}{'mode':<9}{'ms':>10}{'x topk':>10}{'peak MB':>10}{'x input':>9}")
        for r in rows:
            if (r.batch, r.n, r.k) != (batch, n, k):
                continue
            if math.isnan(r.ms):
                lines.append(f"  {r.contender:<22}{r.mode:<9}  {r.note}")
                continue
            peak_mb = "n/a" if math.isnan(r.peak_bytes) else f"{r.peak_bytes / 2**20:.1f}"
            peak_x = "n/a" if math.isnan(r.peak_ratio) else f"{r.peak_ratio:.2f}"
            lines.append(
                f"  {r.contender:<22}{r.mode:<9}{r.ms:>10.3f}{r.ratio:>10.2f}{peak_mb:>10}{peak_x:>9}"
            )
    return "\n".join(lines)


def write(rows: list[Row], out: Path) -> tuple[Path, Path]:
    """Writes ``bench.csv`` and ``bench.json`` (rows with the environment) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "bench.csv", out / "bench.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    json_path.write_text(
        json.dumps({"environment": environment(), "rows": [asdict(r) for r in rows]}, indent=1)
    )
    return csv_path, json_path


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"64x1000,1x400000"`` -> [(64, 1000), (1, 400000)]."""
    sizes = []
    for item in text.split(","):
        try:
            batch, n = item.lower().split("x")
            sizes.append((int(batch), int(n)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"sizes must look like 64x1000,1x400000; got {item!r}") from None
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sweep, n up to 65536 (default)")
    parser.add_argument("--full", action="store_true", help="n up to 4e6, batch 64 down to 1")
    parser.add_argument("--sizes", type=parse_sizes, help="explicit sizes, e.g. 64x1000,1x400000")
    parser.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--temperature", type=float, help="one temperature for all operators")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (at least)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement before stopping")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="contenders to run (torch.topk always runs)"
    )
    parser.add_argument(
        "--suite",
        default="topk",
        choices=["topk", "sort"],
        help="topk: every registered top-k operator (default); sort: soft_rank/soft_sort vs torchsort",
    )
    parser.add_argument(
        "--k",
        default="n/256",
        help="budgets, comma-separated ints or fractions n/<int> (default n/256), e.g. 1,10,n/10",
    )
    parser.add_argument("--no-peers", action="store_true", help="leave out the installed published packages")
    parser.add_argument("--no-plot", action="store_true", help="no PNG plots (they need matplotlib)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder for CSV, JSON and PNG"
    )


def main(args: argparse.Namespace) -> int:
    suite = getattr(args, "suite", "topk")
    default_sizes = SORT_SIZES if suite == "sort" else (FULL_SIZES if args.full else QUICK_SIZES)
    sizes = args.sizes or default_sizes
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    config = Config(
        sizes=sizes,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        temperature=args.temperature,
        repeat=args.repeat,
        budget=args.budget,
        contenders=args.only,
        suite=suite,
        ks=args.k.split(","),
        peers=not args.no_peers,
    )
    print(
        f"softtopk {__version__} bench on {config.device}, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; ratios are to torch.topk forward in the same run"
    )
    from ._progress import Progress

    try:
        for spec in config.ks:
            parse_k(spec, 1000)
    except ValueError as err:
        print(f"--k: {err}", file=sys.stderr)
        return 2
    names = {c.name for c in contenders(config.temperature, config.peers)}
    count = len(names & ({"torch.topk", *config.contenders})) if config.contenders else len(names)
    total = len(config.sizes) * len(config.ks) * 2 * count
    with Progress(total, "bench") as bar:
        rows = run(config, progress=bar.step)
    print(format_table(rows))
    if suite == "sort":
        print(sort_summary(rows))
    csv_path, json_path = write(rows, args.out)
    print(f"\nwrote {csv_path} and {json_path}")
    if not args.no_plot:
        from ._plots import plot_bench

        for path in plot_bench(rows, args.out, environment()):
            print(f"wrote {path}")
    return 0

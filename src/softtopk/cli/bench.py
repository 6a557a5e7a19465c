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

``--suite shapes`` times the shapes where top-k is used in practice (MoE routers, LLM
vocabularies, a sparse-attention indexer, SAE latents; :data:`SHAPES`) for the threshold
operators, ``softtopk.topk`` and the router gates, as ratios to ``torch.topk``'s forward
and to a hand-written hard router (``torch.topk`` + softmax + scatter) in the same run,
with the effective bandwidth (bytes read and written over the time), in float32 and
bfloat16, on one thread and on all (``--threads``). On CUDA FlashInfer's ``top_k`` joins
as a contender when it is installed. This suite does not measure peak memory.

``--suite sort`` times soft_rank / soft_sort (l2 and kl) and exact isotonic regression
instead, against ``torch.sort`` and, when it is installed, torchsort's C++ operators
(the same maths), and prints torchsort's time over ours for every size.

Timing: two warm-up calls, then the median of at least ``--repeat`` calls (more while the
total stays under ``--budget`` seconds); CUDA timings synchronise. In the shapes suite
every timed call follows a call of ``torch.topk`` (and, for the routers, of the
hand-written router) in the same round, and a ratio is the median of the per-round
ratios, which cancels the drifts of a loaded machine. Peak memory is the
largest amount allocated during one call beyond what was allocated before it (CPU: the
profiler's allocation events; CUDA: ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import __version__
from ..isotonic import isotonic_regression, soft_rank, soft_sort
from ..ops import soft_sinkhorn_mask, topk_mask
from ..registry import OPERATORS

QUICK_SIZES = [(16, 100), (16, 1000), (4, 10_000)]
FULL_SIZES = [(64, 100), (64, 1000), (64, 10_000), (64, 65_536), (16, 100_000), (4, 1_000_000)]
FULL_SIZES += [(1, 400_000), (1, 4_000_000)]

#: ``--suite shapes``: (batch, n, k) where top-k is used in practice, and what each stands for.
SHAPES: list[tuple[int, int, int, str]] = [
    (1, 8, 2, "one short row: the fixed cost of a call"),
    (8192, 8, 2, "MoE router, 8 experts"),
    (8192, 64, 2, "MoE router, 64 experts"),
    (256, 1000, 10, "classification"),
    (32, 32768, 10, "retrieval"),
    (64, 65536, 256, "k = n/256"),
    (1, 1_000_000, 100, "one long row"),
    (64, 131072, 50, "LLM vocabulary, top-50 sampling"),
    (4, 262144, 2048, "LLM vocabulary, k = 2048"),
    (16, 65536, 2048, "sparse-attention indexer"),
    (4096, 32768, 32, "SAE latents"),
]
SORT_SIZES = [(256, 1000), (4096, 100), (1, 100_000), (16, 100_000)]


@dataclass
class Contender:
    """Something to time: ``fn(x, k)`` returns a tensor whose backward is timed too."""

    name: str
    group: str  # "floor", "operator", "sort route", "published"
    fn: Callable[[Tensor, int], Tensor]
    max_elements: int = 1 << 62  # skip larger problems (reason printed)
    max_n: int = 1 << 62  # skip longer rows (O(n^2) peers)
    max_kn: int = 1 << 62  # skip larger rows x k x n (O(k n)-memory operators)
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
    threads: int = 0
    router_ratio: float = math.nan  # time over the hand-written hard router's, same mode
    gbps: float = math.nan  # bytes read and written over the time


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
    cases: list[tuple[int, int, int]] | None = None  # explicit (batch, n, k); overrides sizes x ks
    threads: list[int] = field(default_factory=list)  # torch thread counts to run (empty: as set)
    memory: bool = True
    paired: bool = False  # time each call right after torch.topk (and the hand router) in rounds
    cap: float = math.inf  # seconds: slower calls are timed once (and their peak memory not taken)


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
        Contender(
            name,
            "operator",
            op(name),
            max_elements=spec.bench_max_elements or 1 << 62,
            max_kn=spec.max_kn or 1 << 62,
        )
        for name, spec in OPERATORS.items()
        if name != "hard" and not spec.route_of and spec.kind in ("mask", "magnitude")
    ]
    out += [
        Contender("sparse[sort]", "sort route", sort_route("sparse")),
        Contender("lapsum[sort]", "sort route", sort_route("lapsum")),
        Contender(
            "soft[sinkhorn-200]",
            "published",
            lambda x, k: soft_sinkhorn_mask(x, k, temperature=0.1, max_iter=200),
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


def hand_router(x: Tensor, k: int) -> Tensor:
    """The hard router a user writes by hand: softmax gates of the top-k experts, zeros elsewhere."""
    idx = torch.topk(x, k, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, torch.softmax(x, dim=-1).gather(-1, idx))


def shapes_contenders(temperature: float | None, device: str = "cpu") -> list[Contender]:
    """``--suite shapes``: the threshold operators, softtopk.topk, the router gates, baselines."""
    from .. import topk
    from ..nn.functional import topk_route

    def op(name: str) -> Callable[[Tensor, int], Tensor]:
        spec = OPERATORS[name]
        t = spec.temperature if temperature is None else temperature
        return lambda x, k: spec(x, k, temperature=t)

    def router(method: str) -> Callable[[Tensor, int], Tensor]:
        t = OPERATORS[method].temperature if temperature is None else temperature
        return lambda x, k: topk_route(x, k, method=method, temperature=t).gates

    out = [
        Contender("hand router", "floor", hand_router, note="torch.topk + softmax + scatter"),
        Contender("torch.topk", "floor", lambda x, k: torch.topk(x, k, dim=-1).values),
        Contender("softtopk.topk", "operator", lambda x, k: topk(x, k).values),
        Contender("sparse", "operator", op("sparse")),
        Contender("sparse-p4/3", "operator", op("sparse-p4/3")),
        Contender("topk_mag", "operator", op("magnitude")),
        Contender("entropic", "operator", op("entropic")),
        Contender("lapsum", "operator", op("lapsum")),
        Contender("soft", "operator", op("soft")),
        Contender("router[sparse]", "router", router("sparse"), note="topk_route gates"),
        Contender("router[hard]", "router", router("hard"), note="topk_route gates"),
    ]
    if device.startswith("cuda"):
        try:
            import flashinfer  # type: ignore[import-not-found]
        except ImportError:  # optional contender; its rows are simply absent
            flashinfer = None
        if flashinfer is not None and hasattr(flashinfer, "top_k"):
            out.append(
                Contender(
                    "flashinfer.top_k",
                    "published",
                    lambda x, k: flashinfer.top_k(x, k, sorted=True)[0],
                    note="FlashInfer radix top-k (forward only)",
                )
            )
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


#: The clock of the timings: wall time, or the calling thread's CPU time (``--clock cpu``).
_CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
_now = time.perf_counter


def set_clock(name: str) -> None:
    """Times calls by wall time (``"wall"``) or by the calling thread's CPU time (``"cpu"``).

    The thread's CPU time leaves out the time the thread waits for a core, so on a
    machine shared with other jobs it measures the work of single-threaded calls; it
    does not count work on other threads (use it with ``--threads 1``).
    """
    global _now
    _now = _CLOCK[name]


def time_call(
    fn: Callable[[], object], device: str, repeat: int, budget: float, cap: float = math.inf
) -> tuple[float, int]:
    """Median seconds of ``fn`` after warm-up calls (two, one for calls over a second).

    At least ``repeat`` calls, more while the total stays under ``budget`` seconds; a
    call slower than ``cap`` seconds is timed once (after one warm-up call).
    """
    t0 = _now()
    fn()
    _sync(device)
    if _now() - t0 < 1.0:
        fn()
        _sync(device)
    times: list[float] = []
    start = _now()
    while len(times) < repeat or (_now() - start < budget and len(times) < 50):
        t0 = _now()
        fn()
        _sync(device)
        times.append(_now() - t0)
        if times[-1] > cap or (times[-1] > 5.0 and len(times) >= 3):
            break
    return statistics.median(times), len(times)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Discards what native code writes to stdout and stderr (the profiler's USDT lines).

    The profiler's C++ side prints ``USDT ... profiler_start`` / ``profiler_stop`` at
    every start and stop; the file descriptors are pointed at /dev/null meanwhile and
    the C streams flushed before they are put back.
    """
    try:
        libc = ctypes.CDLL(None)
        flush = libc.fflush
    except (OSError, AttributeError):  # no C library to flush: leave the streams alone
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    flush(None)
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        flush(None)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def time_paired(
    fn: Callable[[], object], refs: list[Callable[[], object]], device: str, repeat: int, budget: float
) -> tuple[float, list[float], int]:
    """Times ``fn`` in rounds, each also timing every reference call right before it.

    Returns the median seconds of ``fn``, for each reference the median over the rounds
    of ``fn``'s time over the reference's time in the same round, and the round count.
    Pairing the calls cancels the slow drifts of a shared machine's load.
    """
    for call in (*refs, fn):
        call()
    _sync(device)
    times: list[float] = []
    ratios: list[list[float]] = [[] for _ in refs]
    start = _now()
    while len(times) < repeat or (_now() - start < budget and len(times) < 50):
        ref_times = []
        for call in refs:
            t0 = _now()
            call()
            _sync(device)
            ref_times.append(_now() - t0)
        t0 = _now()
        fn()
        _sync(device)
        times.append(_now() - t0)
        for r, t in zip(ratios, ref_times, strict=True):
            r.append(times[-1] / t)
        if times[-1] > 5.0 and len(times) >= 3:
            break
    return statistics.median(times), [statistics.median(r) for r in ratios], len(times)


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

        with _quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


def _select(config: Config) -> list[Contender]:
    if config.suite == "sort":
        chosen = sort_contenders(config.temperature)
    elif config.suite == "shapes":
        chosen = shapes_contenders(config.temperature, config.device)
    else:
        chosen = contenders(config.temperature, config.peers)
    if config.contenders:
        unknown = sorted(set(config.contenders) - {c.name for c in chosen})
        if unknown:
            raise ValueError(f"unknown contender(s) {unknown}; known: {[c.name for c in chosen]}")
        keep = {"torch.topk", "hand router"} if config.suite == "shapes" else {"torch.topk"}
        chosen = [c for c in chosen if c.name in config.contenders or c.name in keep]
    return chosen


def cases_of(config: Config) -> list[tuple[int, int, int]]:
    """The (batch, n, k) triples that ``config`` sweeps."""
    if config.cases is not None:
        return list(config.cases)
    return [(b, n, k) for b, n in config.sizes for k in sorted({parse_k(s, n) for s in config.ks})]


def run(config: Config, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Runs the sweep and returns one row per (contender, size, mode, thread count)."""
    threads = config.threads or [torch.get_num_threads()]
    before = torch.get_num_threads()
    rows: list[Row] = []
    try:
        for count in threads:
            torch.set_num_threads(count)
            rows += _run_threads(config, progress)
    finally:
        torch.set_num_threads(before)
    return rows


def _run_threads(config: Config, progress: Callable[[str], None] | None) -> list[Row]:
    torch.manual_seed(0)
    chosen = _select(config)
    rows: list[Row] = []
    too_slow: set[tuple[str, str]] = set()
    threads = torch.get_num_threads()
    for batch, n, k in cases_of(config):
        x = torch.randn(batch, n, device=config.device).to(config.dtype)
        input_bytes = x.numel() * x.element_size()

        def topk_fwd() -> object:
            with torch.no_grad():
                return torch.topk(x, k, dim=-1)

        base_fwd, _ = time_call(topk_fwd, config.device, config.repeat, config.budget)
        router: dict[str, float] = {}
        hand = _calls(Contender("hand router", "floor", hand_router), x, k)
        for c in chosen:
            out_bytes: list[int] = []
            for mode, call in _calls(c, x, k).items():
                label = f"{c.name} {mode} {batch}x{n} {threads}t"
                if progress:
                    progress(label)
                skip = ""
                if x.numel() > c.max_elements:
                    skip = f"skipped: more than {c.max_elements} elements"
                elif n > c.max_n:
                    skip = f"skipped: rows longer than {c.max_n}"
                elif x.numel() * k > c.max_kn:
                    skip = f"skipped: k x elements over {c.max_kn} (O(k n) memory)"
                elif (c.name, mode) in too_slow:
                    skip = f"skipped: a smaller size took over {config.skip_slow_after:.0f} s"
                row = Row(
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
                    skip or c.note,
                    threads,
                )
                rows.append(row)
                if skip:
                    continue
                refs = [topk_fwd]
                if c.group == "router":
                    refs.append(hand[mode])
                try:
                    if config.paired:
                        seconds, paired, repeats = time_paired(
                            call, refs, config.device, config.repeat, config.budget
                        )
                    else:
                        seconds, repeats = time_call(
                            call, config.device, config.repeat, config.budget, config.cap
                        )
                        paired = [seconds / base_fwd]
                except Exception as err:  # a contender that cannot run this case (e.g. no backward)
                    row.note = f"failed: {type(err).__name__}: {err}"[:200]
                    continue
                if seconds > config.skip_slow_after / 10:
                    too_slow.add((c.name, mode))
                row.ms = seconds * 1e3
                row.ratio = paired[0]
                row.repeats = repeats
                if c.name == "hand router":
                    router[mode] = seconds
                if len(paired) > 1:
                    row.router_ratio = paired[1]
                elif mode in router:
                    row.router_ratio = seconds / router[mode]
                if not out_bytes:
                    out_bytes.append(_nbytes(call()))
                moved = input_bytes + out_bytes[0]
                if mode == "fwd+bwd":
                    moved += out_bytes[0] + input_bytes  # the cotangent read, the gradient written
                row.gbps = moved / seconds / 1e9
                if config.memory and seconds <= config.cap:
                    row.peak_bytes = peak_memory(call, config.device)
                    row.peak_ratio = row.peak_bytes / input_bytes
    return rows


def _nbytes(out: object) -> int:
    return out.numel() * out.element_size() if isinstance(out, Tensor) else 0


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


def _fmt(value: float, spec: str) -> str:
    return "" if math.isnan(value) else format(value, spec)


def format_markdown(rows: list[Row]) -> str:
    """The shapes suite as Markdown: one table per (dtype, threads), a line per shape and contender."""
    lines: list[str] = []
    groups = sorted({(r.dtype, r.threads) for r in rows})
    by = {(r.dtype, r.threads, r.batch, r.n, r.k, r.contender, r.mode): r for r in rows}
    for dtype, threads in groups:
        lines += [
            f"\n### {dtype.replace('torch.', '')}, {threads} thread{'s' if threads != 1 else ''}\n",
            "| shape, k | contender | fwd ms | fwd / topk | fwd+bwd ms | fwd+bwd / topk fwd "
            "| fwd+bwd / hand router | GB/s fwd | GB/s fwd+bwd |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        mine = [r for r in rows if (r.dtype, r.threads) == (dtype, threads)]
        cases = list(dict.fromkeys((r.batch, r.n, r.k) for r in mine))
        names = list(dict.fromkeys(r.contender for r in rows))
        for batch, n, k in cases:
            for name in names:
                f = by.get((dtype, threads, batch, n, k, name, "fwd"))
                b = by.get((dtype, threads, batch, n, k, name, "fwd+bwd"))
                if f is None and b is None:
                    continue
                nan = Row("", "", "", 0, 0, 0, "", "", math.nan, math.nan, math.nan, math.nan, 0)
                f, b = f or nan, b or nan
                if math.isnan(f.ms) and math.isnan(b.ms):
                    note = (b.note or f.note).split(":")[0]
                    lines.append(f"| ({batch}, {n}), {k} | {name} | {note} | | | | | | |")
                    continue
                lines.append(
                    f"| ({batch}, {n}), {k} | {name} | {_fmt(f.ms, '.3f')} | {_fmt(f.ratio, '.2f')} "
                    f"| {_fmt(b.ms, '.3f')} | {_fmt(b.ratio, '.2f')} | {_fmt(b.router_ratio, '.2f')} "
                    f"| {_fmt(f.gbps, '.2f')} | {_fmt(b.gbps, '.2f')} |"
                )
    return "\n".join(lines)


#: Targets of the shapes suite: (contenders, mode, bound, against, shapes or None for all);
#: against "topk" or "router" bounds a ratio, "us" the time of one call in microseconds.
ONE_CALL = {(1, 8)}
TARGETS = [
    (("sparse",), "fwd+bwd", 60.0, "us", ONE_CALL),
    (("sparse", "sparse-p4/3", "topk_mag"), "fwd+bwd", 1.5, "topk", None),
    (("entropic", "lapsum", "soft"), "fwd+bwd", 3.0, "topk", None),
    (("softtopk.topk",), "fwd", 1.0, "topk", {(64, 131072), (4, 262144)}),
    (("router[sparse]", "router[hard]"), "fwd+bwd", 1.1, "router", {(8192, 8), (8192, 64)}),
]


def format_targets(rows: list[Row]) -> str:
    """Met / not met for every target of the shapes suite, per (dtype, threads) and shape."""
    lines = [
        "\n| dtype, threads | shape, k | contender | mode | ratio | bound | |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        for names, mode, bound, against, shapes in TARGETS:
            if r.contender not in names or r.mode != mode:
                continue
            if shapes is not None and (r.batch, r.n) not in shapes:
                continue
            if against != "us" and (r.batch, r.n) in ONE_CALL:
                continue  # a call this short measures the fixed cost, not throughput
            ratio = {"topk": r.ratio, "router": r.router_ratio, "us": 1e3 * r.ms}[against]
            what = {"topk": "x torch.topk fwd", "router": "x hand router", "us": "µs per call"}[against]
            verdict = "n/a" if math.isnan(ratio) else ("met" if ratio <= bound else "not met")
            lines.append(
                f"| {r.dtype.replace('torch.', '')}, {r.threads} | ({r.batch}, {r.n}), {r.k} | {r.contender} "
                f"| {mode} | {_fmt(ratio, '.2f')} | {bound} {what} | {verdict} |"
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


def parse_dtypes(text: str) -> list[str]:
    """``"float32,bfloat16"`` -> ["float32", "bfloat16"]."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    allowed = ("float16", "bfloat16", "float32", "float64")
    for name in names:
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(allowed)}; got {name!r}")
    return names


def parse_threads(text: str) -> list[int]:
    """``"1,all"`` -> [1, os.cpu_count()]."""
    counts = []
    for item in text.split(","):
        item = item.strip().lower()
        if item == "all":
            counts.append(os.cpu_count() or 1)
            continue
        try:
            count = int(item)
        except ValueError:
            count = 0
        if count < 1:
            raise argparse.ArgumentTypeError(f"threads must be positive ints or 'all'; got {item!r}")
        counts.append(count)
    return list(dict.fromkeys(counts))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sweep (default): batch 16 to 4, n up to 10000, calls over 2 s timed once",
    )
    parser.add_argument("--full", action="store_true", help="n up to 4e6, batch 64 down to 1")
    parser.add_argument("--sizes", type=parse_sizes, help="explicit sizes, e.g. 64x1000,1x400000")
    parser.add_argument(
        "--dtype",
        type=parse_dtypes,
        help="float16, bfloat16, float32 or float64, comma-separated "
        "(default float32; float32,bfloat16 for --suite shapes)",
    )
    parser.add_argument(
        "--threads",
        type=parse_threads,
        help="torch thread counts, comma-separated ints or 'all', e.g. 1,all "
        "(default: torch's count; 1,all for --suite shapes)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the tables (Markdown) to this file")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall time (default) or the calling thread's CPU time (single-threaded runs on a "
        "shared machine: time spent waiting for a core is left out)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--temperature", type=float, help="one temperature for all operators")
    parser.add_argument(
        "--repeat", type=int, help="timed calls per measurement, at least (default 5; 3 for shapes)"
    )
    parser.add_argument(
        "--budget", type=float, help="seconds per measurement before stopping (default 0.3; 0.5 for shapes)"
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="contenders to run (torch.topk always runs)"
    )
    parser.add_argument(
        "--suite",
        default="topk",
        choices=["topk", "sort", "shapes"],
        help="topk: every registered top-k operator (default); sort: soft_rank/soft_sort vs "
        "torchsort; shapes: the shapes of routers, vocabularies, indexers and SAEs",
    )
    parser.add_argument(
        "--k",
        default=None,
        help="budgets, comma-separated ints or fractions n/<int> (default n/256), e.g. 1,10,n/10; "
        "with --suite shapes and --sizes, the k of those sizes",
    )
    parser.add_argument("--no-peers", action="store_true", help="leave out the installed published packages")
    parser.add_argument("--no-plot", action="store_true", help="no PNG plots (they need matplotlib)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder for CSV, JSON and PNG"
    )


def main(args: argparse.Namespace) -> int:
    suite = getattr(args, "suite", "topk")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    ks = (args.k or "n/256").split(",")
    try:
        for spec in ks:
            parse_k(spec, 1000)
    except ValueError as err:
        print(f"--k: {err}", file=sys.stderr)
        return 2
    cases = None
    if suite == "shapes":
        dtypes = args.dtype or ["float32", "bfloat16"]
        threads = args.threads or parse_threads("1,all")
        if args.sizes:
            cases = [(b, n, parse_k(spec, n)) for b, n in args.sizes for spec in (args.k or "10").split(",")]
        else:
            cases = [(b, n, k) for b, n, k, _ in SHAPES]
        sizes = [(b, n) for b, n, _ in cases]
    else:
        dtypes = args.dtype or ["float32"]
        threads = args.threads or []
        default_sizes = SORT_SIZES if suite == "sort" else (FULL_SIZES if args.full else QUICK_SIZES)
        sizes = args.sizes or default_sizes
    configs = [
        Config(
            sizes=sizes,
            dtype=getattr(torch, dtype),
            device=args.device,
            temperature=args.temperature,
            repeat=args.repeat if args.repeat is not None else (3 if suite == "shapes" else 5),
            budget=args.budget if args.budget is not None else (0.5 if suite == "shapes" else 0.3),
            contenders=args.only,
            suite=suite,
            ks=ks,
            peers=not args.no_peers,
            cases=cases,
            threads=threads,
            memory=suite != "shapes",
            paired=suite == "shapes",
            cap=math.inf if (suite == "shapes" or args.full) else 2.0,
        )
        for dtype in dtypes
    ]
    counts = threads or [torch.get_num_threads()]
    clock = getattr(args, "clock", "wall")
    if clock == "cpu" and (args.device.startswith("cuda") or any(c != 1 for c in counts)):
        print("--clock cpu needs --threads 1 on the CPU (other threads' work is left out)", file=sys.stderr)
        return 2
    set_clock(clock)
    print(
        f"softtopk {__version__} bench --suite {suite} on {args.device}, {', '.join(dtypes)}, "
        f"torch {torch.__version__}, {', '.join(map(str, counts))} thread(s); "
        "ratios are to torch.topk forward in the same run"
    )
    from ._progress import Progress

    try:
        per_config = len(cases_of(configs[0])) * 2 * len(_select(configs[0])) * len(counts)
    except ValueError as err:
        print(f"--only: {err}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    with Progress(per_config * len(configs), "bench") as bar:
        for config in configs:
            rows += run(config, progress=bar.step)
    if suite == "shapes":
        text = format_markdown(rows) + "\n\nTargets:\n" + format_targets(rows)
        text += f"\n\nclock: {clock}"
    else:
        text = format_table(rows)
    print(text)
    if suite == "sort":
        print(sort_summary(rows))
    csv_path, json_path = write(rows, args.out)
    print(f"\nwrote {csv_path} and {json_path}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text.lstrip("\n") + "\n")
        print(f"wrote {args.markdown}")
    if args.no_plot or suite == "shapes":
        return 0
    from ._plots import plot_bench

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return 0
    paths = plot_bench(rows, args.out, environment())
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        print("no PNG written: a plot needs at least two row lengths n")
    return 0

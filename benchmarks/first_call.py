"""First-call time of softtopk.topk_mask in a fresh process, with numba's kernel cache cold and warm.

    python benchmarks/first_call.py                    # topk_mask, (8, 1000), k = 10, 5 warm runs
    python benchmarks/first_call.py --shape 64x4096 --k 16 --repeats 5 --method sparse entropic
    python benchmarks/first_call.py --clock cpu        # CPU seconds of the process: steadier when busy

Each figure comes from a new interpreter (``python -c``), so nothing is loaded or compiled
beforehand. The cold run points ``NUMBA_CACHE_DIR`` at an empty folder, so numba compiles
every kernel the call reaches and writes it there; the warm runs reuse that folder, so
numba loads the compiled kernels from disk. Per run it reports:

* ``import``: ``import torch`` and ``import softtopk`` (numba is not loaded here);
* ``first``: the first ``topk_mask`` call, forward and backward (loads numba and the
  kernels, compiling them when the cache is cold);
* ``second``: the same call again (the steady cost, for scale).

Warm figures are the median over ``--repeats`` processes. ``first - second`` is the
one-time cost a user pays in a new process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
clock = {"wall": time.perf_counter, "cpu": time.process_time}[sys.argv[1]]
rows, n, k, method = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
t0 = clock()
import torch
import softtopk
t1 = clock()
numba_at_import = "numba" in sys.modules
torch.manual_seed(0)
x = torch.randn(rows, n, requires_grad=True)
w = torch.randn(rows, n)

def call():
    (softtopk.topk_mask(x, k, method=method) * w).sum().backward()

t2 = clock()
call()
t3 = clock()
call()
t4 = clock()
times = {"import": t1 - t0, "first": t3 - t2, "second": t4 - t3}
print(json.dumps(dict(times, numba_at_import=numba_at_import)))
"""


def run_child(cache: str, args: argparse.Namespace, method: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    rows, n = (int(v) for v in args.shape.lower().split("x"))
    cmd = [sys.executable, "-c", CHILD, args.clock, str(rows), str(n), str(args.k), method]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ms(v: float) -> str:
    return f"{1e3 * v:9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="8x1000", help="rows x n (default 8x1000)")
    parser.add_argument("--k", type=float, default=10)
    parser.add_argument("--method", nargs="+", default=["sparse"])
    parser.add_argument("--repeats", type=int, default=5, help="warm processes per method (median)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()

    print(f"topk_mask first call in a fresh process, {args.shape}, k = {args.k:g}, {args.clock} ms")
    print(f"{'method':<10} {'cache':<6} {'import':>9} {'first':>9} {'second':>9} {'first-second':>13}")
    for method in args.method:
        with tempfile.TemporaryDirectory(prefix="softtopk-first-call-") as cache:
            cold = run_child(cache, args, method)
            warm_runs = [run_child(cache, args, method) for _ in range(args.repeats)]
        warm = {key: statistics.median(r[key] for r in warm_runs) for key in ("import", "first", "second")}
        for label, r in (("cold", cold), ("warm", warm)):
            print(
                f"{method:<10} {label:<6} {ms(r['import'])} {ms(r['first'])} {ms(r['second'])} "
                f"{ms(r['first'] - r['second']):>13}"
            )
        if cold["numba_at_import"] or any(r["numba_at_import"] for r in warm_runs):
            print("  note: numba was loaded by import softtopk")


if __name__ == "__main__":
    main()

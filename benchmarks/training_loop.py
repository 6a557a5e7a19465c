"""Forward + backward in a training loop's pattern, with the output pool on and off, in one run.

    python benchmarks/training_loop.py
    python benchmarks/training_loop.py --sizes 32x32768,64x131072 --k 10,50 --only topk_mask

Each step is ``y = op(x, k); y.backward(v)``, then y and ``x.grad`` are dropped, as at the
end of a training step: the mask and the gradient are freed one after the other, which is
when glibc gives the top of its heap back to the system. Per step it reports the
calling thread's CPU time (user and system: page faults count), the page faults of the
process, and the time over ``torch.topk`` forward timed in the same run. "pool off" runs
with ``SOFTTOPK_POOL_BYTES=0`` (no block kept: every output is a fresh allocation), "pool
on" with the default bound (see ``softtopk._buffers``). One thread.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

import softtopk
from softtopk import _buffers


def step_stats(fn, repeats: int) -> tuple[float, float]:
    """Median CPU ms of the calling thread per call, and page faults per call."""
    fn()
    times = []
    faults = 0
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return statistics.median(times) * 1e3, faults / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256x1000,32x32768,64x131072")
    parser.add_argument("--k", default="10,10,50", help="one budget per size")
    parser.add_argument("--only", nargs="+", default=["topk_mask", "topk_mag"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    if len(ks) != len(sizes):
        parser.error(f"--k needs one budget per size: {len(sizes)} sizes, {len(ks)} budgets")
    print("| shape, k | op | pool | ms per step | x torch.topk fwd | page faults per step |")
    print("|---|---|---|---:|---:|---:|")
    for (B, n), k in zip(sizes, ks, strict=True):
        x = torch.randn(B, n, requires_grad=True)
        v = torch.randn(B, n)
        base, _ = step_stats(lambda: torch.topk(x.detach(), k), args.repeats)
        for name in args.only:
            op = getattr(softtopk, name)

            def step() -> None:
                y = op(x, k)
                y.backward(v)
                del y
                x.grad = None

            for pool in ("off", "on"):
                if pool == "off":
                    os.environ["SOFTTOPK_POOL_BYTES"] = "0"
                else:
                    os.environ.pop("SOFTTOPK_POOL_BYTES", None)
                _buffers.release()
                ms, faults = step_stats(step, args.repeats)
                print(f"| ({B}, {n}), {k} | {name} | {pool} | {ms:.3f} | {ms / base:.2f} | {faults:.0f} |")


if __name__ == "__main__":
    main()

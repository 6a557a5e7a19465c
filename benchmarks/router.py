"""Forward time of TopKRouter with a soft top-k against the hard top-k router, as ratios.

    python benchmarks/router.py                      # 4096 tokens, 64 experts, k = 2
    python benchmarks/router.py --tokens 4096 --experts 64 --k 2 --d-model 0 512 --repeats 3
    python benchmarks/router.py --clock cpu --threads 1     # on a busy machine

Both routers are the same module (``softtopk.nn.TopKRouter``) with ``method="hard"``
(V-MoE's router: softmax, torch.topk, scatter) or a soft operator; the forward is the
linear projection (skipped with --d-model 0: the routing from given logits only) and the
gating. Each figure is the median of timed calls after warm-up, and every ratio is to
the hard router measured in the same run, interleaved, so that machine load affects
both alike. Also prints the mean number of active experts per token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from softtopk.nn import TopKRouter
from softtopk.nn.functional import topk_route

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def median_ms(fn, calls: int, clock: str = "wall") -> float:
    now = CLOCK[clock]
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t0 = now()
        fn()
        times.append(now() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=float, default=2)
    parser.add_argument("--d-model", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--methods", nargs="+", default=["sparse", "sparse-p4/3", "entropic", "lapsum"])
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument(
        "--repeats", type=int, default=3, help="independent rounds (each interleaves all methods)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="wall",
        help="wall time, or this process's CPU time (robust on a shared machine; use with --threads 1)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tokens} tokens, "
        f"{args.experts} experts, k = {args.k:g}; forward, no grad, {args.clock} clock; "
        "ratio = time / hard router time"
    )
    for d in args.d_model:
        width = max(d, 1)
        x = torch.randn(args.tokens, width)
        logits = torch.randn(args.tokens, args.experts)
        routers = {
            m: TopKRouter(width, args.experts, k=args.k, method=m, temperature=args.temperature)
            for m in ["hard", *args.methods]
        }
        state = routers["hard"].state_dict()
        for r in routers.values():
            r.load_state_dict(state)
            r.eval()

        def call(method: str):
            if d == 0:
                return lambda: topk_route(logits, args.k, method=method, temperature=args.temperature)
            return lambda: routers[method](x)

        label = "routing only (logits given)" if d == 0 else f"d_model = {d} (linear + routing)"
        print(f"\n{label}")
        ratios: dict[str, list[float]] = {m: [] for m in args.methods}
        hard_ms: list[float] = []
        with torch.no_grad():
            for _ in range(args.repeats):
                base = median_ms(call("hard"), args.calls, args.clock)
                hard_ms.append(base)
                for m in args.methods:
                    ratios[m].append(median_ms(call(m), args.calls, args.clock) / base)
            active = {
                m: (
                    topk_route(logits, args.k, method=m, temperature=args.temperature)
                    .active.float()
                    .mean()
                    .item()
                )
                for m in ["hard", *args.methods]
            }
        hard_line = (
            f"{statistics.median(hard_ms):>9.3f} ms   ratio 1.00   active experts {active['hard']:.2f}"
        )
        print(f"  {'hard':<14}{hard_line}")
        for m in args.methods:
            rs = ", ".join(f"{r:.2f}" for r in ratios[m])
            print(
                f"  {m:<14}{statistics.median(ratios[m]) * statistics.median(hard_ms):>9.3f} ms   "
                f"ratio {statistics.median(ratios[m]):.2f} (rounds: {rs})   active experts {active[m]:.2f}"
            )


if __name__ == "__main__":
    main()

"""filter_logits (threshold search) against the sort-based filter, as ratios in the same run.

    python benchmarks/sampling.py                       # 64 x 131072, the default cases
    python benchmarks/sampling.py --batch 64 --vocab 131072 --scales 1 2 4 --calls 5 --repeats 3
    python benchmarks/sampling.py --device cuda

Both filters are softtopk.sampling functions with the same rules: filter_logits finds each
threshold with torch.topk on candidates (no sort), filter_logits_sort sorts every row
once. Logits are Gaussian times a scale: the scale sets how peaked the distribution is,
so the nucleus size (printed: mean kept tokens per row) goes from a few tokens (scale 8)
to most of the vocabulary (scale 0.5, where the search widens to a full selection).
Each line checks that the two outputs are equal, then times them interleaved; the
ratio is sort time / threshold time (> 1: filter_logits is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from softtopk.sampling import filter_logits, filter_logits_sort

CASES = {
    "top_p=0.9": dict(top_p=0.9),
    "top_k=50": dict(top_k=50),
    "top_k=50,top_p=0.9": dict(top_k=50, top_p=0.9),
    "min_p=0.05": dict(min_p=0.05),
    "top_k=1000,top_p=0.95,min_p=0.01": dict(top_k=1000, top_p=0.95, min_p=0.01),
    "per-row top_p in [0.5, 1]": "per-row",
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, calls: int, device: str) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--scales", type=float, nargs="+", default=[8.0, 4.0, 2.0, 0.5])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="rounds, each timing both filters")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator(device=args.device).manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; logits "
        f"{args.batch} x {args.vocab} float32 = scale * N(0, 1); ratio = sort ms / threshold ms"
    )
    print(f"  {'case':<34}{'scale':>6}{'kept/row':>10}{'sort ms':>10}{'thresh ms':>11}{'ratio':>8}  equal")
    for scale in args.scales:
        x = scale * torch.randn(args.batch, args.vocab, generator=gen, device=args.device)
        for name in args.cases:
            kw = CASES[name]
            if kw == "per-row":
                u = torch.rand(args.batch, generator=gen, device=args.device)
                kw = dict(top_p=0.5 + 0.5 * u)
            with torch.no_grad():
                out = filter_logits(x, **kw)
                equal = torch.equal(out, filter_logits_sort(x, **kw))
                kept = (out > -torch.inf).sum(-1).double().mean().item()
                ratios, sort_ms, fast_ms = [], [], []
                for _ in range(args.repeats):
                    s = median_ms(lambda kw=kw: filter_logits_sort(x, **kw), args.calls, args.device)
                    f = median_ms(lambda kw=kw: filter_logits(x, **kw), args.calls, args.device)
                    sort_ms.append(s)
                    fast_ms.append(f)
                    ratios.append(s / f)
            print(
                f"  {name:<34}{scale:>6g}{kept:>10.1f}{statistics.median(sort_ms):>10.1f}"
                f"{statistics.median(fast_ms):>11.1f}{statistics.median(ratios):>8.2f}  {equal}",
                flush=True,
            )


if __name__ == "__main__":
    main()

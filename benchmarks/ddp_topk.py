"""Top-k gradient compression with error feedback on DDP: final loss and bytes per step.

    python benchmarks/ddp_topk.py --world 2 --steps 300 --ratio 0.01

Spawns ``--world`` gloo processes on this machine and trains the same MLP (64-128-10,
a noisy linear teacher, SGD lr 0.1, batch 32 per rank, same seed) three times: plain DDP
(all-reduce), the top-k hook with error feedback, and the top-k hook without it. Prints
the final training loss of each, the ratios to plain DDP, and the bytes each rank puts
into its collective per step (top-k: k values + k int32 indices; plain: the dense
bucket). The harness is the one of tests/test_distributed.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.test_distributed import run_comparison  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ratio", type=float, default=0.01)
    args = parser.parse_args()
    r = run_comparison(world=args.world, steps=args.steps, ratio=args.ratio)
    dense = r["dense"]["loss"]
    print(
        f"{args.world} processes (gloo), {args.steps} steps, density {args.ratio:g}, {r['params']} parameters"
    )
    print(f"  plain DDP               final loss {dense:.4f}")
    for mode, label in (("ef", "top-k + error feedback"), ("noef", "top-k, no feedback")):
        m = r[mode]
        print(
            f"  {label:<24}final loss {m['loss']:.4f}  ({m['loss'] / dense:.3f}x plain)  "
            f"bytes/step {m['payload_bytes']:.0f} vs {m['dense_bytes']:.0f} dense "
            f"({m['payload_bytes'] / m['dense_bytes']:.4f}); "
            f"max |sent + residual - accumulated|: {m['mass_error']:g}"
        )


if __name__ == "__main__":
    main()

"""Compressed data-parallel training: loss, bytes and time of each scheme against dense DDP.

    python benchmarks/ddp_topk.py --world 2 --steps 300 --dataset digits

Spawns ``--world`` gloo processes on this machine and trains the MLP of the
``distributed`` experiment (``softtopk experiments distributed``) once per scheme with one
seed: dense all-reduce, PowerSGD, top-k + error feedback (10 %, 1 %, 0.1 %, float32 or
2-bit values) and DiLoCo. Prints, per scheme, the final training loss, the bytes each rank
sent and the wall time of the training loop, each divided by the dense run's of the same
invocation (ratios, not absolute timings, on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from softtopk.data import load
from softtopk.experiments import distributed as exp
from softtopk.experiments._common import Split


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dataset", default="digits", help="digits (scikit-learn) or fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = dataclasses.replace(exp.Config(), dataset=args.dataset, world=args.world, steps=args.steps)
    s = Split(load(cfg.dataset), train_size=cfg.train_size, test_size=cfg.test_size)
    split = {
        "x_train": s.x_train, "y_train": s.y_train, "x_val": s.x_val, "y_val": s.y_val,
        "x_test": s.x_test, "y_test": s.y_test, "x_eval": s.x_val, "y_eval": s.y_val,
        "classes": torch.tensor(s.classes),
    }  # fmt: skip
    results = exp.run_seed(cfg, split, args.seed)
    dense = results["dense all-reduce"]
    print(f"{cfg.world} gloo processes, {cfg.steps} steps, {cfg.dataset}, seed {args.seed}")
    print(f"{'scheme':<38}{'loss':>8}{'loss/dense':>12}{'bytes/dense':>13}{'time/dense':>12}{'test acc':>10}")
    for name, r in results.items():
        print(
            f"{name:<38}{r['train loss']:>8.4f}{r['train loss'] / dense['train loss']:>12.3f}"
            f"{r['bytes']:>13.4f}{r['seconds'] / dense['seconds']:>12.2f}{r['test accuracy']:>10.3f}"
        )


if __name__ == "__main__":
    main()

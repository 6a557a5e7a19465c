"""(c) Sparse mixture-of-experts router (Sander et al. 2023's V-MoE experiment in miniature).

Model: Linear(784 -> d) and ReLU, one MoE layer of E expert MLPs (d -> h -> d) added as
a residual, then a linear head. Router logits r = W x; gates g = softmax(r) * m_k(r),
with m_k the operator's soft top-k mask (V-MoE's gating with the hard top-k replaced).
Only experts with a non-zero gate run on a token, so compute follows sparsity: the
table reports the mean number of active experts per test token next to the accuracy.
Baselines: the hard top-k router (m_k = torch.topk's mask; gradient through the
softmax of the selected experts, as in V-MoE), the dense softmax router (all E), both
with a learning-rate grid, and the straight-through hard top-k mask (temperature grid).
Every run keeps its epoch with the best validation accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load
from ..nn import TopKRouter
from ..nn.functional import moe_dispatch
from ..registry import OPERATORS, Operator
from ._baselines import STRAIGHT_THROUGH
from ._common import BestCheckpoint, Split, batches, pretty
from ._runner import (
    Method,
    RunResult,
    Setting,
    bind,
    lr_grid,
    mask_operators,
    seed_everything,
    temperature_grid,
    timed,
)

NAME = "moe"
TITLE = "(c) Sparse mixture-of-experts router"
GRID = (0.1, 1.0, 10.0)


@dataclass(frozen=True)
class Config:
    """Data sizes, the MoE's shape and the training budget."""

    dataset: str = "fashion-mnist"
    k: int = 2
    experts: int = 8
    width: int = 64
    expert_hidden: int = 128
    train_size: int | None = 10_000
    test_size: int | None = 5_000
    epochs: int = 4
    batch: int = 128
    lr: float = 2e-3


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(
            dataset="digits", train_size=None, test_size=None, experts=4, width=16, expert_hidden=32, epochs=3
        )
    ],
    "default": [Config()],
}


class TinyMoE(nn.Module):
    """Input layer, one residual MoE layer routed by a :class:`softtopk.nn.TopKRouter`, linear head.

    ``method``/``k``/``temperature`` configure the router; experts run through
    :func:`softtopk.nn.functional.moe_dispatch`, so an expert with gate 0 is not run.
    """

    def __init__(
        self, features: int, classes: int, cfg: Config, method: object, k: int, temperature: float | None
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(features, cfg.width)
        self.router = TopKRouter(cfg.width, cfg.experts, k, method=method, temperature=temperature, bias=True)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(cfg.width, cfg.expert_hidden), nn.ReLU(), nn.Linear(cfg.expert_hidden, cfg.width)
            )
            for _ in range(cfg.experts)
        )
        self.head = nn.Linear(cfg.width, classes)
        self.active = 0.0  # mean active experts per token in the last forward

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        route = self.router(h)  # gates = softmax(r) * mask_k(r); exact zeros are skipped
        out = h + moe_dispatch(h, route.gates, self.experts)
        self.active = route.active.float().mean().item()
        return self.head(out)


def train_moe(
    split: Split,
    cfg: Config,
    op: Operator,
    k: int,
    temperature: float | None,
    seed: int,
    lr: float | None = None,
) -> RunResult:
    """Trains :class:`TinyMoE` routed by ``op`` (noise from the run's generator); best validation epoch."""
    g = seed_everything(seed)
    model = TinyMoE(split.features, split.classes, cfg, bind(op, g), k, temperature)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr if lr is None else lr)
    best = BestCheckpoint(model)
    losses = []
    train_active = float("nan")

    @torch.no_grad()
    def evaluate(x: Tensor, y: Tensor) -> tuple[float, float]:
        model.eval()
        acc = (model(x).argmax(-1) == y).float().mean().item()
        model.train()
        return acc, model.active

    for epoch in range(cfg.epochs):
        total, count, active = 0.0, 0, 0.0
        for idx in batches(len(split.y_train), cfg.batch, g):
            loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            active += model.active * len(idx)
            count += len(idx)
        losses.append(total / count)
        if best.update(evaluate(split.x_val, split.y_val)[0], epoch):
            train_active = active / count

    best.restore()
    val_acc, _ = evaluate(split.x_val, split.y_val)
    test_acc, test_active = evaluate(split.x_test, split.y_test)
    return RunResult(
        test={"accuracy": test_acc, "active experts": test_active, "train active": train_active},
        val={"accuracy": val_acc},
        losses=losses,
        extra={"best_epoch": best.step + 1},
    )


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001
    data = load(cfg.dataset, data_dir)
    split = Split(data, train_size=cfg.train_size, test_size=cfg.test_size)
    ops, notes = mask_operators(only, shape=(max(cfg.batch, 5000), cfg.experts))

    hard = OPERATORS["hard"]

    def baseline(k: int):  # noqa: ANN202
        # The hard mask with k = E keeps every expert: the dense softmax router.
        return lambda lr, seed: timed(lambda: train_moe(split, cfg, hard, k, None, seed, lr=float(lr)))

    def run_op(op: Operator):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            return timed(lambda: train_moe(split, cfg, op, cfg.k, float(temperature), seed))

        return run

    lrs = lr_grid(cfg.lr, len(grid))
    st = STRAIGHT_THROUGH
    methods = [
        Method(
            f"hard top-{cfg.k} router",
            "baseline",
            baseline(cfg.k),
            lrs,
            note="V-MoE: softmax x torch.topk mask",
            knob="lr",
        ),
        Method(
            "dense softmax router",
            "baseline",
            baseline(cfg.experts),
            lrs,
            note=f"all {cfg.experts} experts",
            knob="lr",
        ),
        Method(f"router [{st.name}]", "baseline", run_op(st), temperature_grid(st, grid), note=st.paper),
    ]
    methods += [
        Method(f"router [{op.name}]", "operator", run_op(op), temperature_grid(op, grid), note=op.paper)
        for op in ops
    ]
    return Setting(
        key=f"{cfg.dataset}-E{cfg.experts}-k{cfg.k}",
        title=f"{pretty(cfg.dataset)}, {cfg.experts} experts, k = {cfg.k}",
        methods=methods,
        select="accuracy",
        metrics=["accuracy", "active experts", "train active"],
        lower_is_better=("active experts", "train active"),
        description=(
            f"Linear {split.features}-{cfg.width}, residual MoE of {cfg.experts} experts "
            f"({cfg.width}-{cfg.expert_hidden}-{cfg.width}), gates softmax(r) x mask_k(r); "
            f"Adam {cfg.lr:g}, batch {cfg.batch}, {cfg.epochs} epochs on {len(split.y_train)} rows, "
            f"{len(split.y_test)} test rows. 'active experts' = mean experts with a non-zero gate "
            "per test token." + (" " + "; ".join(notes) if notes else "")
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

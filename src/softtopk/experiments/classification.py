"""(a) Top-k classification under label noise: top-k cross-entropy against cross-entropy.

Protocol of Berrada et al. 2018 and Garcin et al. 2022 in miniature: a fraction of the
training labels is replaced by uniformly random classes, an MLP is trained long enough
to memorise them, and test top-k accuracy is measured on clean labels. Every registered
mask operator supplies m_k(s) to the same loss, Petersen et al. 2022's top-k
cross-entropy with P_K = [0.5, 0, ..., 0, 0.5]:
-log(0.5 softmax(s)_y + 0.5 m_k(s)_y); Garcin et al.'s balanced top-k hinge (on the
noised (k+1)-th score) is one more row. Baselines: cross-entropy (label-smoothing grid)
and the same top-k cross-entropy with the straight-through hard top-k. Every run keeps
the epoch with the best validation top-k accuracy (early stopping); configurations are
chosen on a validation split whose labels carry the same noise (a user has no clean
labels), by top-k accuracy.

Settings: LetterRecognition (26 classes, k = 5) with 0 % and 50 % noise, Fashion-MNIST
(10 classes, k = 2) with 50 % noise. Expected from the literature: with clean labels
cross-entropy is as good or better; with heavy noise top-k losses keep a higher top-k
accuracy because they do not need to push the (often wrong) label to the very top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import load
from ..losses import balanced_topk_hinge_loss, topk_cross_entropy
from ..registry import Operator
from ._baselines import STRAIGHT_THROUGH
from ._common import BestCheckpoint, Split, batches, mlp, noisy_labels, predict, pretty, topk_accuracy
from ._runner import (
    Method,
    RunResult,
    Setting,
    bind,
    mask_operators,
    seed_everything,
    smoothing_grid,
    temperature_grid,
    timed,
)

NAME = "classification"
TITLE = "(a) Top-k classification with label noise"
GRID = (1.0, 10.0, 100.0)  # logits grow to tens during training: the defaults (0.1) are near-hard
HINGE_EPSILON = 0.1  # the hinge's noise scale is multiplied by GRID too: 0.1, 1, 10 (pytopk: 0.2, 1)

LossFn = Callable[[Tensor, Tensor, torch.Generator], Tensor]  # (scores, labels, generator) -> loss


@dataclass(frozen=True)
class Config:
    """One setting: data, budget k, noise rate and training budget."""

    dataset: str = "letter"
    k: int = 5
    noise: float = 0.5
    train_size: int | None = 4000
    test_size: int | None = None
    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 100
    batch: int = 256
    lr: float = 1e-3


SIZES: dict[str, list[Config]] = {
    "toy": [Config(train_size=1500, test_size=2000, hidden=(128, 128), epochs=40, batch=128, lr=3e-3)],
    "default": [
        Config(noise=0.0, epochs=40, batch=512, lr=2e-3),  # clean labels: nothing to memorise
        Config(noise=0.5),
        Config(dataset="fashion-mnist", k=2, noise=0.5, train_size=3000, test_size=5000, epochs=40),
    ],
}


def train(split: Split, cfg: Config, loss_fn: LossFn, seed: int) -> RunResult:
    """Trains an MLP with ``loss_fn(scores, y, generator)`` on noisy labels; clean test metrics.

    The validation top-k accuracy (noisy labels, like the training labels) is measured
    after every epoch and the best epoch's parameters are the ones tested.
    """
    g = seed_everything(seed)
    model = mlp([split.features, *cfg.hidden, split.classes])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    y_train = noisy_labels(split.y_train, split.classes, cfg.noise, seed=10_000 + seed)
    y_val = noisy_labels(split.y_val, split.classes, cfg.noise, seed=20_000)  # the same for every run
    k = cfg.k
    best = BestCheckpoint(model)
    losses = []
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for idx in batches(len(y_train), cfg.batch, g):
            loss = loss_fn(model(split.x_train[idx]), y_train[idx], g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        best.update(topk_accuracy(predict(model, split.x_val), y_val, k), epoch)
    best.restore()
    s_val, s_test = predict(model, split.x_val), predict(model, split.x_test)
    return RunResult(
        test={
            f"top{k}": topk_accuracy(s_test, split.y_test, k),
            "top1": topk_accuracy(s_test, split.y_test, 1),
        },
        val={f"top{k}": topk_accuracy(s_val, y_val, k), "top1": topk_accuracy(s_val, y_val, 1)},
        losses=losses,
        extra={"best_epoch": best.step + 1},
    )


def p_k_for(k: int) -> tuple[float, ...]:
    """Petersen et al.'s P_K = (0.5, 0, ..., 0, 0.5): half softmax top-1, half the top-k mask."""
    return (0.5,) + (0.0,) * (k - 2) + (0.5,)


def cross_entropy_loss(smoothing: float) -> LossFn:
    """Cross-entropy with label smoothing ``smoothing``."""
    return lambda s, y, g: F.cross_entropy(s, y, label_smoothing=smoothing)


def topk_ce_loss(op: Operator, k: int, temperature: float) -> LossFn:
    """Top-k cross-entropy (P_K of :func:`p_k_for`) with the mask of ``op``."""
    p_k = p_k_for(k)
    return lambda s, y, g: topk_cross_entropy(s, y, p_k=p_k, method=bind(op, g), temperature=temperature)


def topk_hinge_loss(k: int, temperature: float) -> LossFn:
    """Garcin et al.'s balanced top-k hinge, noise scale ``temperature`` (pytopk's epsilon)."""
    return lambda s, y, g: balanced_topk_hinge_loss(s, y, k, temperature=temperature, generator=g)


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001
    data = load(cfg.dataset, data_dir)
    split = Split(data, train_size=cfg.train_size, test_size=cfg.test_size)
    ops, notes = mask_operators(only, shape=(cfg.batch, split.classes))

    def run_ce(smoothing: float | None, seed: int) -> RunResult:
        return timed(lambda: train(split, cfg, cross_entropy_loss(float(smoothing)), seed))

    def run_op(op: Operator):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            return timed(lambda: train(split, cfg, topk_ce_loss(op, cfg.k, float(temperature)), seed))

        return run

    def run_hinge(temperature: float | None, seed: int) -> RunResult:
        return timed(lambda: train(split, cfg, topk_hinge_loss(cfg.k, float(temperature)), seed))

    st = STRAIGHT_THROUGH
    methods = [
        Method("cross-entropy", "baseline", run_ce, smoothing_grid(len(grid)), knob="label smoothing"),
        Method(f"top-k CE [{st.name}]", "baseline", run_op(st), temperature_grid(st, grid), note=st.paper),
    ]
    methods += [
        Method(f"top-k CE [{op.name}]", "operator", run_op(op), temperature_grid(op, grid), note=op.paper)
        for op in ops
    ]
    methods.append(  # a loss of the library, not a mask operator: in every run, like the baselines
        Method(
            "top-k hinge [Garcin, balanced]",
            "operator",
            run_hinge,
            [float(f"{HINGE_EPSILON * m:.6g}") for m in grid],
            note="Garcin et al. 2022: (1 + noised (k+1)-th score - s_y)_+, 5 noise samples",
        )
    )
    return Setting(
        key=f"{cfg.dataset}-k{cfg.k}-noise{int(round(cfg.noise * 100))}",
        title=f"{pretty(cfg.dataset)}, k = {cfg.k}, {cfg.noise:.0%} label noise",
        methods=methods,
        select=f"top{cfg.k}",
        metrics=[f"top{cfg.k}", "top1"],
        description=(
            f"MLP {split.features}-{'-'.join(map(str, cfg.hidden))}-{split.classes}, Adam {cfg.lr:g}, "
            f"batch {cfg.batch}, {cfg.epochs} epochs on {len(split.y_train)} training rows "
            f"({len(split.y_val)} validation, {len(split.y_test)} clean test rows); "
            f"top-k CE = -log(0.5 softmax_y + 0.5 mask_y); every run keeps its epoch with the best "
            f"(noisy) validation top-{cfg.k} accuracy." + (" " + "; ".join(notes) if notes else "")
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

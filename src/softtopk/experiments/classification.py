"""(a) Top-k classification under label noise: top-k cross-entropy against cross-entropy.

Protocol of Berrada et al. 2018 and Garcin et al. 2022 in miniature: a fraction of the
training labels is replaced by uniformly random classes, an MLP is trained long enough
to memorise them, and test top-k accuracy is measured on clean labels. Every registered
mask operator supplies m_k(s) to the same loss, Petersen et al. 2022's top-k
cross-entropy with P_K = [0.5, 0, ..., 0, 0.5]:
-log(0.5 softmax(s)_y + 0.5 m_k(s)_y). The baseline is cross-entropy. The temperature is
chosen on a validation split whose labels carry the same noise (a user has no clean
labels), by top-k accuracy.

Settings: LetterRecognition (26 classes, k = 5) with 0 % and 50 % noise, Fashion-MNIST
(10 classes, k = 2) with 50 % noise. Expected from the literature: with clean labels
cross-entropy is as good or better; with heavy noise top-k losses keep a higher top-k
accuracy because they do not need to push the (often wrong) label to the very top.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..data import load
from ..losses import topk_cross_entropy
from ..registry import Operator
from ._common import Split, batches, mlp, noisy_labels, predict, pretty, topk_accuracy
from ._runner import Method, RunResult, Setting, mask_operators, seed_everything, temperature_grid, timed

NAME = "classification"
TITLE = "(a) Top-k classification with label noise"
GRID = (1.0, 10.0, 100.0)  # logits grow to tens during training: the defaults (0.1) are near-hard


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


def train(split: Split, cfg: Config, loss_fn, seed: int) -> RunResult:  # noqa: ANN001
    """Trains an MLP with ``loss_fn(scores, y)`` on noisy labels; clean test metrics."""
    g = seed_everything(seed)
    model = mlp([split.features, *cfg.hidden, split.classes])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    y_train = noisy_labels(split.y_train, split.classes, cfg.noise, seed=10_000 + seed)
    y_val = noisy_labels(split.y_val, split.classes, cfg.noise, seed=20_000)  # the same for every run
    losses = []
    for _ in range(cfg.epochs):
        total, count = 0.0, 0
        for idx in batches(len(y_train), cfg.batch, g):
            loss = loss_fn(model(split.x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
    s_val, s_test = predict(model, split.x_val), predict(model, split.x_test)
    k = cfg.k
    return RunResult(
        test={
            f"top{k}": topk_accuracy(s_test, split.y_test, k),
            "top1": topk_accuracy(s_test, split.y_test, 1),
        },
        val={f"top{k}": topk_accuracy(s_val, y_val, k), "top1": topk_accuracy(s_val, y_val, 1)},
        losses=losses,
    )


def _operator_loss(op: Operator, k: int, temperature: float):  # noqa: ANN202
    # Petersen et al.'s P_K = (0.5, 0, ..., 0, 0.5): half softmax top-1, half the top-k mask.
    p_k = (0.5,) + (0.0,) * (k - 2) + (0.5,)
    return partial(topk_cross_entropy, p_k=p_k, method=op.fn, temperature=temperature)


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001
    data = load(cfg.dataset, data_dir)
    split = Split(data, train_size=cfg.train_size, test_size=cfg.test_size)
    ops, notes = mask_operators(only, shape=(cfg.batch, split.classes))

    def run_ce(temperature: float | None, seed: int) -> RunResult:
        return timed(lambda: train(split, cfg, F.cross_entropy, seed))

    def run_op(op: Operator):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            return timed(lambda: train(split, cfg, _operator_loss(op, cfg.k, float(temperature)), seed))

        return run

    methods = [Method("cross-entropy", "baseline", run_ce)]
    methods += [
        Method(f"top-k CE [{op.name}]", "operator", run_op(op), temperature_grid(op, grid), note=op.paper)
        for op in ops
    ]
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
            f"top-k CE = -log(0.5 softmax_y + 0.5 mask_y)." + (" " + "; ".join(notes) if notes else "")
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

"""(f) Top-k losses on heavy-tailed data (Garcin et al. 2022's imbalanced setting in miniature).

Garcin et al. 2022 smooth the top-k calibrated hinge loss with a noised (k+1)-th score
and, for heavy-tailed data (Pl@ntNet-300K), give rare classes larger margins (LDAM-style,
m_y proportional to n_y^{-1/4}). Here a real data set is subsampled so that its training
classes follow a power law, n_r = n_max (r + 1)^{-alpha} for the class of rank r (ranks
in a fixed random order of the classes; alpha set by the ratio n_max / n_min), while
the validation split (drawn from the training rows left over, the same number per
class) and the published test split are balanced: their top-k accuracy is the macro
average over classes, and the "tail" columns average the classes with the fewest
training rows (the rarest third).

Rows: cross-entropy (label-smoothing grid) and logit-adjusted cross-entropy (Menon et al.
2021, softmax of s + tau log prior, tau grid), the count-aware baseline; Petersen et
al.'s top-k cross-entropy with every registered mask operator and with the
straight-through hard top-k (temperature grids); Garcin et al.'s balanced top-k hinge
(noise scale grid) and imbalanced top-k hinge (grid of the rarest class's margin; scale
1, noise 1, as the features are not normalised). Every run keeps its epoch with the best
validation top-k accuracy. Expected from the paper: the imbalanced hinge improves top-k
accuracy on the tail classes over cross-entropy and the balanced hinge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import load
from ..losses import balanced_topk_hinge_loss, imbalanced_topk_hinge_loss, topk_cross_entropy
from ..registry import Operator
from ._baselines import STRAIGHT_THROUGH
from ._common import BestCheckpoint, batches, mlp, per_class_topk, predict, pretty
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

NAME = "imbalanced"
TITLE = "(f) Top-k losses on heavy-tailed classes"
GRID = (1.0, 10.0, 100.0)  # as in (a): operators' defaults (0.1) times 1, 10, 100
HINGE_EPSILON = 0.1  # the balanced hinge's noise scale grid: 0.1, 1, 10
MARGINS = (1.0, 2.0, 4.0)  # the imbalanced hinge's max_margin grid (a grid of size N takes N of them)
TAUS = (0.5, 1.0, 2.0)  # logit adjustment strengths

LossFn = Callable[[Tensor, Tensor, torch.Generator], Tensor]


@dataclass(frozen=True)
class Config:
    """Data set, tail profile, model and training budget."""

    dataset: str = "letter"
    k: int = 5
    n_max: int = 500
    ratio: float = 50.0  # n_max / n_min
    val_per_class: int = 20
    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 60
    batch: int = 128
    lr: float = 1e-3
    split_seed: int = 77


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(
            dataset="digits", k=2, n_max=100, ratio=10.0, val_per_class=10, hidden=(64,), epochs=12, lr=3e-3
        )
    ],
    "default": [
        Config(),
        Config(dataset="fashion-mnist", k=2, n_max=2000, ratio=100.0, epochs=30),
    ],
}


class LongTail:
    """A power-law training split, a balanced validation split and the published test split.

    ``counts[c]`` is the number of training rows of class c; ``tail`` the rarest third
    of the classes. ``train_index`` / ``val_index`` index ``data.x_train`` (disjoint),
    ``data.x_test`` is the test split; features are standardised with the training
    rows' statistics.
    """

    def __init__(self, data, cfg: Config) -> None:  # noqa: ANN001
        C = data.classes
        rng = np.random.default_rng(cfg.split_seed)
        alpha = math.log(cfg.ratio) / math.log(C)
        order = rng.permutation(C)  # order[r] = the class of rank r
        counts = np.zeros(C, dtype=np.int64)
        train, val = [], []
        for r, c in enumerate(order):
            rows = rng.permutation(np.flatnonzero(data.y_train == c))
            n = max(1, int(round(cfg.n_max * (r + 1) ** -alpha)))
            if n + cfg.val_per_class > len(rows):
                raise ValueError(
                    f"class {c} has {len(rows)} training rows, fewer than {n} + {cfg.val_per_class} "
                    "for training and validation"
                )
            counts[c] = n
            train.append(rows[:n])
            val.append(rows[n : n + cfg.val_per_class])
        self.train_index, self.val_index = np.concatenate(train), np.concatenate(val)
        x = data.x_train[self.train_index]
        mu, sd = x.mean(0), x.std(0) + 1e-6

        def t(a: np.ndarray) -> Tensor:
            return torch.as_tensor(((a - mu) / sd).astype(np.float32))

        self.x_train, self.y_train = t(x), torch.as_tensor(data.y_train[self.train_index])
        self.x_val, self.y_val = (
            t(data.x_train[self.val_index]),
            torch.as_tensor(data.y_train[self.val_index]),
        )
        self.x_test, self.y_test = t(data.x_test), torch.as_tensor(data.y_test)
        self.counts = counts
        self.classes, self.features, self.alpha = C, x.shape[1], alpha
        self.tail = torch.as_tensor(np.sort(order[C - max(1, round(C / 3)) :]))


def _metrics(scores: Tensor, y: Tensor, split: LongTail, k: int) -> dict[str, float]:
    top_k = per_class_topk(scores, y, k, split.classes)
    top_1 = per_class_topk(scores, y, 1, split.classes)
    return {
        f"top{k}": top_k.nanmean().item(),
        f"top{k} tail": top_k[split.tail].nanmean().item(),
        "top1": top_1.nanmean().item(),
        "top1 tail": top_1[split.tail].nanmean().item(),
    }


def train(split: LongTail, cfg: Config, loss_fn: LossFn, seed: int) -> RunResult:
    """Trains an MLP with ``loss_fn(scores, y, generator)``; macro top-k metrics at the best epoch."""
    g = seed_everything(seed)
    model = mlp([split.features, *cfg.hidden, split.classes])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    k = cfg.k
    best = BestCheckpoint(model)
    losses = []
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for idx in batches(len(split.y_train), cfg.batch, g):
            loss = loss_fn(model(split.x_train[idx]), split.y_train[idx], g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        best.update(_metrics(predict(model, split.x_val), split.y_val, split, k)[f"top{k}"], epoch)
    best.restore()
    return RunResult(
        test=_metrics(predict(model, split.x_test), split.y_test, split, k),
        val=_metrics(predict(model, split.x_val), split.y_val, split, k),
        losses=losses,
        extra={"best_epoch": best.step + 1},
    )


def logit_adjusted_loss(counts: np.ndarray, tau: float) -> LossFn:
    """Cross-entropy of s + tau log(prior) (Menon et al. 2021, logit adjustment)."""
    log_prior = torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32)
    return lambda s, y, g: F.cross_entropy(s + tau * log_prior, y)


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001
    data = load(cfg.dataset, data_dir)
    split = LongTail(data, cfg)
    ops, notes = mask_operators(only, shape=(cfg.batch, split.classes))
    k, n = cfg.k, len(grid)
    p_k = (0.5,) + (0.0,) * (k - 2) + (0.5,)
    counts = split.counts.tolist()

    def method(name: str, group: str, make: Callable[[float], LossFn], values, knob: str, note: str = ""):  # noqa: ANN001, ANN202
        def run(value: float | None, seed: int) -> RunResult:
            return timed(lambda: train(split, cfg, make(float(value)), seed))

        return Method(name, group, run, list(values), note=note, knob=knob)

    def topk_ce(op: Operator) -> Callable[[float], LossFn]:
        return lambda t: lambda s, y, g: topk_cross_entropy(s, y, p_k=p_k, method=bind(op, g), temperature=t)

    def ce(ls: float) -> LossFn:
        return lambda s, y, g: F.cross_entropy(s, y, label_smoothing=ls)

    def balanced(eps: float) -> LossFn:
        return lambda s, y, g: balanced_topk_hinge_loss(s, y, k, temperature=eps, generator=g)

    def imbalanced(m: float) -> LossFn:
        return lambda s, y, g: imbalanced_topk_hinge_loss(
            s, y, k, class_counts=counts, max_margin=m, scale=1.0, temperature=1.0, generator=g
        )

    st = STRAIGHT_THROUGH
    methods = [
        method("cross-entropy", "baseline", ce, smoothing_grid(n), "label smoothing"),
        method(
            "logit-adjusted CE",
            "baseline",
            lambda tau: logit_adjusted_loss(split.counts, tau),
            _take(TAUS, n),
            "tau",
            "Menon et al. 2021",
        ),
        method(f"top-k CE [{st.name}]", "baseline", topk_ce(st), temperature_grid(st, grid), "temperature"),
    ]
    methods += [
        method(
            f"top-k CE [{op.name}]",
            "operator",
            topk_ce(op),
            temperature_grid(op, grid),
            "temperature",
            op.paper,
        )
        for op in ops
    ]
    methods += [
        method(
            "top-k hinge [balanced]",
            "operator",
            balanced,
            [float(f"{HINGE_EPSILON * m:.6g}") for m in grid],
            "temperature",
            "Garcin et al. 2022, margin 1",
        ),
        method(
            "top-k hinge [imbalanced]",
            "operator",
            imbalanced,
            _take(MARGINS, n),
            "max margin",
            "Garcin et al. 2022, LDAM margins, scale 1, noise 1",
        ),
    ]
    tail = ", ".join(str(int(c)) for c in split.tail)
    return Setting(
        key=f"{cfg.dataset}-k{k}-ratio{int(cfg.ratio)}",
        title=f"{pretty(cfg.dataset)}, k = {k}, power-law classes (n_max / n_min = {cfg.ratio:g})",
        methods=methods,
        select=f"top{k}",
        metrics=[f"top{k}", f"top{k} tail", "top1", "top1 tail"],
        description=(
            f"{len(split.y_train)} training rows, {int(split.counts.max())} down to "
            f"{int(split.counts.min())} per class (alpha = {split.alpha:.2f}); balanced validation "
            f"({cfg.val_per_class} per class) and test ({len(split.y_test)} rows); top-k columns are "
            f"macro averages over classes, 'tail' over the {len(split.tail)} rarest classes ({tail}). "
            f"MLP {split.features}-{'-'.join(map(str, cfg.hidden))}-{split.classes}, Adam {cfg.lr:g}, "
            f"batch {cfg.batch}, {cfg.epochs} epochs, best validation epoch kept; "
            "top-k CE = -log(0.5 softmax_y + 0.5 mask_y)." + (" " + "; ".join(notes) if notes else "")
        ),
    )


def _take(values: tuple[float, ...], n: int) -> list[float | None]:
    if n > len(values):
        raise ValueError(f"a grid of {n} values is larger than the {len(values)} defined: {values}")
    middle = (len(values) - n) // 2
    return list(values[middle : middle + n])


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

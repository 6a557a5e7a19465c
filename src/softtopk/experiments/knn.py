"""(b) Differentiable kNN on Fashion-MNIST (Grover et al. 2019 protocol; Xie et al. 2020).

An embedding MLP is trained so that, for each query, the soft top-k mask over a batch of
random candidates (scores: minus squared distances between unit-norm embeddings) puts
its mass on candidates of the query's class: loss = -(1/k) sum_j m_j 1[y_j = y_q]. Test:
hard k-nearest-neighbour vote in the learned embedding against the training set.
Baselines: kNN on raw pixels (no training), kNN on the penultimate layer of the same
MLP trained with cross-entropy (label-smoothing grid), and the soft kNN loss with the
straight-through hard top-k. Configurations are chosen by validation kNN accuracy; every
trained run keeps its evaluation step with the best validation kNN accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load
from ..nn.functional import soft_knn, soft_knn_loss
from ..registry import Operator
from ._baselines import STRAIGHT_THROUGH
from ._common import BestCheckpoint, Split, batches, mlp, predict, pretty
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

NAME = "knn"
TITLE = "(b) Differentiable kNN"
GRID = (0.1, 1.0, 10.0)  # scores are minus squared distances of unit vectors, in [-4, 0]


@dataclass(frozen=True)
class Config:
    """Data sizes, embedding net and training budget."""

    dataset: str = "fashion-mnist"
    k: int = 9
    train_size: int | None = 10_000
    test_size: int | None = 2_000
    hidden: tuple[int, ...] = (256,)
    dim: int = 64
    steps: int = 600
    queries: int = 100
    candidates: int = 100
    lr: float = 1e-3
    evaluations: int = 10  # validation kNN accuracy checks for early stopping


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(
            dataset="digits",
            train_size=None,
            test_size=None,
            hidden=(64,),
            dim=16,
            steps=60,
            queries=32,
            candidates=50,
        )
    ],
    "default": [Config()],
}


def knn_accuracy(bank: Tensor, bank_y: Tensor, query: Tensor, query_y: Tensor, k: int, classes: int) -> float:
    """Hard kNN majority vote (ties to the nearest neighbour's class), in chunks."""
    correct = 0
    for i in range(0, len(query), 512):
        d = torch.cdist(query[i : i + 512], bank)
        idx = d.topk(k, dim=-1, largest=False).indices
        votes = F.one_hot(bank_y[idx], classes).float()
        votes += 1e-3 * F.one_hot(bank_y[idx[:, 0]], classes).float()[:, None, :] / k  # tie-break
        correct += (votes.sum(1).argmax(-1) == query_y[i : i + 512]).sum().item()
    return correct / len(query)


def _embed(model: nn.Module, x: Tensor) -> Tensor:
    return F.normalize(predict(model, x), dim=-1)


def _val_accuracy(split: Split, cfg: Config, model: nn.Module) -> float:
    bank = _embed(model, split.x_train)
    return knn_accuracy(bank, split.y_train, _embed(model, split.x_val), split.y_val, cfg.k, split.classes)


def _every(cfg: Config) -> int:
    return max(1, cfg.steps // cfg.evaluations)


def train_knn(split: Split, cfg: Config, op: Operator, temperature: float, seed: int) -> RunResult:
    """Trains the embedding with the soft kNN loss of ``op``; kNN accuracies at the best validation step."""
    g = seed_everything(seed)
    model = mlp([split.features, *cfg.hidden, cfg.dim])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(split.y_train)
    method = bind(op, g)
    best = BestCheckpoint(model)
    losses, window = [], []
    for step in range(cfg.steps):
        q = torch.randint(0, n, (cfg.queries,), generator=g)
        c = torch.randint(0, n, (cfg.candidates,), generator=g)
        emb = F.normalize(model(split.x_train[torch.cat([q, c])]), dim=-1)
        votes = soft_knn(
            emb[: cfg.queries],
            emb[cfg.queries :],
            split.y_train[c],
            cfg.k,
            num_classes=split.classes,
            method=method,
            temperature=temperature,
        )
        loss = soft_knn_loss(votes, split.y_train[q])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if (step + 1) % max(1, cfg.steps // 20) == 0:
            losses.append(sum(window) / len(window))
            window = []
        if (step + 1) % _every(cfg) == 0:
            best.update(_val_accuracy(split, cfg, model), step)
    best.restore()
    return _evaluate(split, cfg, model, losses, best.step + 1)


def _evaluate(split: Split, cfg: Config, model: nn.Module, losses: list[float], best_step: int) -> RunResult:
    bank = _embed(model, split.x_train)
    c = split.classes
    val = knn_accuracy(bank, split.y_train, _embed(model, split.x_val), split.y_val, cfg.k, c)
    test = knn_accuracy(bank, split.y_train, _embed(model, split.x_test), split.y_test, cfg.k, c)
    return RunResult(
        test={f"{cfg.k}-NN acc": test},
        val={f"{cfg.k}-NN acc": val},
        losses=losses,
        extra={"best_step": best_step},
    )


def train_ce(split: Split, cfg: Config, smoothing: float, seed: int) -> RunResult:
    """The same MLP with a linear head trained by cross-entropy; kNN on its embedding."""
    g = seed_everything(seed)
    body = mlp([split.features, *cfg.hidden, cfg.dim])
    head = nn.Linear(cfg.dim, split.classes)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=cfg.lr)
    best = BestCheckpoint(body)
    losses: list[float] = []
    steps = 0
    while steps < cfg.steps:
        for idx in batches(len(split.y_train), cfg.queries + cfg.candidates, g):
            logits = head(torch.relu(body(split.x_train[idx])))
            loss = F.cross_entropy(logits, split.y_train[idx], label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if steps % max(1, cfg.steps // 20) == 0:
                losses.append(loss.item())
            if steps % _every(cfg) == 0:
                best.update(_val_accuracy(split, cfg, body), steps - 1)
            if steps >= cfg.steps:
                break
    best.restore()
    return _evaluate(split, cfg, body, losses, best.step + 1)


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001
    data = load(cfg.dataset, data_dir)
    split = Split(data, train_size=cfg.train_size, test_size=cfg.test_size)
    ops, notes = mask_operators(only, shape=(cfg.queries, cfg.candidates))

    def run_raw(temperature: float | None, seed: int) -> RunResult:
        def go() -> RunResult:
            c, k = split.classes, cfg.k
            val = knn_accuracy(split.x_train, split.y_train, split.x_val, split.y_val, k, c)
            test = knn_accuracy(split.x_train, split.y_train, split.x_test, split.y_test, k, c)
            return RunResult(test={f"{k}-NN acc": test}, val={f"{k}-NN acc": val}, losses=[])

        return timed(go)

    def run_ce(smoothing: float | None, seed: int) -> RunResult:
        return timed(lambda: train_ce(split, cfg, float(smoothing), seed))

    def run_op(op: Operator):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            return timed(lambda: train_knn(split, cfg, op, float(temperature), seed))

        return run

    st = STRAIGHT_THROUGH
    methods = [
        Method("raw-pixel kNN", "baseline", run_raw, note="no training (deterministic)", untrained=True),
        Method(
            "CE embedding + kNN",
            "baseline",
            run_ce,
            smoothing_grid(len(grid)),
            note="same MLP, linear head, cross-entropy",
            knob="label smoothing",
        ),
        Method(f"soft kNN [{st.name}]", "baseline", run_op(st), temperature_grid(st, grid), note=st.paper),
    ]
    methods += [
        Method(f"soft kNN [{op.name}]", "operator", run_op(op), temperature_grid(op, grid), note=op.paper)
        for op in ops
    ]
    return Setting(
        key=f"{cfg.dataset}-k{cfg.k}",
        title=f"{pretty(cfg.dataset)}, {cfg.k}-NN",
        methods=methods,
        select=f"{cfg.k}-NN acc",
        metrics=[f"{cfg.k}-NN acc"],
        description=(
            f"embedding MLP {split.features}-{'-'.join(map(str, cfg.hidden))}-{cfg.dim} (unit norm), "
            f"{cfg.steps} Adam steps (lr {cfg.lr:g}) of {cfg.queries} queries x {cfg.candidates} candidates; "
            f"{cfg.k}-NN vote against {len(split.y_train)} training rows, {len(split.y_test)} test rows; "
            f"every trained run keeps the best of {cfg.evaluations} validation checks."
            + (" " + "; ".join(notes) if notes else "")
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

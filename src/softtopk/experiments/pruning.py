"""(d) Magnitude pruning at high sparsity (Sander et al. 2023's top-k-in-magnitude use).

LeNet-300-100 (784-300-100-10) on Fashion-MNIST. Each weight matrix W with N entries
keeps k = (1 - sparsity) N of them. During training the forward pass uses
W_eff = op(W): a registered magnitude operator applied to W directly, or, for a mask
operator, W * m_k(abs(W) / rms(W)) (the scale makes one temperature grid fit every layer).
At test time every method is projected to the exact hard top-k in magnitude, so all
rows of the table have the same true sparsity; the gap between the accuracy with
op(W) and with the hard projection is reported too (train/test mismatch).
Baselines: the dense network (reference), one-shot magnitude pruning of the dense
network with and without fine-tuning of the surviving weights, and training through the
hard top-k magnitude with a straight-through gradient; each baseline has a learning-rate
grid (the dense training's, for the one-shot rows), the operators a temperature grid.
Every training phase keeps its epoch with the best validation accuracy (after the hard
projection, for the pruned networks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load
from ..registry import Operator
from ._common import BestCheckpoint, Split, batches, pretty
from ._runner import (
    Method,
    RunResult,
    Setting,
    lr_grid,
    mask_operators,
    seed_everything,
    temperature_grid,
    timed,
)

NAME = "pruning"
TITLE = "(d) Magnitude pruning"
GRID = (0.1, 1.0, 10.0)

WeightOp = Callable[[Tensor, int], Tensor]  # (W flattened, k) -> effective W flattened


@dataclass(frozen=True)
class Config:
    """Data sizes, sparsity and training budget."""

    dataset: str = "fashion-mnist"
    sparsity: float = 0.95
    hidden: tuple[int, ...] = (300, 100)
    train_size: int | None = 10_000
    test_size: int | None = 5_000
    epochs: int = 5
    finetune_epochs: int = 2
    batch: int = 256
    lr: float = 1e-3


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(dataset="digits", sparsity=0.9, hidden=(64, 32), train_size=None, test_size=None, epochs=4)
    ],
    "default": [Config(sparsity=s) for s in (0.9, 0.98, 0.99)],
}


def hard_keep(w: Tensor, k: int) -> Tensor:
    """The exact top-k-in-magnitude projection of a flattened weight."""
    return torch.zeros_like(w).scatter(0, w.abs().topk(k).indices, 1.0) * w


class PrunedMLP(nn.Module):
    """An MLP whose weight matrices pass through ``weight_op`` (or the hard projection)."""

    def __init__(self, sizes: list[int], sparsity: float, weight_op: WeightOp | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.ks = [max(1, round((1 - sparsity) * layer.weight.numel())) for layer in self.layers]
        self.weight_op = weight_op
        self.mode = "op"  # "op": W_eff = op(W); "hard": exact hard projection; "dense": W

    def effective(self, i: int) -> Tensor:
        w = self.layers[i].weight
        if self.mode == "dense" or (self.mode == "op" and self.weight_op is None):
            return w
        flat = w.reshape(-1)
        out = hard_keep(flat, self.ks[i]) if self.mode == "hard" else self.weight_op(flat, self.ks[i])
        return out.reshape(w.shape)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.linear(x, self.effective(i), layer.bias)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def _fit(
    model: PrunedMLP,
    split: Split,
    epochs: int,
    lr: float,
    batch: int,
    g: torch.Generator,
    select: str = "hard",
) -> list[float]:
    """Trains ``model`` and restores its epoch with the best validation accuracy in mode ``select``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = BestCheckpoint(model)
    losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for idx in batches(len(split.y_train), batch, g):
            loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        best.update(_accuracy(model, split.x_val, split.y_val, select), epoch)
    best.restore()
    return losses


@torch.no_grad()
def _accuracy(model: PrunedMLP, x: Tensor, y: Tensor, mode: str) -> float:
    before, model.mode = model.mode, mode
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.mode = before
    return acc


def _result(model: PrunedMLP, split: Split, losses: list[float], soft: bool = True) -> RunResult:
    hard_test = _accuracy(model, split.x_test, split.y_test, "hard")
    soft_test = _accuracy(model, split.x_test, split.y_test, "op") if soft else hard_test
    return RunResult(
        test={"accuracy (hard)": hard_test, "mismatch": soft_test - hard_test},
        val={"accuracy (hard)": _accuracy(model, split.x_val, split.y_val, "hard")},
        losses=losses,
    )


def train_pruned(
    split: Split,
    cfg: Config,
    weight_op: Callable[[torch.Generator], WeightOp],
    seed: int,
    lr: float | None = None,
) -> RunResult:
    """Trains through ``weight_op(generator)``; the weights are tested after the hard projection."""
    g = seed_everything(seed)
    model = PrunedMLP([split.features, *cfg.hidden, split.classes], cfg.sparsity, weight_op(g))
    return _result(model, split, _fit(model, split, cfg.epochs, cfg.lr if lr is None else lr, cfg.batch, g))


def straight_through(w: Tensor, k: int) -> Tensor:
    """Hard top-k magnitude forward, identity backward (pruned weights can come back)."""
    return w + (hard_keep(w, k) - w).detach()


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001
    data = load(cfg.dataset, data_dir)
    split = Split(data, train_size=cfg.train_size, test_size=cfg.test_size)
    sizes = [split.features, *cfg.hidden, split.classes]
    largest = max(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    # One call per weight matrix: the largest keeps k = (1 - sparsity) n of its n entries,
    # which an O(k n)-memory operator cannot hold at these sizes (k n = 5.5e9 at 90 %).
    kept = max(1, round((1 - cfg.sparsity) * largest))
    ops, notes = mask_operators(only, shape=(1, largest), k=kept, kinds=("mask", "magnitude"))
    dense_models: dict[tuple[float, int], tuple[PrunedMLP, list[float]]] = {}

    def dense(lr: float, seed: int) -> tuple[PrunedMLP, list[float]]:
        # Trained once per (lr, seed) and shared by the dense and one-shot rows (best dense epoch).
        if (lr, seed) not in dense_models:
            g = seed_everything(seed)
            model = PrunedMLP(sizes, cfg.sparsity, None)
            dense_models[(lr, seed)] = (model, _fit(model, split, cfg.epochs, lr, cfg.batch, g, "dense"))
        return dense_models[(lr, seed)]

    def run_dense(lr: float | None, seed: int) -> RunResult:
        def go() -> RunResult:
            model, losses = dense(float(lr), seed)
            acc = _accuracy(model, split.x_test, split.y_test, "dense")
            val = _accuracy(model, split.x_val, split.y_val, "dense")
            return RunResult({"accuracy (hard)": acc, "mismatch": 0.0}, {"accuracy (hard)": val}, losses)

        return timed(go)

    def run_oneshot(lr: float | None, seed: int) -> RunResult:
        return timed(lambda: _result(dense(float(lr), seed)[0], split, dense(float(lr), seed)[1], soft=False))

    def run_finetune(lr: float | None, seed: int) -> RunResult:
        def go() -> RunResult:
            base, losses = dense(float(lr), seed)
            model = PrunedMLP(sizes, cfg.sparsity, None)
            model.load_state_dict(base.state_dict())
            model.mode = "hard"
            g = seed_everything(1000 + seed)
            opt_losses = _fit_hard(model, split, cfg, g, float(lr))
            model.mode = "op"
            return _result(model, split, losses + opt_losses, soft=False)

        return timed(go)

    def run_ste(lr: float | None, seed: int) -> RunResult:
        return timed(lambda: train_pruned(split, cfg, lambda g: straight_through, seed, lr=float(lr)))

    def run_op(op: Operator):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            t = float(temperature)

            def make(g: torch.Generator) -> WeightOp:
                if op.kind == "magnitude":
                    return lambda w, k: op(w, k, -1, temperature=t, generator=g)

                def weight_op(w: Tensor, k: int) -> Tensor:
                    scale = w.detach().pow(2).mean().sqrt().clamp_min(1e-12)
                    return w * op(w.abs() / scale, k, -1, temperature=t, generator=g)

                return weight_op

            return timed(lambda: train_pruned(split, cfg, make, seed))

        return run

    pct = f"{cfg.sparsity:.0%}"
    lrs = lr_grid(cfg.lr, len(grid))
    methods = [
        Method("dense (no pruning)", "baseline", run_dense, lrs, note="reference: 0% sparsity", knob="lr"),
        Method(
            "one-shot magnitude",
            "baseline",
            run_oneshot,
            lrs,
            note="dense training, then hard top-k",
            knob="lr",
        ),
        Method(f"one-shot + {cfg.finetune_epochs} ep fine-tune", "baseline", run_finetune, lrs, knob="lr"),
        Method("hard top-k, straight-through", "baseline", run_ste, lrs, knob="lr"),
    ]
    methods += [
        Method(
            f"{'topk_mag' if op.kind == 'magnitude' else 'W * mask'} [{op.name}]",
            "operator",
            run_op(op),
            temperature_grid(op, grid),
            note=op.paper,
        )
        for op in ops
    ]
    return Setting(
        key=f"{cfg.dataset}-sparsity{round(cfg.sparsity * 100)}",
        title=f"{pretty(cfg.dataset)}, {pct} sparsity per layer",
        methods=methods,
        select="accuracy (hard)",
        metrics=["accuracy (hard)", "mismatch"],
        description=(
            f"MLP {'-'.join(map(str, sizes))}, Adam {cfg.lr:g}, batch {cfg.batch}, {cfg.epochs} epochs on "
            f"{len(split.y_train)} rows; every weight matrix keeps {1 - cfg.sparsity:.0%} of its entries; "
            f"test accuracy after the exact hard projection on {len(split.y_test)} rows; "
            "'mismatch' = accuracy with op(W) minus accuracy after projection."
            + (" " + "; ".join(notes) if notes else "")
        ),
    )


def _fit_hard(model: PrunedMLP, split: Split, cfg: Config, g: torch.Generator, lr: float) -> list[float]:
    """Fine-tunes the surviving weights of a hard-projected model (the mask is fixed)."""
    masks = [(model.effective(i) != 0).float().detach() for i in range(len(model.layers))]
    model.mode = "dense"
    with torch.no_grad():
        for layer, m in zip(model.layers, masks, strict=True):
            layer.weight.mul_(m)
    hooks = [
        layer.weight.register_hook(lambda grad, m=m: grad * m)
        for layer, m in zip(model.layers, masks, strict=True)
    ]
    try:
        return _fit(model, split, cfg.finetune_epochs, lr, cfg.batch, g, "dense")
    finally:
        for h in hooks:
            h.remove()


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

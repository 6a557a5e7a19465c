"""(i) Top-k sparse autoencoders on the hidden activations of a Fashion-MNIST MLP.

An MLP (784-256-256-10) is trained once on Fashion-MNIST; its first hidden layer (256
ReLU units) is the activation the SAEs learn to reconstruct, with m = 4 x 256 latents.
Each table fixes the sparsity k and compares TopK (Gao et al. 2024, with and without
the AuxK loss), BatchTopK (Bussmann et al. 2024, inference by the JumpReLU threshold
estimated in training) and the same two selections with a soft top-k mask of the
registry. Metrics on the test split, every SAE in eval() (BatchTopK with its threshold):
explained variance 1 - FVU; L0 (mean active latents per sample); dead latents (% that
never fire on the test split); L0 gap = abs(test L0 / train L0 - 1) in %, which says
whether the exported threshold reproduces the training sparsity; the MLP's accuracy
with the hidden layer replaced by its reconstruction (spliced accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import load
from ..nn import TopKSAE
from ._common import Split, batches, mlp, pretty
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

NAME = "sae"
TITLE = "(i) Top-k sparse autoencoders"
GRID = (1.0,)  # one temperature: the registered default, in pre-activation units (about 1)


@dataclass(frozen=True)
class Config:
    """The MLP whose activations are encoded, the SAE's shape and the training budget."""

    dataset: str = "fashion-mnist"
    k: int = 16
    train_size: int | None = 12_000
    test_size: int | None = 5_000
    hidden: int = 256
    mlp_epochs: int = 5
    expansion: int = 4
    epochs: int = 6
    batch: int = 256
    lr: float = 1e-3
    dead_after: int = 10_000  # samples: about one epoch of the SAE's training set


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(
            dataset="digits",
            k=4,
            train_size=None,
            test_size=None,
            hidden=32,
            mlp_epochs=8,
            expansion=4,
            epochs=8,
            batch=64,
            lr=3e-3,
            dead_after=2_000,
        )
    ],
    "default": [Config(k=8), Config(k=16), Config(k=32)],
}


class Activations:
    """A trained MLP and the hidden activations of the three splits (computed once per setting)."""

    def __init__(self, split: Split, cfg: Config) -> None:
        g = seed_everything(0)
        self.net = mlp([split.features, cfg.hidden, cfg.hidden, split.classes])
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        for _ in range(cfg.mlp_epochs):
            for idx in batches(len(split.y_train), 128, g):
                loss = F.cross_entropy(self.net(split.x_train[idx]), split.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            self.train, self.val, self.test = (
                self.hidden(x) for x in (split.x_train, split.x_val, split.x_test)
            )
            self.clean_accuracy = self.accuracy(self.test, split.y_test)
        self.split = split

    def hidden(self, x: Tensor) -> Tensor:
        """The first hidden layer after its ReLU: the activation the SAE encodes."""
        return self.net[1](self.net[0](x))

    def head(self, h: Tensor) -> Tensor:
        return self.net[2:](h)

    def accuracy(self, h: Tensor, y: Tensor) -> float:
        return (self.head(h).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def evaluate(sae: TopKSAE, acts: Activations, h: Tensor, y: Tensor) -> dict[str, float]:
    sae.eval()
    out = sae(h)
    sae.train()
    fired = (out.latents != 0).any(0)
    return {
        "explained var": 1.0 - out.fvu.item(),
        "L0": out.l0.item(),
        "dead %": 100.0 * (1.0 - fired.double().mean().item()),
        "spliced acc": acts.accuracy(out.recon, y),
    }


def train_sae(
    acts: Activations,
    cfg: Config,
    *,
    activation: str,
    method: object,
    temperature: float | None,
    aux: bool,
    seed: int,
    lr: float | None = None,
) -> RunResult:
    g = seed_everything(seed)
    h = acts.train
    sae = TopKSAE(
        h.shape[-1],
        cfg.expansion * h.shape[-1],
        cfg.k,
        activation=activation,
        method=method,
        temperature=temperature,
        generator=g,
        aux_coefficient=1.0 / 32.0 if aux else 0.0,
        dead_after=cfg.dead_after,
    )
    sae.init_pre_bias(h)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr if lr is None else lr)
    steps = cfg.epochs * -(-len(h) // cfg.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 5.0 * (1.0 - s / steps)))
    losses = []
    for _ in range(cfg.epochs):
        total = count = l0 = 0.0
        for idx in batches(len(h), cfg.batch, g):
            out = sae(h[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            total += out.fvu.item() * len(idx)
            l0 += out.l0.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        train_l0 = l0 / count  # the last epoch's training sparsity
    test = evaluate(sae, acts, acts.test, acts.split.y_test)
    val = evaluate(sae, acts, acts.val, acts.split.y_val)
    test["train L0"] = train_l0
    test["L0 gap %"] = 100.0 * abs(test["L0"] / train_l0 - 1.0)
    return RunResult(
        test=test,
        val=val,
        losses=losses,
        extra={"threshold": float(sae.threshold), "dead (training counter)": sae.dead_latents},
    )


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None, acts=None) -> Setting:  # noqa: ANN001
    if acts is None:
        split = Split(load(cfg.dataset, data_dir), train_size=cfg.train_size, test_size=cfg.test_size)
        acts = Activations(split, cfg)
    split = acts.split
    m = cfg.expansion * cfg.hidden
    # TopK selects k of m per sample; BatchTopK selects k x batch of the flattened batch.
    ops, notes = mask_operators(only, shape=(cfg.batch, m), k=cfg.k)
    batch_ops, batch_notes = mask_operators(only, shape=(1, cfg.batch * m), k=cfg.k * cfg.batch)
    notes += [f"BatchTopK: {n}" for n in batch_notes if n not in notes]

    def run(activation: str, method: object, aux: bool = True, knob: str = "temperature"):  # noqa: ANN202
        def go(value: float | None, seed: int) -> RunResult:
            v = None if value is None else float(value)
            t, lr = (v, None) if knob == "temperature" else (None, v)
            return timed(
                lambda: train_sae(
                    acts, cfg, activation=activation, method=method, temperature=t, aux=aux, seed=seed, lr=lr
                )
            )

        return go

    # The hard baselines have no temperature: they get a learning-rate grid of the same size.
    lrs = lr_grid(cfg.lr, len(grid))
    methods = [
        Method(
            "TopK",
            "baseline",
            run("topk", "hard", knob="lr"),
            lrs,
            note="Gao et al. 2024, AuxK 1/32",
            knob="lr",
        ),
        Method(
            "TopK, no AuxK",
            "baseline",
            run("topk", "hard", aux=False, knob="lr"),
            lrs,
            note="ablation",
            knob="lr",
        ),
        Method(
            "BatchTopK",
            "baseline",
            run("batch_topk", "hard", knob="lr"),
            lrs,
            note="Bussmann et al. 2024, JumpReLU inference",
            knob="lr",
        ),
    ]
    for op in ops:
        grid_t = temperature_grid(op, grid)
        methods.append(Method(f"TopK [{op.name}]", "operator", run("topk", op.name), grid_t, note=op.paper))
        if op in batch_ops:
            methods.append(
                Method(
                    f"BatchTopK [{op.name}]", "operator", run("batch_topk", op.name), grid_t, note=op.paper
                )
            )
    return Setting(
        key=f"{cfg.dataset}-k{cfg.k}",
        title=f"{pretty(cfg.dataset)} MLP activations, k = {cfg.k}",
        methods=methods,
        select="explained var",
        metrics=["explained var", "L0", "dead %", "L0 gap %", "spliced acc", "train L0"],
        lower_is_better=("dead %", "L0 gap %"),
        description=(
            f"SAE {cfg.hidden} -> {m} latents on the first hidden layer of an MLP "
            f"{split.features}-{cfg.hidden}-{cfg.hidden}-{split.classes} (test accuracy "
            f"{acts.clean_accuracy:.3f}), {len(split.y_train)} training samples, Adam {cfg.lr:g} "
            f"(linear decay over the last 80 %), batch {cfg.batch}, {cfg.epochs} epochs, decoder rows "
            f"at unit norm, b_pre = data mean; dead = never fires on the test split; a latent counts "
            f"as dead for AuxK after {cfg.dead_after} training samples without firing. "
            "Evaluation in eval(): BatchTopK rows use the JumpReLU threshold exported from "
            "training." + (" " + "; ".join(notes) if notes else "")
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``); one MLP for all."""
    out: list[Setting] = []
    cache: dict[tuple, Activations] = {}
    for c in SIZES[size]:
        key = (c.dataset, c.hidden, c.mlp_epochs, c.train_size, c.test_size)
        if key not in cache:
            split = Split(load(c.dataset, data_dir), train_size=c.train_size, test_size=c.test_size)
            cache[key] = Activations(split, c)
        out.append(make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir, acts=cache[key]))
    return out

"""(l) Mixture-of-depths language model: top-k token routing against MoDification's threshold-p.

Data as :mod:`.lm_moe` (the Python standard library's ``.py`` sources, bytes, split by
file). Model: byte embedding and learned positions, ``layers`` pre-norm transformer
blocks (causal self-attention and an MLP) of which every second one is routed by a
:class:`softtopk.nn.DepthRouter`: only the tokens it keeps run the block
(:func:`softtopk.nn.functional.depth_dispatch`), the others skip it through the residual.

* dense: every block runs on every token (fraction 1);
* top-k (MoD, Raposo et al. 2024): each sequence keeps its top ``capacity * T`` tokens in
  training; decoding keeps token i iff sigmoid(l_i) >= 1/2, a predictor trained by the
  auxiliary BCE against the top-k choice (added to the loss);
* threshold-p (MoDification, Zhang et al. 2024): token i runs the block iff
  sigmoid(l_i) >= p, in training and decoding alike (causal);
* the library's soft masks in either rule (``top-k [op]``: the soft top-k of the
  logits; ``threshold-p [op]``: :func:`softtopk.soft_threshold_p_mask`).

Reported: the test loss with the causal per-token decisions of decoding (eval mode),
and the fraction of (token, routed block) pairs processed, in training and at test, so
the loss reads against the compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Text, load_text
from ..nn import DepthRouter
from ..nn.functional import depth_dispatch
from ..registry import Operator
from ._common import BestCheckpoint
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
from .lm_moe import sample_batch, windows

NAME = "mod"
TITLE = "(l) Mixture-of-depths language model: top-k against threshold-p routing"
GRID = (0.1, 1.0, 10.0)
DEFAULT_ONLY = ("sparse",)


@dataclass(frozen=True)
class Config:
    """Corpus size, model shape, routing budget and training budget."""

    max_bytes: int = 2_000_000
    context: int = 32
    width: int = 48
    heads: int = 4
    layers: int = 4
    hidden: int = 96
    capacity: float = 0.5
    threshold: float = 0.5
    batch: int = 16
    steps: int = 200
    eval_every: int = 50
    eval_windows: int = 128
    lr: float = 3e-3


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(
            max_bytes=60_000,
            context=16,
            width=16,
            heads=2,
            layers=2,
            hidden=16,
            batch=8,
            steps=12,
            eval_every=6,
            eval_windows=16,
        )
    ],
    "default": [Config()],
}


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP; :meth:`delta` is the block's residual update."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.width)
        )

    def delta(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
        a = self.n1(x)
        h = self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.n2(x + h))


class MoDLM(nn.Module):
    """Byte LM whose odd-numbered blocks are routed by a :class:`DepthRouter` (None: dense)."""

    def __init__(self, cfg: Config, router: dict | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.routers = nn.ModuleDict(
            {str(i): DepthRouter(cfg.width, causal=True, **router) for i in range(1, cfg.layers, 2)}
            if router is not None
            else {}
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 256)
        self.aux = torch.zeros(())
        self.processed: list[float] = []

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        aux, processed = 0.0, []
        for i, block in enumerate(self.blocks):
            router = self.routers[str(i)] if str(i) in self.routers else None
            if router is None:
                h = h + block.delta(h)
                continue
            route = router(h)
            aux = aux + route.aux_loss
            processed.append((route.mask.detach() > 0).float().mean().item())
            h = depth_dispatch(h, route, block.delta)
        self.aux, self.processed = aux, processed
        return self.head(self.norm(h))


@torch.no_grad()
def evaluate(model: MoDLM, data: Tensor, chunk: int = 64) -> dict[str, float]:
    """Mean next-byte loss and fraction of routed (token, block) pairs processed, in eval mode."""
    model.eval()
    total, count, fractions = 0.0, 0, []
    for i in range(0, len(data), chunk):
        w = data[i : i + chunk]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
        fractions += [f * len(w) for f in model.processed]
    model.train()
    n_routed = max(1, len(model.routers))
    frac = sum(fractions) / (len(data) * n_routed) if model.routers else 1.0
    return {"loss": total / count, "fraction": frac}


def train_lm(text: Text, cfg: Config, router: dict | None, seed: int, lr: float) -> RunResult:
    """Trains :class:`MoDLM`; keeps the evaluation with the best validation loss."""
    g = seed_everything(seed)
    model = MoDLM(cfg, router)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    train = torch.as_tensor(text.train.astype(np.int64))
    val = windows(text.val, cfg.eval_windows, cfg.context, 1)
    test = windows(text.test, cfg.eval_windows, cfg.context, 2)
    best = BestCheckpoint(model)
    losses, window, frac_train = [], [], []
    for step in range(1, cfg.steps + 1):
        w = sample_batch(train, cfg.batch, cfg.context, g)
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + model.aux).backward()
        opt.step()
        window.append(loss.item())
        frac_train.append(sum(model.processed) / len(model.processed) if model.processed else 1.0)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            losses.append(sum(window) / len(window))
            window = []
            v = evaluate(model, val)["loss"]
            best.update(-v if math.isfinite(v) else -math.inf, step)
    best.restore()
    v, t = evaluate(model, val), evaluate(model, test)
    tail = frac_train[len(frac_train) // 2 :]
    return RunResult(
        test={
            "test loss": t["loss"],
            "val loss": v["loss"],
            "fraction processed (test)": t["fraction"],
            "fraction processed (train)": sum(tail) / len(tail),
        },
        val={"neg val loss": -v["loss"]},
        losses=losses,
        extra={"best_step": best.step},
    )


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001, ARG001
    text = load_text(cfg.max_bytes)
    ops, notes = mask_operators(only or DEFAULT_ONLY, shape=(cfg.batch, cfg.context))
    lrs = lr_grid(cfg.lr, len(grid))

    def baseline(router: dict | None):  # noqa: ANN202
        return lambda lr, seed: timed(lambda: train_lm(text, cfg, router, seed, float(lr)))

    def run_op(op: Operator, rule: dict):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            router = {**rule, "method": op.name, "temperature": float(temperature)}
            return timed(lambda: train_lm(text, cfg, router, seed, cfg.lr))

        return run

    cap, p = {"capacity": cfg.capacity}, {"threshold": cfg.threshold}
    methods = [
        Method("dense (every token)", "baseline", baseline(None), lrs, note="fraction 1", knob="lr"),
        Method(
            f"top-k (MoD, capacity {cfg.capacity:g})",
            "baseline",
            baseline({**cap, "method": "hard"}),
            lrs,
            note="Raposo et al. 2024; decoding: s >= 1/2 predictor (aux BCE)",
            knob="lr",
        ),
        Method(
            f"threshold-p (MoDification, p = {cfg.threshold:g})",
            "baseline",
            baseline({**p, "method": "hard"}),
            lrs,
            note="Zhang et al. 2024; s >= p in training and decoding",
            knob="lr",
        ),
    ]
    for op in ops:
        methods.append(
            Method(
                f"top-k [{op.name}]", "operator", run_op(op, cap), temperature_grid(op, grid), note=op.paper
            )
        )
        methods.append(
            Method(
                f"threshold-p [{op.name}]",
                "operator",
                run_op(op, p),
                temperature_grid(op, grid),
                note=op.paper,
            )
        )
    files = {s: len(v) for s, v in text.files.items()}
    routed = len(range(1, cfg.layers, 2))
    return Setting(
        key=f"stdlib-L{cfg.layers}-c{cfg.capacity:g}-p{cfg.threshold:g}",
        title=(
            f"Python standard library bytes, {cfg.layers} blocks ({routed} routed), "
            f"capacity {cfg.capacity:g} / threshold {cfg.threshold:g}"
        ),
        methods=methods,
        select="neg val loss",
        metrics=["test loss", "val loss", "fraction processed (test)", "fraction processed (train)"],
        lower_is_better=("test loss", "val loss", "fraction processed (test)", "fraction processed (train)"),
        description=(
            f"Byte-level LM on {len(text.train):,} / {len(text.val):,} / {len(text.test):,} "
            f"train / val / test bytes ({files['train']} / {files['val']} / {files['test']} files); "
            f"context {cfg.context}, width {cfg.width}, {cfg.heads} heads, MLP {cfg.hidden}, "
            f"{cfg.layers} blocks, blocks 2, 4, ... routed; AdamW {cfg.lr:g} (baselines: lr grid), batch "
            f"{cfg.batch}, {cfg.steps} steps, validation every {cfg.eval_every} steps on "
            f"{cfg.eval_windows} windows. Losses in nats/byte, evaluated with the causal per-token "
            "decisions of decoding; fraction = share of (token, routed block) pairs processed."
            + (" " + "; ".join(notes) if notes else "")
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

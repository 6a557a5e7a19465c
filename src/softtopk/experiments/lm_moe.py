"""(k) A small decoder-only language model with mixture-of-experts feed-forward layers.

Data: the Python standard library's own ``.py`` sources (:func:`softtopk.data.load_text`),
byte-level tokens, train / validation / test split by file. Model: byte embedding and
learned positions, ``layers`` pre-norm blocks of causal self-attention and an MoE
feed-forward layer (E expert MLPs d -> h -> d, top-k routing by a
:class:`softtopk.nn.TopKRouter`, experts run through
:func:`softtopk.nn.functional.moe_dispatch` on their tokens only), a final norm and a
linear head. The routers compared:

* hard top-k with softmax renormalised over the chosen experts (Mixtral) and the Switch
  load-balancing loss (coefficient 0.01);
* auxiliary-loss-free balancing (DeepSeek-V3): sigmoid scores, a selection bias moved by
  ``bias_rate * sign(mean load - load)`` after every step, gates renormalised, no
  auxiliary loss;
* ReLU routing (ReMoE): gates relu(logits) with the L1 penalty whose coefficient is
  steered (x1.2 per step) towards k active experts per token;
* the library's soft masks (sparse, entropic) as the selection of the Mixtral router,
  with the same auxiliary loss.

Every run keeps its evaluation with the best validation loss. Evaluation uses the
router's default inference (``inference="hard"``: exactly k experts per token; for
ReLU routing at most k); ``test loss (train routing)`` evaluates the same checkpoint
with the training routing (``inference="soft"``: the soft masks' own support, ReMoE's
own ReLU gates). Losses are in nats per byte. Load: the tokens each expert receives in
the hard evaluation on the test windows, max over mean, averaged over layers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Text, load_text
from ..nn import TopKRouter
from ..nn.functional import moe_dispatch
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

NAME = "lm-moe"
TITLE = "(k) Mixture-of-experts language model on Python sources"
GRID = (0.1, 1.0, 10.0)
#: Operators of the default run (``--only`` picks others).
DEFAULT_ONLY = ("sparse", "entropic")
AUX_COEF = 0.01


@dataclass(frozen=True)
class Config:
    """Corpus size, model shape and training budget."""

    max_bytes: int = 2_000_000
    context: int = 32
    width: int = 64
    heads: int = 4
    layers: int = 2
    experts: int = 8
    k: int = 2
    expert_hidden: int = 128
    batch: int = 16
    steps: int = 200
    eval_every: int = 50
    eval_windows: int = 128
    lr: float = 3e-3
    bias_rate: float = 0.01


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(
            max_bytes=60_000,
            context=16,
            width=16,
            heads=2,
            layers=1,
            experts=4,
            expert_hidden=16,
            batch=8,
            steps=12,
            eval_every=6,
            eval_windows=16,
        )
    ],
    "default": [Config()],
}


@dataclass(frozen=True)
class RouterSpec:
    """How a run routes: the router's options and the extra loss it adds."""

    options: dict
    aux: bool = True  # add AUX_COEF * Switch loss


class MoEBlock(nn.Module):
    """Pre-norm block: causal self-attention, then an MoE feed-forward layer (both residual)."""

    def __init__(self, cfg: Config, spec: RouterSpec) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.router = TopKRouter(cfg.width, cfg.experts, cfg.k, causal=True, **spec.options)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(cfg.width, cfg.expert_hidden), nn.GELU(), nn.Linear(cfg.expert_hidden, cfg.width)
            )
            for _ in range(cfg.experts)
        )
        self.router_seconds = 0.0
        self.last = None

    def forward(self, h: Tensor, causal_mask: Tensor) -> Tensor:
        a = self.n1(h)
        h = h + self.attn(a, a, a, attn_mask=causal_mask, need_weights=False)[0]
        m = self.n2(h)
        start = time.perf_counter()
        route = self.router(m)
        self.router_seconds += time.perf_counter() - start
        self.last = route
        return h + moe_dispatch(m, route.gates, self.experts)


class MoELM(nn.Module):
    """Byte embedding + positions, MoE blocks, final norm, linear head over 256 bytes."""

    def __init__(self, cfg: Config, spec: RouterSpec) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(MoEBlock(cfg, spec) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 256)
        mask = torch.triu(torch.ones(cfg.context, cfg.context, dtype=torch.bool), 1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:T]
        for block in self.blocks:
            h = block(h, self.causal_mask[:T, :T])
        return self.head(self.norm(h))

    def routes(self) -> list:
        return [b.last for b in self.blocks]


def windows(stream: np.ndarray, count: int, context: int, seed: int) -> Tensor:
    """``count`` fixed windows of ``context + 1`` bytes at seeded random offsets (int64)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - context - 1, size=count)
    return torch.as_tensor(np.stack([stream[s : s + context + 1] for s in starts]).astype(np.int64))


def sample_batch(stream: Tensor, batch: int, context: int, g: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=g)
    return torch.stack([stream[s : s + context + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: MoELM, data: Tensor, inference: str, chunk: int = 64) -> dict[str, float]:
    """Mean next-byte loss, experts per token and max/mean load over ``data`` windows."""
    model.eval()
    for b in model.blocks:
        b.router.inference = inference
    total, count, active = 0.0, 0, 0.0
    loads = [torch.zeros(model.blocks[0].router.num_experts) for _ in model.blocks]
    for i in range(0, len(data), chunk):
        w = data[i : i + chunk]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
        for j, r in enumerate(model.routes()):
            loads[j] += r.load.float()
            active += r.active.float().sum().item()
    for b in model.blocks:
        b.router.inference = "hard"
    model.train()
    ratio = sum((ld.max() / ld.mean().clamp(min=1e-9)).item() for ld in loads) / len(loads)
    return {"loss": total / count, "active": active / count / len(model.blocks), "load": ratio}


def train_lm(text: Text, cfg: Config, spec: RouterSpec, seed: int, lr: float) -> RunResult:
    """Trains :class:`MoELM` with ``spec``'s router; keeps the evaluation with the best validation loss."""
    g = seed_everything(seed)
    model = MoELM(cfg, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    train = torch.as_tensor(text.train.astype(np.int64))
    val = windows(text.val, cfg.eval_windows, cfg.context, 1)
    test = windows(text.test, cfg.eval_windows, cfg.context, 2)
    best = BestCheckpoint(model)
    losses, window, active_train = [], [], []
    for step in range(1, cfg.steps + 1):
        w = sample_batch(train, cfg.batch, cfg.context, g)
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1))
        extra = 0.0
        for r in model.routes():
            if spec.aux:
                extra = extra + AUX_COEF * r.aux_loss
            extra = extra + r.l1_loss
        opt.zero_grad(set_to_none=True)
        (loss + extra).backward()
        opt.step()
        window.append(loss.item())
        active_train.append(sum(r.active.float().mean().item() for r in model.routes()) / cfg.layers)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            losses.append(sum(window) / len(window))
            window = []
            v = evaluate(model, val, "hard")["loss"]
            best.update(-v if math.isfinite(v) else -math.inf, step)
    router_seconds = sum(b.router_seconds for b in model.blocks) / cfg.steps
    best.restore()
    val_hard = evaluate(model, val, "hard")
    test_hard = evaluate(model, test, "hard")
    test_soft = evaluate(model, test, "soft")
    tail = active_train[len(active_train) // 2 :]
    return RunResult(
        test={
            "test loss": test_hard["loss"],
            "val loss": val_hard["loss"],
            "test loss (train routing)": test_soft["loss"],
            "max/mean load": test_hard["load"],
            "experts/token (train)": sum(tail) / len(tail),
            "experts/token (eval)": test_hard["active"],
            "router ms/step": 1000.0 * router_seconds,
        },
        val={"neg val loss": -val_hard["loss"]},
        losses=losses,
        extra={"best_step": best.step, "max/mean load (train routing)": test_soft["load"]},
    )


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001, ARG001
    text = load_text(cfg.max_bytes)
    ops, notes = mask_operators(only or DEFAULT_ONLY, shape=(cfg.batch * cfg.context, cfg.experts))
    lrs = lr_grid(cfg.lr, len(grid))

    def baseline(spec: RouterSpec):  # noqa: ANN202
        return lambda lr, seed: timed(lambda: train_lm(text, cfg, spec, seed, float(lr)))

    def run_op(op: Operator):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            spec = RouterSpec({"method": op.name, "temperature": float(temperature), "renormalize": True})
            return timed(lambda: train_lm(text, cfg, spec, seed, cfg.lr))

        return run

    k = cfg.k
    methods = [
        Method(
            f"hard top-{k} (Mixtral)",
            "baseline",
            baseline(RouterSpec({"method": "hard", "renormalize": True})),
            lrs,
            note="softmax, torch.topk, renormalised; Switch loss 0.01",
            knob="lr",
        ),
        Method(
            "aux-free bias (DeepSeek-V3)",
            "baseline",
            baseline(
                RouterSpec(
                    {"method": "hard", "score": "sigmoid", "renormalize": True, "bias_rate": cfg.bias_rate},
                    aux=False,
                )
            ),
            lrs,
            note=f"sigmoid scores, selection bias step {cfg.bias_rate:g}, no auxiliary loss",
            knob="lr",
        ),
        Method(
            "ReLU routing (ReMoE)",
            "baseline",
            baseline(RouterSpec({"routing": "relu"}, aux=False)),
            lrs,
            note="relu gates, L1 coefficient x1.2 per step towards k active",
            knob="lr",
        ),
    ]
    methods += [
        Method(
            f"router [{op.name}]",
            "operator",
            run_op(op),
            temperature_grid(op, grid),
            note=op.paper + "; renormalised, Switch loss 0.01",
        )
        for op in ops
    ]
    files = {s: len(v) for s, v in text.files.items()}
    return Setting(
        key=f"stdlib-E{cfg.experts}-k{cfg.k}",
        title=f"Python standard library bytes, {cfg.layers} MoE layers of {cfg.experts} experts, top-{cfg.k}",
        methods=methods,
        select="neg val loss",
        metrics=[
            "test loss",
            "val loss",
            "test loss (train routing)",
            "max/mean load",
            "experts/token (train)",
            "experts/token (eval)",
            "router ms/step",
        ],
        lower_is_better=(
            "test loss",
            "val loss",
            "test loss (train routing)",
            "max/mean load",
            "experts/token (train)",
            "experts/token (eval)",
            "router ms/step",
        ),
        description=(
            f"Byte-level LM on {len(text.train):,} / {len(text.val):,} / {len(text.test):,} "
            f"train / val / test bytes ({files['train']} / {files['val']} / {files['test']} files of "
            f"{text.root}); context {cfg.context}, width {cfg.width}, {cfg.heads} heads, {cfg.layers} "
            f"layers, {cfg.experts} experts ({cfg.width}-{cfg.expert_hidden}-{cfg.width}), k = {cfg.k}; "
            f"AdamW {cfg.lr:g} (baselines: lr grid), batch {cfg.batch}, {cfg.steps} steps, validation "
            f"every {cfg.eval_every} steps on {cfg.eval_windows} windows (test: {cfg.eval_windows} "
            "windows). Losses in nats/byte; eval routing exactly k experts per token "
            "(inference='hard')." + (" " + "; ".join(notes) if notes else "")
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

"""(e) Top-k selection for recommendation on MovieLens, with DFTopK's recipe for every operator.

Data: MovieLens (ml-latest-small subset, 100,004 ratings). Each user's ratings are split
by time, the first 80 % for training and the last 20 % for evaluation. A list is N
candidates: up to N/2 of the user's rated movies of that period plus unrated movies
drawn by popularity (relevance 0). Ground truth: the K highest-rated candidates
(ties broken at random, fixed per list). A two-tower dot-product model (user and item
embeddings of size d plus an item bias) scores the candidates.

Loss, DFTopK's recipe (Zhu et al. 2025) applied to every operator: binary
cross-entropy between the operator's soft top-K membership m_K(scores) and the 0/1
ground-truth top-K membership. Baselines: pointwise BCE on the scores as logits and
ListNet on the ratings (each with a learning-rate grid), the same BCE recipe through the
straight-through hard top-k, and popularity (no training). Metrics on held-out users'
evaluation lists: Recall@K@M (the share of the true top-K found among the M
highest-scored candidates; configurations are chosen on it with a validation set of
users, and every run keeps its epoch with the best validation Recall@K@M), NDCG@K with
graded ratings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load
from ..metrics import ndcg_at_k, recall_at_k_at_m
from ..registry import Operator
from ._baselines import STRAIGHT_THROUGH, listnet, pointwise_bce
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

NAME = "recsys"
TITLE = "(e) Top-k selection for recommendation"
GRID = (1.0, 10.0, 100.0)  # dot-product scores spread over several units


@dataclass(frozen=True)
class Config:
    """List construction, model size and training budget."""

    candidates: int = 100
    k: int = 10
    m: int = 20
    lists_per_user: int = 6
    dim: int = 32
    epochs: int = 8
    batch: int = 128
    lr: float = 5e-3
    max_users: int | None = None
    val_users: float = 0.3


SIZES: dict[str, list[Config]] = {
    "toy": [Config(lists_per_user=2, epochs=4, max_users=200)],
    "quick": [Config(lists_per_user=3, epochs=6)],  # make run: all users, fewer lists and epochs
    "default": [Config()],
}


@dataclass
class Lists:
    """Candidate lists as tensors: user (L,), items (L, N), relevance (L, N), target (L, N)."""

    user: Tensor
    items: Tensor
    relevance: Tensor
    target: Tensor


class Data:
    """The lists of one setting, built once with a fixed seed.

    Training lists come from the first 80 % of each user's ratings; validation and test
    lists (one per user, disjoint users) from the last 20 %.
    """

    def __init__(self, cfg: Config, seed: int = 4321) -> None:
        r = load("movielens")
        rng = np.random.default_rng(seed)
        self.users, self.items = r.users, r.items
        popularity = np.bincount(r.item, minlength=self.items).astype(np.float64)
        self.popularity = torch.as_tensor(popularity, dtype=torch.float32)
        p = popularity / popularity.sum()
        half = cfg.candidates // 2
        order = np.lexsort((r.timestamp, r.user))
        starts = np.searchsorted(r.user[order], np.arange(self.users + 1))
        train, evaluate = [], []
        users = np.arange(self.users)
        if cfg.max_users is not None:
            users = rng.permutation(self.users)[: cfg.max_users]
        for u in users:
            rows = order[starts[u] : starts[u + 1]]
            cut = int(round(0.8 * len(rows)))
            seen = set(r.item[rows].tolist())
            for part, n_lists, out in ((rows[:cut], cfg.lists_per_user, train), (rows[cut:], 1, evaluate)):
                if len(part) < cfg.k:
                    continue
                for _ in range(n_lists):
                    out.append(self._make_list(u, part, seen, half, cfg, r, p, rng))
        self.train = self._stack(train)
        ev = self._stack(evaluate)
        n_val = int(round(cfg.val_users * len(ev.user)))
        perm = torch.as_tensor(rng.permutation(len(ev.user)))
        self.val = Lists(*(t[perm[:n_val]] for t in (ev.user, ev.items, ev.relevance, ev.target)))
        self.test = Lists(*(t[perm[n_val:]] for t in (ev.user, ev.items, ev.relevance, ev.target)))

    @staticmethod
    def _make_list(u, part, seen, half, cfg, r, p, rng):  # noqa: ANN001, ANN205
        pos = rng.choice(part, size=min(half, len(part)), replace=False)
        items = list(r.item[pos])
        rel = list(r.rating[pos])
        chosen = set(items)
        while len(items) < cfg.candidates:
            for j in rng.choice(len(p), size=2 * cfg.candidates, p=p):
                if j not in seen and j not in chosen:
                    items.append(int(j))
                    rel.append(0.0)
                    chosen.add(int(j))
                    if len(items) == cfg.candidates:
                        break
        rel_a = np.asarray(rel, dtype=np.float32)
        jitter = rng.random(len(rel_a)) * 1e-3  # random tie-break among equal ratings
        target = np.zeros(len(rel_a), dtype=np.float32)
        target[np.argsort(-(rel_a + jitter))[: cfg.k]] = 1.0
        return u, np.asarray(items), rel_a, target

    @staticmethod
    def _stack(lists) -> Lists:  # noqa: ANN001
        return Lists(
            torch.as_tensor(np.array([x[0] for x in lists])),
            torch.as_tensor(np.stack([x[1] for x in lists])),
            torch.as_tensor(np.stack([x[2] for x in lists])),
            torch.as_tensor(np.stack([x[3] for x in lists])),
        )


class TwoTower(nn.Module):
    """score(u, i) = <e_u, e_i> + b_i."""

    def __init__(self, users: int, items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(users, dim)
        self.item = nn.Embedding(items, dim)
        self.bias = nn.Embedding(items, 1)
        for emb in (self.user, self.item):
            nn.init.normal_(emb.weight, std=0.1)
        nn.init.zeros_(self.bias.weight)

    def forward(self, user: Tensor, items: Tensor) -> Tensor:
        return (self.user(user)[:, None, :] * self.item(items)).sum(-1) + self.bias(items).squeeze(-1)


def _metrics(scores: Tensor, lists: Lists, cfg: Config) -> dict[str, float]:
    return {
        f"Recall@{cfg.k}@{cfg.m}": recall_at_k_at_m(scores, lists.target, cfg.m).item(),
        f"NDCG@{cfg.k}": ndcg_at_k(scores, lists.relevance, cfg.k).item(),
        f"Recall@{cfg.k}@{cfg.k}": recall_at_k_at_m(scores, lists.target, cfg.k).item(),
    }


def train_recsys(data: Data, cfg: Config, loss_fn, seed: int, lr: float | None = None) -> RunResult:  # noqa: ANN001
    """Trains the two-tower model with ``loss_fn(scores, lists_batch, generator)``; best validation epoch."""
    g = seed_everything(seed)
    model = TwoTower(data.users, data.items, cfg.dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr if lr is None else lr)
    tr = data.train
    select = f"Recall@{cfg.k}@{cfg.m}"
    best = BestCheckpoint(model)
    losses = []
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for idx in torch.randperm(len(tr.user), generator=g).split(cfg.batch):
            batch = Lists(tr.user[idx], tr.items[idx], tr.relevance[idx], tr.target[idx])
            loss = loss_fn(model(batch.user, batch.items), batch, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        with torch.no_grad():
            best.update(_metrics(model(data.val.user, data.val.items), data.val, cfg)[select], epoch)
    best.restore()
    with torch.no_grad():
        val = _metrics(model(data.val.user, data.val.items), data.val, cfg)
        test = _metrics(model(data.test.user, data.test.items), data.test, cfg)
    return RunResult(test=test, val=val, losses=losses, extra={"best_epoch": best.step + 1})


def dftopk_recipe(op: Operator, k: int, temperature: float):  # noqa: ANN201
    """BCE between the operator's soft top-k membership and the 0/1 ground truth (DFTopK's loss)."""

    def loss(scores: Tensor, batch: Lists, generator: torch.Generator) -> Tensor:
        m = op(scores, k, -1, temperature=temperature, generator=generator).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(m, batch.target)

    return loss


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001
    data = Data(cfg)
    ops, notes = mask_operators(only, shape=(cfg.batch, cfg.candidates))

    def run_popularity(temperature: float | None, seed: int) -> RunResult:
        def go() -> RunResult:
            val = _metrics(data.popularity[data.val.items], data.val, cfg)
            test = _metrics(data.popularity[data.test.items], data.test, cfg)
            return RunResult(test=test, val=val, losses=[])

        return timed(go)

    def baseline(loss_fn):  # noqa: ANN001, ANN202
        return lambda lr, seed: timed(lambda: train_recsys(data, cfg, loss_fn, seed, lr=float(lr)))

    def run_op(op: Operator):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            return timed(lambda: train_recsys(data, cfg, dftopk_recipe(op, cfg.k, float(temperature)), seed))

        return run

    lrs = lr_grid(cfg.lr, len(grid))
    st = STRAIGHT_THROUGH
    methods = [
        Method("popularity", "baseline", run_popularity, note="no training", untrained=True),
        Method(
            "pointwise BCE", "baseline", baseline(lambda s, b, g: pointwise_bce(s, b.target)), lrs, knob="lr"
        ),
        Method(
            "ListNet (ratings)", "baseline", baseline(lambda s, b, g: listnet(s, b.relevance)), lrs, knob="lr"
        ),
        Method(f"BCE(mask) [{st.name}]", "baseline", run_op(st), temperature_grid(st, grid), note=st.paper),
    ]
    methods += [
        Method(f"BCE(mask) [{op.name}]", "operator", run_op(op), temperature_grid(op, grid), note=op.paper)
        for op in ops
    ]
    return Setting(
        key=f"movielens-N{cfg.candidates}-K{cfg.k}-M{cfg.m}",
        title=f"MovieLens (ml-latest-small subset), N = {cfg.candidates}, K = {cfg.k}, M = {cfg.m}",
        methods=methods,
        select=f"Recall@{cfg.k}@{cfg.m}",
        metrics=[f"Recall@{cfg.k}@{cfg.m}", f"NDCG@{cfg.k}", f"Recall@{cfg.k}@{cfg.k}"],
        description=(
            f"two-tower dot product (d = {cfg.dim}), Adam {cfg.lr:g}, {cfg.epochs} epochs over "
            f"{len(data.train.user)} training lists (batch {cfg.batch}); {len(data.val.user)} validation and "
            f"{len(data.test.user)} test users, one evaluation list each; operators use k = K."
            + (" " + "; ".join(notes) if notes else "")
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

"""BT-Cell on ListOps (Ray Chowdhury and Caragea 2023) in miniature: relaxed beam top-k against hard.

Data: ListOps (Nangia and Bowman 2018) generated here with the published generator's
grammar: an expression is a digit 0-9 or ``[OP a_1 ... a_m ]`` with OP in MIN, MAX, MED
(median, rounded down) and SM (sum modulo 10) and 2 <= m <= ``max_args`` arguments,
each argument an operation with probability 1/4 (below ``max_depth``); the label is the
expression's value (10 classes). Training and validation expressions are short; the test
sets are the same distribution (``iid``), longer and deeper expressions (``longer``) and
expressions with more arguments than seen in training (``more args``), the
out-of-distribution splits of BT-Cell's paper in small. No expression of a test set
occurs in the training or validation sets.

Model: every token (15 symbols) is embedded, then a binary tree is built bottom-up by
merging two adjacent nodes at a time with a gated recursive cell (GRC; Shen et al. 2019,
as in BT-Cell); the root goes through an MLP classifier. Which pair to merge is decided by
a beam search: each of the ``beam`` partial trees proposes every adjacent merge, scored
by log softmax(score(parent)) added to the tree's score, and the next beams are chosen
among the beam x (n - 1) candidates by :func:`softtopk.nn.functional.beam_select`; the
root is the softmax(beam score)-weighted mix of the final beams. Methods (rows):

* ``beam [one-soft]`` / ``beam [soft]``: the relaxed beam top-k of the library
  (BT-Cell's OneSoft and its SOFT variant), temperature grid;
* ``beam [hard]``: plain beam search (hard top-k; the scorer learns only through the
  final softmax over beam scores), learning-rate grid;
* ``left-to-right cell``: the same cell folded over the tokens left to right (no
  parsing: an RNN with the GRC cell), learning-rate grid.

Sequences of one length are batched together, so no padding enters the tree search.
Every run keeps its epoch with the best validation accuracy. Expected from the paper
(BT-GRC + OneSoft, beam 5: near-perfect ListOps accuracy, also on the length and
argument splits; plain beam and left-to-right models generalise worse): at this size,
the relaxed beam should beat the hard beam and the left-to-right cell out of
distribution.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.functional import BEAM_METHODS, beam_select
from ._common import BestCheckpoint
from ._runner import Method, RunResult, Setting, lr_grid, seed_everything, timed

NAME = "listops"
TITLE = "(g) BT-Cell: relaxed beam top-k on ListOps"
GRID = (0.1, 1.0, 10.0)  # multiples of beam_select's default temperature 1

OPS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = (*OPS, END, *map(str, range(10)))
TOKEN = {s: i for i, s in enumerate(VOCAB)}
VALUE_P = 0.25  # the published generator: an argument is an operation with probability 1/4


def generate(rng: random.Random, max_args: int, max_depth: int, depth: int = 1) -> list[str]:
    """One ListOps expression as tokens, with the published generator's recursion.

    Below ``max_depth`` a node is an operation with probability 1/4 (else a digit); an
    operation takes 2 to ``max_args`` arguments, each generated one level deeper.
    """
    if depth < max_depth and rng.random() < VALUE_P:
        op = rng.choice(OPS)
        out = [op]
        for _ in range(rng.randint(2, max_args)):
            out += generate(rng, max_args, max_depth, depth + 1)
        return [*out, END]
    return [str(rng.randrange(10))]


def evaluate(tokens: list[str]) -> int:
    """The value of a ListOps expression (MED: the median rounded down; SM: the sum mod 10)."""
    stack: list[list[object]] = []
    value = 0
    for tok in tokens:
        if tok in OPS:
            stack.append([tok])
        elif tok == END:
            op, *args = stack.pop()
            nums = [int(a) for a in args]
            if op == "[MIN":
                value = min(nums)
            elif op == "[MAX":
                value = max(nums)
            elif op == "[MED":
                value = int(statistics.median(nums))
            else:
                value = sum(nums) % 10
            if not stack:
                return value
            stack[-1].append(value)
        elif stack:
            stack[-1].append(int(tok))
        else:
            return int(tok)
    raise ValueError(f"not a complete ListOps expression: {' '.join(tokens)}")


@dataclass(frozen=True)
class Part:
    """How one split is drawn: argument count, depth and token-length range."""

    max_args: int
    max_depth: int
    min_len: int
    max_len: int


@dataclass(frozen=True)
class Config:
    """The splits, the model and the training budget."""

    train: Part = Part(max_args=4, max_depth=4, min_len=6, max_len=14)
    longer: Part = Part(max_args=4, max_depth=6, min_len=25, max_len=40)
    more_args: Part = Part(max_args=8, max_depth=3, min_len=14, max_len=24)
    n_train: int = 3000
    n_val: int = 300
    n_test: int = 300
    dim: int = 32
    hidden: int = 64
    beam: int = 3
    epochs: int = 7
    batch: int = 32
    lr: float = 3e-3


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(
            train=Part(3, 3, 5, 9),
            longer=Part(3, 4, 12, 16),
            more_args=Part(6, 3, 9, 12),
            n_train=120,
            n_val=30,
            n_test=30,
            dim=8,
            hidden=16,
            beam=2,
            epochs=2,
            batch=32,
            lr=5e-3,
        )
    ],
    "default": [Config()],
}


def sample(part: Part, count: int, rng: random.Random, exclude: set[str]) -> list[list[str]]:
    """``count`` distinct expressions of ``part`` (rejection on length), none of them in ``exclude``."""
    out: list[list[str]] = []
    seen = set(exclude)
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 1000 * count + 100_000:
            raise RuntimeError(f"could not draw {count} distinct expressions of {part}")
        tokens = generate(rng, part.max_args, part.max_depth)
        key = " ".join(tokens)
        if part.min_len <= len(tokens) <= part.max_len and key not in seen:
            seen.add(key)
            out.append(tokens)
    return out


class Data:
    """The five splits as token lists, drawn once with a fixed seed (the same for every run).

    The test sets are drawn first; training and validation expressions are drawn
    excluding every test expression (and validation excludes training), so the
    validation split holds no test data.
    """

    def __init__(self, cfg: Config, seed: int = 2023) -> None:
        rng = random.Random(seed)
        self.test = {
            "iid": sample(cfg.train, cfg.n_test, rng, set()),
            "longer": sample(cfg.longer, cfg.n_test, rng, set()),
            "more args": sample(cfg.more_args, cfg.n_test, rng, set()),
        }
        held = {" ".join(t) for split in self.test.values() for t in split}
        self.train = sample(cfg.train, cfg.n_train, rng, held)
        self.val = sample(cfg.train, cfg.n_val, rng, held | {" ".join(t) for t in self.train})


def by_length(sequences: list[list[str]]) -> dict[int, tuple[Tensor, Tensor]]:
    """Length -> (token ids (N, L), labels (N,)): one bucket per length, no padding."""
    groups: dict[int, list[list[str]]] = defaultdict(list)
    for s in sequences:
        groups[len(s)].append(s)
    return {
        n: (
            torch.tensor([[TOKEN[t] for t in s] for s in group]),
            torch.tensor([evaluate(s) for s in group]),
        )
        for n, group in sorted(groups.items())
    }


def minibatches(buckets: dict[int, tuple[Tensor, Tensor]], batch: int, g: torch.Generator) -> Iterator:
    """Shuffled mini-batches, each of one length, in a shuffled order of buckets."""
    chunks = []
    for x, y in buckets.values():
        perm = torch.randperm(len(y), generator=g)
        chunks += [(x[idx], y[idx]) for idx in perm.split(batch)]
    for i in torch.randperm(len(chunks), generator=g).tolist():
        yield chunks[i]


class GRC(nn.Module):
    """Gated recursive cell: LN(sigmoid(f_l) l + sigmoid(f_r) r + sigmoid(g) c), gates from [l; r]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(2 * dim, hidden)
        self.out = nn.Linear(hidden, 4 * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        f_l, f_r, g, c = self.out(F.gelu(self.inp(torch.cat([left, right], -1)))).chunk(4, -1)
        return self.norm(torch.sigmoid(f_l) * left + torch.sigmoid(f_r) * right + torch.sigmoid(g) * c)


def merge(nodes: Tensor, parents: Tensor, weights: Tensor) -> Tensor:
    r"""The new beams' nodes: mixtures of the candidates "beam b with nodes j, j+1 merged".

    Candidate (b, j) is beam b's node sequence with nodes j and j + 1 replaced by
    parents[b, j]; new beam c is sum_{b, j} weights[c, b, j] candidate(b, j), computed
    without building the candidates:

    .. math::

        \text{new}_{c,i} = \sum_b \Big(\sum_{j > i} w_{cbj}\Big) x_{b,i} + w_{cbi}\, p_{b,i}
        + \Big(\sum_{j < i} w_{cbj}\Big) x_{b,i+1}

    Args:
        nodes: (N, B, n, d) the beams' nodes.
        parents: (N, B, n - 1, d) the parent of each adjacent pair.
        weights: (N, C, B, n - 1) selection weights of the C new beams.

    Returns:
        (N, C, n - 1, d).
    """
    before = weights.flip(-1).cumsum(-1).flip(-1) - weights  # sum over j > i
    after = weights.cumsum(-1) - weights  # sum over j < i
    return (
        torch.einsum("ncbi,nbid->ncid", before, nodes[:, :, :-1])
        + torch.einsum("ncbi,nbid->ncid", weights, parents)
        + torch.einsum("ncbi,nbid->ncid", after, nodes[:, :, 1:])
    )


class TreeModel(nn.Module):
    """Token embedding, a tree of GRC merges (beam search, or left to right), MLP classifier.

    ``mode`` is a key of :data:`softtopk.nn.functional.BEAM_METHODS` (beam search with
    that selection) or ``"left-to-right"``.
    """

    def __init__(self, cfg: Config, mode: str, temperature: float) -> None:
        super().__init__()
        d = cfg.dim
        self.embed = nn.Embedding(len(VOCAB), d)
        self.leaf = nn.LayerNorm(d)
        self.cell = GRC(d, cfg.hidden)
        self.scorer = nn.Sequential(nn.Linear(d, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))
        self.head = nn.Sequential(nn.Linear(d, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 10))
        self.mode, self.temperature, self.beam = mode, temperature, cfg.beam

    def forward(self, tokens: Tensor) -> Tensor:
        nodes = self.leaf(self.embed(tokens))  # (N, L, d)
        if self.mode == "left-to-right":
            root = nodes[:, 0]
            for i in range(1, nodes.shape[1]):
                root = self.cell(root, nodes[:, i])
        else:
            root = self.beam_tree(nodes)
        return self.head(root)

    def beam_tree(self, leaves: Tensor) -> Tensor:
        """The root of the beam search over merge orders (BT-Cell), (N, d)."""
        nodes = leaves.unsqueeze(1)  # (N, beams, n, d)
        score = leaves.new_zeros(leaves.shape[0], 1)
        while nodes.shape[2] > 1:
            N, nb, n, _ = nodes.shape
            parents = self.cell(nodes[:, :, :-1], nodes[:, :, 1:])  # (N, nb, n - 1, d)
            logp = torch.log_softmax(self.scorer(parents).squeeze(-1), -1)
            candidates = (score.unsqueeze(-1) + logp).reshape(N, nb * (n - 1))
            sel = beam_select(
                candidates, min(self.beam, nb * (n - 1)), method=self.mode, temperature=self.temperature
            )
            nodes = merge(nodes, parents, sel.weights.reshape(N, -1, nb, n - 1))
            score = sel.scores
        return (torch.softmax(score, -1).unsqueeze(-1) * nodes[:, :, 0]).sum(1)


@torch.no_grad()
def accuracy(model: TreeModel, buckets: dict[int, tuple[Tensor, Tensor]], batch: int = 256) -> float:
    """Test-mode accuracy over every bucket."""
    model.eval()
    correct = total = 0
    for x, y in buckets.values():
        for i in range(0, len(y), batch):
            correct += (model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum().item()
            total += len(y[i : i + batch])
    model.train()
    return correct / max(total, 1)


def train_tree(data: Data, cfg: Config, mode: str, temperature: float, seed: int, lr: float) -> RunResult:
    """Trains one :class:`TreeModel`; accuracies at the epoch with the best validation accuracy."""
    g = seed_everything(seed)
    model = TreeModel(cfg, mode, temperature)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train, val = by_length(data.train), by_length(data.val)
    best = BestCheckpoint(model)
    losses = []
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for x, y in minibatches(train, cfg.batch, g):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            count += len(y)
        losses.append(total / count)
        best.update(accuracy(model, val), epoch)
    best.restore()
    test = {name: accuracy(model, by_length(split)) for name, split in data.test.items()}
    return RunResult(
        test=test, val={"iid": accuracy(model, val)}, losses=losses, extra={"best_epoch": best.step + 1}
    )


def _describe(part: Part) -> str:
    return f"<= {part.max_args} args, depth <= {part.max_depth}, {part.min_len}-{part.max_len} tokens"


def make_setting(cfg: Config, *, only=None, grid=GRID, data_dir=None) -> Setting:  # noqa: ANN001
    data = Data(cfg)
    relaxed = [m for m in BEAM_METHODS if m != "hard"]
    if only and any(m in only for m in relaxed):  # registry operator names do not apply here
        relaxed = [m for m in relaxed if m in only]

    def run(mode: str, knob: str):  # noqa: ANN202
        def go(value: float | None, seed: int) -> RunResult:
            t, lr = (float(value), cfg.lr) if knob == "temperature" else (1.0, float(value))
            return timed(lambda: train_tree(data, cfg, mode, t, seed, lr))

        return go

    lrs = lr_grid(cfg.lr, len(grid))
    methods = [
        Method("left-to-right cell", "baseline", run("left-to-right", "lr"), lrs, knob="lr"),
        Method(
            f"beam {cfg.beam} [hard]", "baseline", run("hard", "lr"), lrs, knob="lr", note="plain beam search"
        ),
    ]
    methods += [
        Method(
            f"beam {cfg.beam} [{m}]",
            "operator",
            run(m, "temperature"),
            [float(f"{v:.6g}") for v in grid],
            note="BT-Cell OneSoft" if m == "one-soft" else "SOFT sorted top-k (BT-Cell + SOFT)",
        )
        for m in relaxed
    ]
    return Setting(
        key=f"listops-beam{cfg.beam}",
        title=f"ListOps (generated), beam {cfg.beam}, GRC cell d = {cfg.dim}",
        methods=methods,
        select="iid",
        metrics=["iid", "longer", "more args"],
        description=(
            f"train {len(data.train)} expressions ({_describe(cfg.train)}), validation "
            f"{len(data.val)} of the same kind; test {cfg.n_test} each: iid, longer "
            f"({_describe(cfg.longer)}), more args ({_describe(cfg.more_args)}). GRC d = {cfg.dim} "
            f"(hidden {cfg.hidden}), Adam {cfg.lr:g}, "
            f"batch {cfg.batch} (one length per batch), {cfg.epochs} epochs, best validation epoch kept; "
            "accuracy (10 classes)."
        ),
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``)."""
    return [make_setting(c, only=only, grid=grid or GRID, data_dir=data_dir) for c in SIZES[size]]

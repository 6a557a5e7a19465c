"""(j) Sampling k items with the marginals of a soft top-k mask: systematic sampling vs Gumbel top-k.

A model trained with a soft top-k mask y = mask_k(x) (0 <= y <= 1, sum y = k) is deployed
by drawing k items. :func:`softtopk.sampling.sample_k` draws exactly k distinct items
with P(i drawn) = y_i. Gumbel top-k (the hard sample of :func:`softtopk.relaxed_subset`)
on log y draws in proportion to y without replacement, and on x / t it samples the
scores at the mask's temperature: neither has y as its inclusion probabilities.

Data: the test logits of an MLP trained on LetterRecognition (26 classes), k = 5, masks
of the registry at temperature 1 (logit units). The first table estimates inclusion
frequencies P-hat from many draws per row and compares them with y; the second computes
them exactly on the 6 largest logits of each row (every order and offset of the
systematic sampler, every draw sequence of Gumbel top-k).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import relaxed_subset, topk_mask
from ..data import load
from ..registry import OPERATORS
from ..sampling import sample_k
from ..sampling._sample import UNIT_BITS, systematic_rows
from ._common import Split, batches, mlp, pretty
from ._runner import Method, RunResult, Setting, seed_everything, timed

NAME = "sampling"
#: Nothing is trained here (the masks come from one fixed model): ``--grid`` does not apply.
FIXED_CONFIGURATION = True
TITLE = "(j) Sampling with the marginals of a soft mask"
MASKS = ("sparse", "entropic", "lapsum")


@dataclass(frozen=True)
class Config:
    """Data, budget, the masks' temperature and the Monte-Carlo budget."""

    dataset: str = "letter"
    k: int = 5
    temperature: float = 1.0
    rows: int = 500
    draws: int = 1000
    exact_rows: int = 40
    exact_n: int = 6
    exact_k: int = 2
    train_size: int | None = 8000
    epochs: int = 10


SIZES: dict[str, list[Config]] = {
    "toy": [
        Config(dataset="digits", k=3, rows=50, draws=200, exact_rows=4, exact_n=5, train_size=None, epochs=5)
    ],
    "default": [Config()],
}


def scores(cfg: Config, data_dir=None) -> Tensor:  # noqa: ANN001
    """Test logits of an MLP trained on the data set (seed 0)."""
    split = Split(load(cfg.dataset, data_dir), train_size=cfg.train_size)
    g = seed_everything(0)
    net = mlp([split.features, 128, split.classes])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(cfg.epochs):
        for idx in batches(len(split.y_train), 128, g):
            loss = F.cross_entropy(net(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return net(split.x_test[: cfg.rows]).double()


def draw(sampler: str, x: Tensor, y: Tensor, k: int, t: float, draws: int, g: torch.Generator) -> Tensor:
    """Inclusion frequencies (rows, n) of ``draws`` samples per row (chunks of rows)."""
    freq = torch.zeros_like(y)
    chunk = max(1, 200_000 // draws)
    for i in range(0, len(y), chunk):
        yi, xi = y[i : i + chunk], x[i : i + chunk]
        rep = lambda a: a.repeat_interleave(draws, 0)  # noqa: E731
        if sampler == "systematic":
            z = sample_k(rep(yi), k, generator=g, straight_through=False)
        elif sampler == "gumbel-log-y":
            z = relaxed_subset(rep(yi.log()), k, temperature=1e-4, hard=True, generator=g).detach()
        else:  # gumbel on the scores at the mask's temperature
            z = relaxed_subset(rep(xi / t), k, temperature=1e-4, hard=True, generator=g).detach()
        assert_k(z, k)
        freq[i : i + chunk] = z.reshape(-1, draws, y.shape[-1]).mean(1)
    return freq


def assert_k(z: Tensor, k: int) -> None:
    if not bool(((z.sum(-1) - k).abs() < 1e-6).all() and ((z == 0) | (z == 1)).all()):
        raise RuntimeError("a sampler returned something other than k distinct items")


def marginal_metrics(freq: Tensor, y: Tensor, draws: int) -> dict[str, float]:
    err = (freq - y).abs()
    se = (y * (1 - y) / draws).sqrt()
    gaussian = draws * y * (1 - y) >= 10  # where the frequency is close to normal
    z = err[gaussian] / se[gaussian]
    return {
        "mean abs(P-y)": err.mean().item(),
        "max abs(P-y)": err.max().item(),
        "miss y=1": (1 - freq[y == 1]).mean().item() if (y == 1).any() else 0.0,
        "draw y=0": freq[y == 0].mean().item() if (y == 0).any() else 0.0,
        "z > 5 (%)": 100.0 * (z > 5).double().mean().item() if z.numel() else 0.0,
    }


def exact_systematic(y: Tensor, k: int) -> Tensor:
    """Exact inclusion probabilities of sample_k for rows y (B, n) of small n.

    Runs systematic_rows on every order and on one offset per stretch of offsets where the
    draw is constant (mid-stretch, so the units' rounding of the interval ends does not matter).
    """
    B, n = y.shape
    L = 1 << UNIT_BITS
    orders = torch.tensor(list(itertools.permutations(range(n))))
    out = torch.zeros_like(y)
    for b in range(B):
        yo = y[b][orders]  # (n!, n)
        ends = torch.cumsum(torch.floor(yo * L).to(torch.int64), -1) % L
        cuts = torch.cat(
            [torch.zeros(len(orders), 1, dtype=torch.int64), ends, torch.full((len(orders), 1), L)], 1
        )
        cuts = cuts.sort(-1).values
        a, c = cuts[:, :-1], cuts[:, 1:]
        weight = (c - a).double() / L / len(orders)  # (n!, n + 1)
        u = ((a + c) // 2).reshape(-1)
        rows = orders.repeat_interleave(n + 1, 0)
        hits = systematic_rows(y[b].expand(len(u), n), torch.full((len(u),), k), rows, u)
        out[b] = (hits.double() * weight.reshape(-1, 1)).sum(0)
    return out


def exact_gumbel(w: Tensor, k: int) -> Tensor:
    """Exact inclusion probabilities of Gumbel top-k with weights w (B, n): every draw sequence."""
    B, n = w.shape
    out = torch.zeros_like(w)
    for seq in itertools.permutations(range(n), k):
        p = torch.ones(B, dtype=w.dtype)
        left = w.sum(-1)
        for i in seq:
            p = p * w[:, i] / left
            left = left - w[:, i]
        for i in seq:
            out[:, i] += p
    return out


def make_settings(cfg: Config, data_dir=None) -> list[Setting]:  # noqa: ANN001
    x = scores(cfg, data_dir)
    k, t = cfg.k, cfg.temperature
    masks = [m for m in MASKS if m in OPERATORS]
    ys = {m: topk_mask(x, k, method=m, temperature=t).clamp(0, 1) for m in masks}
    samplers = {
        "systematic": ("sample_k (systematic)", "operator"),
        "gumbel-log-y": ("Gumbel top-k on log y", "baseline"),
        "gumbel-x/t": ("Gumbel top-k on x / t", "baseline"),
    }

    def mc(sampler: str, mask: str):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            def go() -> RunResult:
                g = seed_everything(seed)
                y = ys[mask]
                m = marginal_metrics(draw(sampler, x, y, k, t, cfg.draws, g), y, cfg.draws)
                return RunResult(test=m, val={"neg mean abs(P-y)": -m["mean abs(P-y)"]}, losses=[])

            return timed(go)

        return run

    methods = [
        Method(f"{label} [{mask}]", group, mc(s, mask))
        for mask in masks
        for s, (label, group) in samplers.items()
    ]
    floor = {
        m: (math.sqrt(2 / math.pi) * (ys[m] * (1 - ys[m]) / cfg.draws).sqrt()).mean().item() for m in masks
    }
    frac = {m: ((ys[m] > 0) & (ys[m] < 1)).sum(-1).double().mean().item() for m in masks}
    mc_setting = Setting(
        key=f"{cfg.dataset}-k{k}-mc",
        title=f"{pretty(cfg.dataset)} logits, k = {k}, Monte Carlo ({cfg.draws} draws per row)",
        methods=methods,
        select="neg mean abs(P-y)",
        metrics=["mean abs(P-y)", "max abs(P-y)", "miss y=1", "draw y=0", "z > 5 (%)"],
        lower_is_better=("mean abs(P-y)", "max abs(P-y)", "miss y=1", "draw y=0", "z > 5 (%)"),
        description=(
            f"y = topk_mask(x, {k}, method, temperature={t:g}) on {len(x)} test rows of MLP logits "
            f"({x.shape[-1]} classes); P-hat = inclusion frequency over {cfg.draws} draws per row; "
            "seeds change the sampler's noise. 'miss y=1': mean probability that an item with y = 1 "
            "is not drawn; 'draw y=0': mean frequency of items with y = 0; 'z > 5 (%)': entries whose error "
            "exceeds 5 standard errors sqrt(y(1-y)/draws), among those with draws * y(1-y) >= 10 (where the "
            "frequency is near normal; an unbiased sampler has about 6e-5 % there). Every sampler drew "
            "exactly k distinct items in every draw (checked). The Monte-Carlo noise floor of an "
            "unbiased sampler, E abs(P-hat - y): "
            + ", ".join(f"{m} {floor[m]:.4f}" for m in masks)
            + "; fractional entries per row: "
            + ", ".join(f"{m} {frac[m]:.1f}" for m in masks)
            + "."
        ),
    )
    # Exact, on the exact_n largest logits of the first rows (renormalised to sum k).
    top = torch.topk(x[: cfg.exact_rows], cfg.exact_n, dim=-1).values
    ke = cfg.exact_k

    def exact(sampler: str, mask: str):  # noqa: ANN202
        def run(temperature: float | None, seed: int) -> RunResult:
            def go() -> RunResult:
                y = topk_mask(top, ke, method=mask, temperature=t).clamp(0, 1)
                if sampler == "systematic":
                    pi = exact_systematic(y, ke)
                elif sampler == "gumbel-log-y":
                    pi = exact_gumbel(y, ke)
                else:
                    pi = exact_gumbel(torch.exp((top - top.amax(-1, keepdim=True)) / t), ke)
                err = (pi - y).abs()
                m = {"max abs(pi-y)": err.max().item(), "mean abs(pi-y)": err.mean().item()}
                m["log10 max abs(pi-y)"] = math.log10(max(m["max abs(pi-y)"], 1e-300))
                m["min pi (y=1)"] = pi[y == 1].min().item() if (y == 1).any() else math.nan
                return RunResult(test=m, val={"neg max abs(pi-y)": -m["max abs(pi-y)"]}, losses=[])

            return timed(go)

        return run

    exact_setting = Setting(
        key=f"{cfg.dataset}-n{cfg.exact_n}-k{ke}-exact",
        title=f"{pretty(cfg.dataset)} logits, top {cfg.exact_n} per row, k = {ke}, exact",
        methods=[
            Method(f"{label} [{mask}]", group, exact(s, mask))
            for mask in masks
            for s, (label, group) in samplers.items()
        ],
        select="neg max abs(pi-y)",
        metrics=["max abs(pi-y)", "log10 max abs(pi-y)", "mean abs(pi-y)", "min pi (y=1)"],
        lower_is_better=("max abs(pi-y)", "log10 max abs(pi-y)", "mean abs(pi-y)"),
        description=(
            f"y = topk_mask over the {cfg.exact_n} largest logits of {cfg.exact_rows} test rows, k = {ke}, "
            f"temperature {t:g}; pi = exact inclusion probabilities: sample_k over all "
            f"{math.factorial(cfg.exact_n)} orders and every stretch of offsets with a constant draw "
            "(units of 2^-40), Gumbel top-k over every draw sequence. 'min pi (y=1)': the smallest "
            "inclusion probability of an item the mask keeps with certainty. No randomness: the seeds agree."
        ),
    )
    return [mc_setting, exact_setting]


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size``; ``only`` and ``grid`` do not apply (no operator grid)."""
    return [s for c in SIZES[size] for s in make_settings(c, data_dir)]

"""Small pieces shared by the experiments: splits, label noise, MLPs, mini-batches, metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Dataset


def subsample_index(n: int, size: int | None, seed: int) -> np.ndarray:
    """Indices of a fixed random subset of ``size`` of ``n`` rows (all rows, in order, if None or larger)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:size]


def subsample(x: np.ndarray, y: np.ndarray, size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random subset of ``size`` rows (all rows when ``size`` is None or larger)."""
    idx = subsample_index(len(y), size, seed)
    return x[idx], y[idx]


class Split:
    """Train / validation / test tensors of a classification data set.

    The validation split is carved from the (sub-sampled) training set with a fixed seed
    that does not depend on the run's seed, so every run and every operator sees the
    same three splits, and no test row is ever in it. Features are standardised with the
    training split's statistics. ``train_index`` / ``val_index`` index ``data.x_train``
    and ``test_index`` indexes ``data.x_test`` (the tests check the splits from them).
    """

    def __init__(
        self,
        data: Dataset,
        *,
        train_size: int | None = None,
        test_size: int | None = None,
        val_fraction: float = 0.1,
        standardise: bool = True,
        split_seed: int = 1234,
    ) -> None:
        pool = subsample_index(len(data.y_train), train_size, split_seed)
        test_index = subsample_index(len(data.y_test), test_size, split_seed + 1)
        x, y = data.x_train[pool], data.y_train[pool]
        xt, yt = data.x_test[test_index], data.y_test[test_index]
        order = np.random.default_rng(split_seed + 2).permutation(len(y))
        n_val = max(1, int(round(val_fraction * len(y))))
        val, train = order[:n_val], order[n_val:]
        self.train_index, self.val_index, self.test_index = pool[train], pool[val], test_index
        if standardise:
            mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
        else:
            mu, sd = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)

        def t(a: np.ndarray) -> Tensor:
            return torch.as_tensor(((a - mu) / sd).astype(np.float32))

        self.x_train, self.y_train = t(x[train]), torch.as_tensor(y[train])
        self.x_val, self.y_val = t(x[val]), torch.as_tensor(y[val])
        self.x_test, self.y_test = t(xt), torch.as_tensor(yt)
        self.classes = data.classes
        self.features = x.shape[1]


PRETTY = {"letter": "LetterRecognition", "fashion-mnist": "Fashion-MNIST", "digits": "digits (scikit-learn)"}


def pretty(dataset: str) -> str:
    """The data set's name as written in reports."""
    return PRETTY.get(dataset, dataset)


def noisy_labels(y: Tensor, classes: int, rate: float, seed: int) -> Tensor:
    """Replaces a ``rate`` fraction of labels by uniformly random classes (Berrada et al. 2018).

    A replaced label may equal the true one by chance, as in the papers' protocol.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < rate
    return torch.where(flip, torch.randint(0, classes, (len(y),), generator=g), y)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them: ``mlp([16, 256, 26])``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batches(n: int, batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of a shuffled epoch in mini-batches (the last one may be smaller)."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch):
        yield perm[i : i + batch]


def topk_accuracy(scores: Tensor, y: Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores."""
    top = scores.topk(k, dim=-1).indices
    return (top == y[:, None]).any(-1).float().mean().item()


def per_class_topk(scores: Tensor, y: Tensor, k: int, classes: int) -> Tensor:
    """Top-k accuracy of each class (NaN for a class absent from ``y``), shape (classes,)."""
    top = scores.topk(k, dim=-1).indices
    hit = (top == y[:, None]).any(-1).float()
    count = torch.bincount(y, minlength=classes).float()
    total = torch.zeros(classes).index_add(0, y, hit)
    return torch.where(count > 0, total / count.clamp_min(1.0), math.nan)


class BestCheckpoint:
    """Early stopping: keeps the parameters of the evaluation with the best validation score.

    ``update(score, step)`` after each evaluation copies the modules' parameters when the
    score beats every earlier one (the first of equal scores wins; NaN never does);
    ``restore()`` loads the best copy back. The validation score is the only input, so
    the test split plays no part in when training stops.
    """

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.score = -math.inf
        self.step = -1
        self._state: list[dict[str, Tensor]] | None = None

    def update(self, score: float, step: int) -> bool:
        if not score > self.score:
            return False
        self.score, self.step = score, step
        self._state = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]
        return True

    def restore(self) -> None:
        if self._state is None:
            return
        for m, state in zip(self.modules, self._state, strict=True):
            m.load_state_dict(state)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 4096) -> Tensor:
    """``model(x)`` in evaluation mode, in chunks."""
    model.eval()
    out = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    model.train()
    return out

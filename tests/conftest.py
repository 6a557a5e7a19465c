"""Shared fixtures: seeded random rows with ties and -inf padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20231123)


def random_rows(
    rng: np.random.Generator, rows: int, n: int, *, ties: bool = True, pad: bool = True
) -> np.ndarray:
    """Rows mixing distributions, with rounded values (ties) and -inf padding."""
    kind = rng.integers(0, 4, size=rows)
    x = np.where(
        kind[:, None] == 0,
        rng.normal(size=(rows, n)),
        np.where(kind[:, None] == 1, rng.exponential(size=(rows, n)), rng.uniform(-3, 3, size=(rows, n))),
    )
    x = np.where(kind[:, None] == 3, rng.standard_cauchy(size=(rows, n)).clip(-20.0, 20.0), x)
    if ties:
        rounded = rng.random(rows) < 0.4
        x[rounded] = np.round(x[rounded] * 2.0) / 2.0
    if pad:
        padded = rng.random((rows, n)) < np.where(rng.random(rows) < 0.3, 0.3, 0.0)[:, None]
        x[padded] = -np.inf
    return x


def cuda_available() -> bool:
    return torch.cuda.is_available()

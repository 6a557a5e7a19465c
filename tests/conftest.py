"""Shared fixtures (seeded random rows with ties and -inf padding) and hypothesis profiles."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(2)

# Hypothesis profiles for tests/test_properties.py. "ci" (the default) is derandomized
# and keeps no example database, so every run tries the same cases and the suite's time
# is bounded; "long" (``pytest --hypothesis-profile long``) searches freshly each run,
# SOFTTOPK_HYPOTHESIS_EXAMPLES examples per property (2000 by default).
_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=_SLOW_DATA
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("SOFTTOPK_HYPOTHESIS_EXAMPLES", "2000")),
    deadline=None,
    database=None,
    suppress_health_check=_SLOW_DATA,
    print_blob=True,
)
settings.load_profile(os.environ.get("SOFTTOPK_HYPOTHESIS_PROFILE", "ci"))


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


# Known failures of the property suite, each a real defect kept visible (strict xfail: a fix
# turns them into errors until the entry is removed). The hypothesis "ci" profile is
# derandomized, so these cases fail the same way on every run.
KNOWN_FAILURES = {}


# torch.compile of topk_mag's tensor route (a Newton loop of many small ops) and of the sorting
# networks (a node per comparator layer) takes minutes per test on 2 cores: these run with
# `make test-heavy`, outside CI's time budget.
HEAVY = (
    "test_transforms.py::test_compile_fullgraph[magnitude",
    "test_transforms.py::test_compile_dynamic[magnitude",
    "test_transforms.py::test_compile_fullgraph[odd_even]",
    "test_transforms.py::test_compile_dynamic[odd_even]",
    "test_transforms.py::test_compile_fullgraph[bitonic]",
    "test_transforms.py::test_compile_dynamic[bitonic]",
    "test_registry.py::test_compile_equals_eager[odd_even]",
    "test_registry.py::test_compile_equals_eager[bitonic]",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(key in item.nodeid for key in HEAVY):
            item.add_marker(pytest.mark.heavy)
        for key, reason in KNOWN_FAILURES.items():
            if item.nodeid.endswith(key):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))

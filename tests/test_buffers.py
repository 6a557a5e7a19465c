"""The CPU kernels' output pool: large blocks reused once their array is gone, never while it lives."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import softtopk
from softtopk import _buffers

LARGE = (_buffers.POOL_MIN_BYTES // 4,)  # float32 entries: one block at the pool's threshold


@pytest.fixture(autouse=True)
def empty_pool():
    _buffers.release()
    yield
    _buffers.release()


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_a_freed_large_block_is_handed_out_again_and_a_live_one_never():
    first = _buffers.output(LARGE, np.float32)
    held = address(first)
    second = _buffers.output(LARGE, np.float32)
    assert address(second) != held  # first is alive: its block is not shared
    del first
    gc.collect()
    assert _buffers.kept_bytes() == _buffers.POOL_MIN_BYTES
    third = _buffers.output(LARGE, np.float32)
    assert address(third) == held
    assert _buffers.kept_bytes() == 0
    assert third.shape == LARGE and third.dtype == np.float32 and third.flags.c_contiguous


def test_a_view_of_the_output_keeps_its_block_out_of_the_pool():
    tensor = torch.from_numpy(_buffers.output((2, LARGE[0] // 2), np.float32))
    row = tensor[1]
    held = row.data_ptr()
    del tensor
    gc.collect()
    assert _buffers.kept_bytes() == 0
    other = _buffers.output(LARGE, np.float32)
    assert not address(other) <= held < address(other) + other.nbytes
    del row
    gc.collect()
    assert _buffers.kept_bytes() == _buffers.POOL_MIN_BYTES


def test_small_outputs_are_plain_arrays_and_blocks_of_another_size_are_not_taken():
    small = _buffers.output((1000,), np.float64)
    del small
    gc.collect()
    assert _buffers.kept_bytes() == 0
    big = _buffers.output(LARGE, np.float32)
    held = address(big)
    del big
    gc.collect()
    other = _buffers.output((LARGE[0] + 16,), np.float32)
    assert address(other) != held
    assert _buffers.kept_bytes() == _buffers.POOL_MIN_BYTES


def test_the_bound_and_release(monkeypatch):
    monkeypatch.setenv("SOFTTOPK_POOL_BYTES", "0")
    array = _buffers.output(LARGE, np.float32)
    del array
    gc.collect()
    assert _buffers.kept_bytes() == 0
    monkeypatch.setenv("SOFTTOPK_POOL_BYTES", str(_buffers.POOL_MIN_BYTES))
    a, b = _buffers.output(LARGE, np.float32), _buffers.output(LARGE, np.float32)
    del a, b
    gc.collect()
    assert _buffers.kept_bytes() == _buffers.POOL_MIN_BYTES  # one of the two fits the bound
    assert _buffers.release() == _buffers.POOL_MIN_BYTES
    assert _buffers.kept_bytes() == 0


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_a_bad_bound_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("SOFTTOPK_POOL_BYTES", value)
    with pytest.raises(ValueError, match="SOFTTOPK_POOL_BYTES"):
        _buffers.output(LARGE, np.float32)


def test_contiguous_copies_a_strided_array_into_an_output():
    base = np.arange(12.0).reshape(3, 4)
    assert _buffers.contiguous(base) is base
    copy = _buffers.contiguous(base.T)
    assert copy.flags.c_contiguous and np.array_equal(copy, base.T)


@pytest.mark.parametrize("op", ["topk_mask", "topk_mag"])
def test_operators_on_reused_blocks_equal_fresh_results(op):
    """Two calls at an output of the pool's size: the first result, alive, is left intact."""
    fn = getattr(softtopk, op)
    n = _buffers.POOL_MIN_BYTES // 4 // 2
    x = torch.randn(2, n, dtype=torch.float32, requires_grad=True)
    v = torch.randn(2, n)
    y1 = fn(x, 5)
    (g1,) = torch.autograd.grad(y1, x, v)
    y1_copy, g1_copy = y1.detach().clone(), g1.clone()
    x2 = (-x.detach()).requires_grad_()
    y2 = fn(x2, 5)
    (g2,) = torch.autograd.grad(y2, x2, v)
    assert torch.equal(y1, y1_copy) and torch.equal(g1, g1_copy)  # not overwritten
    assert y1.data_ptr() != y2.data_ptr() and g1.data_ptr() != g2.data_ptr()
    del y1, g1, y2, g2
    gc.collect()
    assert _buffers.kept_bytes() > 0
    y3 = fn(x, 5)
    (g3,) = torch.autograd.grad(y3, x, v)
    assert torch.equal(y3, y1_copy) and torch.equal(g3, g1_copy)


def test_an_output_freed_while_the_pool_is_locked_waits_in_the_queue():
    """A weak reference's callback inside the pool's own locked section (a garbage collection
    there, a signal handler) queues its block instead of changing the pool under its holder."""
    array = _buffers.output(LARGE, np.float32)
    with _buffers._lock:
        del array
        gc.collect()
        assert len(_buffers._returned) == 1 and not _buffers._free
    assert _buffers.kept_bytes() == _buffers.POOL_MIN_BYTES
    assert not _buffers._returned

"""What the backward keeps: O(n) per row at most, O(k + support) for the sparse links."""

from __future__ import annotations

import pytest
import torch

import softtopk


def saved_bytes(fn, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return total, y


@pytest.mark.parametrize("method", ["entropic", "lapsum"])
def test_dense_links_save_one_row_of_slopes(method):
    x = torch.randn(8, 50_000, requires_grad=True)
    saved, _ = saved_bytes(lambda a: softtopk.topk_mask(a, 100, method=method), x)
    assert saved <= x.numel() * x.element_size() * 1.01


@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
def test_sparse_links_save_the_candidates_only(p):
    x = torch.randn(8, 50_000, requires_grad=True)
    saved, y = saved_bytes(lambda a: softtopk.topk_mask(a, 100, p=p, temperature=0.01), x)
    support = int((y > 0).sum(-1).max())
    # Slopes (float32) and indices (int64) on at most a few times the support.
    assert saved <= 8 * 12 * 4 * support + 1024
    assert saved < x.numel() * x.element_size() / 50


def test_magnitude_saves_the_candidates_only():
    x = torch.randn(8, 50_000, requires_grad=True)
    saved, _ = saved_bytes(lambda a: softtopk.topk_mag(a, 100, temperature=0.01), x)
    assert saved < x.numel() * x.element_size() / 20

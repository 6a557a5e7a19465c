"""What the backward keeps beyond the tensors the caller holds anyway (input and output)."""

from __future__ import annotations

import pytest
import torch

import softtopk


def saved_bytes(fn, x):
    """Bytes the autograd graph saves, split into the output's own storage and the rest."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    own = {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    extra = sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in own)
    return extra, y


@pytest.mark.parametrize(
    "method,p", [("sparse", 2.0), ("sparse", 4.0 / 3.0), ("entropic", 2.0), ("lapsum", 2.0), ("soft", 2.0)]
)
def test_threshold_family_saves_the_output_and_one_number_per_row(method, p):
    """The backward saves y, tau and t (and a dense link its input x, which the caller holds)."""
    x = torch.randn(8, 50_000, requires_grad=True)
    extra, y = saved_bytes(lambda a: softtopk.topk_mask(a, 100, method=method, p=p, temperature=0.01), x)
    assert y.requires_grad
    assert extra <= 8 * 2 * 8  # tau and t, float64, per row


def test_magnitude_saves_the_candidates_only():
    x = torch.randn(8, 50_000, requires_grad=True)
    saved, _ = saved_bytes(lambda a: softtopk.topk_mag(a, 100, temperature=0.01), x)
    assert saved < x.numel() * x.element_size() / 20

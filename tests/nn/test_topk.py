"""Modules hold configuration and call the functional ops."""

from __future__ import annotations

import io

import pytest
import torch

import softtopk
from softtopk.nn import TopKMag, TopKMask


@pytest.mark.parametrize("method", ["sparse", "entropic", "lapsum", "hard"])
def test_topk_mask_module_equals_function(method):
    x = torch.randn(3, 4, 10)
    layer = TopKMask(3, dim=1, method=method, temperature=0.2)
    torch.testing.assert_close(layer(x), softtopk.topk_mask(x, 3, dim=1, method=method, temperature=0.2))
    torch.testing.assert_close(layer(x, k=2), softtopk.topk_mask(x, 2, dim=1, method=method, temperature=0.2))


def test_topk_mag_module_equals_function():
    x = torch.randn(5, 20)
    layer = TopKMag(4, temperature=0.3, debias=False)
    torch.testing.assert_close(layer(x), softtopk.topk_mag(x, 4, temperature=0.3, debias=False))


@pytest.mark.parametrize(
    "layer", [TopKMask(2, method="lapsum", temperature=0.7), TopKMag(3, temperature=0.2)]
)
def test_state_dict_and_pickle_round_trip(layer):
    x = torch.randn(2, 9)
    restored = type(layer)(1)
    restored.load_state_dict(layer.state_dict())  # no tensors: configuration lives in attributes
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), layer(x))
    assert repr(loaded) == repr(layer)


def test_repr_shows_configuration():
    assert "method='entropic'" in repr(TopKMask(2, method="entropic"))
    assert "debias=True" in repr(TopKMag(2))


def test_module_gradcheck():
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(TopKMask(3, temperature=0.5), (x,))
    assert torch.autograd.gradcheck(TopKMag(3, temperature=0.5), (x,))

"""MagnitudePruning / MagnitudePruner: training through topk_mag, schedule, exactly sparse export."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import softtopk
from softtopk.nn import MagnitudePruner, MagnitudePruning, polynomial_sparsity
from softtopk.nn.functional import hard_magnitude_prune, magnitude_prune


def test_polynomial_schedule():
    # Zhu and Gupta 2017: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3.
    for t in range(0, 120, 7):
        frac = min(max((t - 10) / 90, 0.0), 1.0)
        expected = 0.95 + (0.1 - 0.95) * (1 - frac) ** 3
        assert polynomial_sparsity(t, 0.95, initial=0.1, begin=10, end=100) == pytest.approx(expected)
    with pytest.raises(ValueError, match="final"):
        polynomial_sparsity(0, 1.0)
    with pytest.raises(ValueError, match="end must be after"):
        polynomial_sparsity(0, 0.5, begin=5, end=5)


def test_functional_is_topk_mag_over_the_tensor_or_slices():
    w = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(
        magnitude_prune(w, 0.8, temperature=0.2),
        softtopk.topk_mag(w.reshape(1, -1), 12, temperature=0.2).reshape(6, 10),
    )
    torch.testing.assert_close(
        magnitude_prune(w, 0.7, dim=1, temperature=0.2), softtopk.topk_mag(w, 3, temperature=0.2)
    )
    torch.testing.assert_close(
        magnitude_prune(w, 0.5, method="sparse", temperature=0.2),
        w * softtopk.topk_mask(w.abs().reshape(1, -1), 30, temperature=0.2).reshape(6, 10),
    )


@pytest.mark.parametrize("dim", [None, 0, 1])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97, 0.333])
def test_hard_export_has_exactly_the_requested_sparsity(dim, sparsity):
    w = torch.randn(30, 40)
    sparse = hard_magnitude_prune(w, sparsity, dim=dim)
    if dim is None:
        assert int((sparse != 0).sum()) == 1200 - round(sparsity * 1200)
    else:
        n = w.shape[dim]
        assert ((sparse != 0).sum(dim) == n - round(sparsity * n)).all()
    kept = sparse != 0
    torch.testing.assert_close(sparse[kept], w[kept])  # kept weights are unchanged
    # ... and they are the largest in magnitude.
    if dim is None:
        assert w[kept].abs().min() >= w[~kept].abs().max()


def test_pruner_trains_and_exports_exact_sparsity():
    torch.manual_seed(0)
    X = torch.randn(256, 20)
    y = (X[:, :3].sum(-1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    pruner = MagnitudePruner(model, {"0.weight": 0.9, "2.weight": 0.5}, end=40, temperature=0.1)
    assert pruner.sparsity == {"0.weight": 0.0, "2.weight": 0.0}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        loss = F.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if step == 19:
            s = pruner.sparsity["0.weight"]
            assert 0.5 < s < 0.9 and s == pytest.approx(polynomial_sparsity(20, 0.9, end=40))
    assert pruner.sparsity == {"0.weight": 0.9, "2.weight": 0.5}
    soft_acc = (model(X).argmax(-1) == y).float().mean().item()
    report = pruner.export()
    assert report == {"0.weight": 0.9, "2.weight": 0.5}
    assert not parametrize.is_parametrized(model[0])
    assert int((model[0].weight != 0).sum()) == 128 and int((model[2].weight != 0).sum()) == 64
    hard_acc = (model(X).argmax(-1) == y).float().mean().item()
    assert hard_acc > 0.9 and abs(hard_acc - soft_acc) < 0.05  # little train/test mismatch


def test_parametrization_module_equals_function_state_dict_and_gradcheck():
    layer = torch.nn.Linear(8, 6).double()
    pruning = MagnitudePruning(0.75, temperature=0.3)
    parametrize.register_parametrization(layer, "weight", pruning)
    original = layer.parametrizations.weight.original
    torch.testing.assert_close(layer.weight, magnitude_prune(original, 0.75, temperature=0.3))
    # The sparsity is saved with the model, and restored.
    state = layer.state_dict()
    other = torch.nn.Linear(8, 6).double()
    parametrize.register_parametrization(other, "weight", MagnitudePruning(0.0, temperature=0.3))
    other.load_state_dict(state)
    assert other.parametrizations.weight[0].sparsity == 0.75
    torch.testing.assert_close(other.weight, layer.weight)
    # torch pickles parametrised modules only through state_dict; the parametrisation pickles.
    buffer = io.BytesIO()
    torch.save(pruning, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(original), layer.weight)
    # gradcheck through the parametrised layer in its original weight.
    x = torch.randn(3, 8, dtype=torch.float64)
    w = original.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: F.linear(x, pruning(v)), (w,))
    # The pruner resumes its schedule from a state dict.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    pruner = MagnitudePruner(model, 0.5, end=10)
    for _ in range(4):
        pruner.step()
    fresh = MagnitudePruner(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.5, end=10)
    fresh.load_state_dict(pruner.state_dict())
    assert fresh.sparsity == pruner.sparsity


@pytest.mark.slow
def test_compile_equals_eager():
    layer = torch.nn.Linear(16, 16)
    parametrize.register_parametrization(layer, "weight", MagnitudePruning(0.9, temperature=0.1))
    x = torch.randn(4, 16)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_bad_input():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no parameter"):
        MagnitudePruner(model, 0.5, targets=["0.bias2"])
    with pytest.raises(ValueError, match="no entry"):
        MagnitudePruner(model, {"0.weight": 0.5}, targets=["0.weight", "0.bias"])
    with pytest.raises(ValueError, match="sparsity"):
        MagnitudePruning(1.0)
    with pytest.raises(ValueError, match="magnitude"):
        magnitude_prune(torch.randn(3), 0.5, method="nope")
    with pytest.raises(TypeError, match="model"):
        MagnitudePruner("model", 0.5)

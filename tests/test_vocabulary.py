"""One vocabulary across the package: method names, signatures, argument names, validation.

A method name that works in ``topk_mask`` works in the layers, the losses and the
experiments; k-operators are called ``op(x, k, dim)`` with ``dim`` positional as in
``torch.topk``; ``temperature`` is the smoothing knob (torchsort's
``regularization_strength`` is an alias in ``soft_rank`` / ``soft_sort`` only); ``p`` is
the norm exponent only; every module checks its arguments when it is built.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import softtopk
from softtopk import losses, nn, registry, sampling
from softtopk.experiments._runner import mask_operators
from softtopk.nn import functional as F
from softtopk.ops._mask import METHODS, mask_methods

NAMES = mask_methods()


def _gen(name):
    return torch.Generator().manual_seed(0) if registry.OPERATORS[name].stochastic else None


def test_method_names_are_the_registry_mask_names():
    masks = {name for name, op in registry.OPERATORS.items() if op.kind == "mask"}
    assert set(NAMES) == masks
    assert set(METHODS) <= masks


@pytest.mark.parametrize("name", NAMES)
def test_a_method_name_works_everywhere(name):
    x = torch.randn(3, 8, dtype=torch.float64)
    t = registry.OPERATORS[name].temperature
    gen = _gen(name)
    # The operator, its registry entry and the module give the same mask.
    y = softtopk.topk_mask(x, 3, -1, method=name, temperature=t, generator=_gen(name))
    ref = registry.OPERATORS[name](x, 3, -1, temperature=t, generator=_gen(name))
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    torch.testing.assert_close(nn.TopKMask(3, method=name, temperature=t, generator=_gen(name))(x), ref)
    low = softtopk.topk_mask(x, 3, method=name, temperature=t, largest=False, generator=_gen(name))
    torch.testing.assert_close(low, registry.OPERATORS[name](-x, 3, temperature=t, generator=_gen(name)))
    # Layers and losses resolve the same name.
    logits, target = torch.randn(4, 10, dtype=torch.float64), torch.tensor([0, 3, 5, 9])
    assert torch.isfinite(
        losses.topk_cross_entropy(logits, target, p_k=[0.5, 0.5], method=name, generator=gen)
    )
    assert torch.isfinite(losses.TopKCrossEntropyLoss([0.5, 0.5], method=name)(logits, target))
    stages, truth = [torch.randn(2, 8), torch.randn(2, 8)], torch.zeros(2, 8)
    truth[:, :2] = 1.0
    assert torch.isfinite(losses.lcron_loss(stages, truth, [4, 2], method=name, generator=gen).joint)
    assert torch.isfinite(losses.CascadeLoss(2, method=name)(stages, truth))
    votes = F.soft_knn(
        torch.randn(2, 3), torch.randn(9, 3), torch.randint(0, 3, (9,)), 2, num_classes=3, method=name
    )
    assert votes.shape == (2, 3) and nn.SoftKNN(2, num_classes=3, method=name).method == name
    assert F.topk_activation(torch.randn(2, 12), 3, method=name, generator=gen).shape == (2, 12)
    assert nn.TopKSAE(4, 12, 3, method=name).method == name
    assert F.magnitude_prune(torch.randn(6, 6), 0.5, method=name, generator=gen).shape == (6, 6)
    assert nn.DepthRouter(4, capacity=0.5, method=name).method == name
    assert F.topk_route(torch.randn(5, 6), 2, method=name).gates.shape == (5, 6)
    assert nn.TopKRouter(3, 6, 2, method=name).method == name
    assert softtopk.soft_threshold_p_mask(torch.randn(2, 7), 0.0, method=name, generator=gen).shape == (2, 7)
    # The experiments select operators by the same names.
    ops, _ = mask_operators([name])
    # [] only for a temperature-free baseline or another route to a registered operator
    assert [op.name for op in ops] in ([name], [])
    if name != "hard" and not registry.OPERATORS[name].route_of:
        assert [op.name for op in ops] == [name]


def test_unknown_method_names_fail_the_same_way():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="method must be one of .*'subset'.*got 'magnitude'"):
        softtopk.topk_mask(x, 2, method="magnitude")
    with pytest.raises(ValueError, match="method must be one of"):
        nn.TopKMask(2, method="sprase")
    with pytest.raises(ValueError, match="unknown method 'sprase'"):
        losses.TopKCrossEntropyLoss(method="sprase")
    with pytest.raises(ValueError, match="p applies to method='sparse' only"):
        softtopk.topk_mask(x, 2, method="neuralsort", p=1.5)
    with pytest.raises(ValueError, match="solver must be one of 'auto'"):
        softtopk.topk_mask(x, 2, method="subset", solver="sort")
    with pytest.raises(ValueError, match="generator applies to the stochastic methods only"):
        softtopk.topk_mask(x, 2, method="softsort", generator=torch.Generator())


# ----------------------------------------------------------------------- signatures

K_OPERATORS = [
    softtopk.topk_mask,
    softtopk.topk_mag,
    softtopk.permutation_topk_mask,
    softtopk.relaxed_subset,
    softtopk.soft_sinkhorn_mask,
    softtopk.topk_indicators,
    losses.smoothed_kth_value,
    sampling.sample_k,
]


@pytest.mark.parametrize("op", K_OPERATORS, ids=lambda f: f.__name__)
def test_k_operators_take_x_k_dim_positionally(op):
    params = list(inspect.signature(op).parameters.values())
    assert [p.name for p in params[1:3]] == ["k", "dim"]
    assert params[2].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and params[2].default == -1
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])


def test_dim_positional_gives_the_keyword_result():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    z = torch.randn(6, 4, 3, 5, dtype=torch.float64)
    a = losses.smoothed_kth_value(x, 2, 1, noise_samples=z)
    torch.testing.assert_close(a, losses.smoothed_kth_value(x, 2, dim=1, noise_samples=z), atol=0, rtol=0)
    torch.testing.assert_close(
        softtopk.soft_sinkhorn_mask(x, 2, 1), softtopk.soft_sinkhorn_mask(x, 2, dim=1), atol=0, rtol=0
    )
    scores, target = torch.randn(3, 6), torch.tensor([1, 2, 3])
    zs = torch.randn(5, 3, 6)
    torch.testing.assert_close(
        losses.balanced_topk_hinge_loss(scores, target, 2, -1, noise_samples=zs),
        losses.balanced_topk_hinge_loss(scores, target, 2, dim=-1, noise_samples=zs),
    )


def _public_callables():
    seen = {}
    for mod in (softtopk, losses, nn, F, sampling, softtopk.isotonic, softtopk.metrics):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj) and not inspect.ismodule(obj):
                target = obj.__init__ if inspect.isclass(obj) else obj
                try:
                    seen[f"{mod.__name__}.{name}"] = inspect.signature(target)
                except (TypeError, ValueError):
                    continue
    return seen


#: Names of smoothing knobs that other libraries use; the package says ``temperature``.
OTHER_KNOBS = {"epsilon", "eps", "tau", "sigma", "alpha", "beta", "regularization_strength", "steepness", "l"}
#: torchsort's name, kept so that torchsort code runs unchanged.
ALIASES = {
    "softtopk.soft_rank",
    "softtopk.soft_sort",
    "softtopk.isotonic.soft_rank",
    "softtopk.isotonic.soft_sort",
}
#: The functions whose ``p`` is the exponent of the p-norm regulariser.
NORM_P = {
    "softtopk.topk_mask",
    "softtopk.topk_mag",
    "softtopk.nn.TopKMask",
    "softtopk.nn.TopKMag",
    "softtopk.isotonic.isotonic_sparse_mask",
}


def test_temperature_is_the_smoothing_knob_and_p_the_norm_exponent():
    for name, sig in _public_callables().items():
        others = OTHER_KNOBS & set(sig.parameters)
        if name in ALIASES:
            assert others == {"regularization_strength"} and "temperature" in sig.parameters, name
        else:
            assert not others, f"{name} names its smoothing knob {others}, not temperature"
        if "p" in sig.parameters:
            assert name in NORM_P, f"{name} has a parameter p that is not the norm exponent"


def test_torchsort_calls_run_unchanged():
    x = torch.tensor([[2.0, 0.0, 5.0, 4.5]], dtype=torch.float64)
    ref = softtopk.soft_rank(x, temperature=0.3, regularization="kl")
    torch.testing.assert_close(softtopk.soft_rank(x, "kl", 0.3), ref, atol=0, rtol=0)
    torch.testing.assert_close(softtopk.soft_rank(x, regularization="kl", regularization_strength=0.3), ref)
    torch.testing.assert_close(
        softtopk.soft_sort(x, "l2", 0.3), softtopk.soft_sort(x, temperature=0.3), atol=0, rtol=0
    )
    both = softtopk.soft_rank(x, "kl", temperature=0.3, regularization_strength=0.3)
    torch.testing.assert_close(both, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="temperature and regularization_strength name the same parameter"):
        softtopk.soft_rank(x, temperature=0.3, regularization_strength=0.5)
    with pytest.raises(ValueError, match="regularization_strength must be a positive finite number"):
        softtopk.soft_sort(x, regularization_strength=-1.0)


# ------------------------------------------------------------- modules check in __init__

BAD_MODULES = {
    "TopKMask method": lambda: nn.TopKMask(2, method="nope"),
    "TopKMask temperature": lambda: nn.TopKMask(2, temperature=-1.0),
    "TopKMask k": lambda: nn.TopKMask("2"),
    "TopKMask negative k": lambda: nn.TopKMask(-1),
    "TopKMask p": lambda: nn.TopKMask(2, p=3.0),
    "TopKMask p with another method": lambda: nn.TopKMask(2, method="entropic", p=1.5),
    "TopKMask dim": lambda: nn.TopKMask(2, dim=1.5),
    "TopKMask solver": lambda: nn.TopKMask(2, method="entropic", solver="pav"),
    "TopKMask generator": lambda: nn.TopKMask(2, method="perturbed", generator=0),
    "TopKMag temperature": lambda: nn.TopKMag(2, temperature=0.0),
    "TopKMag k": lambda: nn.TopKMag(2.5),
    "TopKMag p": lambda: nn.TopKMag(2, p=1.5),
    "TopKMag debias": lambda: nn.TopKMag(2, debias=1),
    "TopKMag dim": lambda: nn.TopKMag(2, dim="a"),
    "SoftKNN k": lambda: nn.SoftKNN(0, num_classes=3),
    "SoftKNN method": lambda: nn.SoftKNN(2, num_classes=3, method="nope"),
    "SoftKNN temperature": lambda: nn.SoftKNN(2, num_classes=3, temperature=-1.0),
    "SoftKNN distance": lambda: nn.SoftKNN(2, num_classes=3, distance="nope"),
    "SoftKNN num_classes": lambda: nn.SoftKNN(2, num_classes=0),
    "SoftKNN generator": lambda: nn.SoftKNN(2, num_classes=3, generator=1),
    "TopKSAE k": lambda: nn.TopKSAE(4, 8, -1),
    "TopKSAE method": lambda: nn.TopKSAE(4, 8, 2, method="nope"),
    "TopKSAE temperature": lambda: nn.TopKSAE(4, 8, 2, temperature=-1.0),
    "TopKSAE activation": lambda: nn.TopKSAE(4, 8, 2, activation="nope"),
    "TopKSAE generator": lambda: nn.TopKSAE(4, 8, 2, generator=1),
    "DepthRouter d_model": lambda: nn.DepthRouter(0, capacity=0.5),
    "DepthRouter capacity": lambda: nn.DepthRouter(4, capacity=2.0),
    "DepthRouter method": lambda: nn.DepthRouter(4, capacity=0.5, method="nope"),
    "DepthRouter temperature": lambda: nn.DepthRouter(4, capacity=0.5, temperature=-1.0),
    "DepthRouter causal": lambda: nn.DepthRouter(4, capacity=0.5, causal=1),
    "MagnitudePruning sparsity": lambda: nn.MagnitudePruning(1.5),
    "MagnitudePruning method": lambda: nn.MagnitudePruning(0.5, method="nope"),
    "MagnitudePruning temperature": lambda: nn.MagnitudePruning(0.5, temperature=-1.0),
    "MagnitudePruning dim": lambda: nn.MagnitudePruning(0.5, dim=1.5),
    "MagnitudePruning generator": lambda: nn.MagnitudePruning(0.5, generator=3),
    "RelaxedBeamStep beam": lambda: nn.RelaxedBeamStep(0),
    "RelaxedBeamStep method": lambda: nn.RelaxedBeamStep(2, method="nope"),
    "RelaxedBeamStep temperature": lambda: nn.RelaxedBeamStep(2, temperature=0.0),
    "TopKRouter in_features": lambda: nn.TopKRouter(0, 4),
    "TopKRouter method": lambda: nn.TopKRouter(4, 4, method="nope"),
    "TopKRouter k": lambda: nn.TopKRouter(4, 4, k=5),
    "CascadeLoss num_stages": lambda: losses.CascadeLoss(0),
    "CascadeLoss recipe": lambda: losses.CascadeLoss(2, recipe="nope"),
    "CascadeLoss method": lambda: losses.CascadeLoss(2, method="nope"),
    "CascadeLoss temperature": lambda: losses.CascadeLoss(2, temperature=-1.0),
    "CascadeLoss generator": lambda: losses.CascadeLoss(2, generator=1),
    "TopKCrossEntropyLoss p_k": lambda: losses.TopKCrossEntropyLoss((0.5, 0.6)),
    "TopKCrossEntropyLoss method": lambda: losses.TopKCrossEntropyLoss(method="nope"),
    "TopKCrossEntropyLoss temperature": lambda: losses.TopKCrossEntropyLoss(temperature=-1.0),
    "TopKCrossEntropyLoss top1": lambda: losses.TopKCrossEntropyLoss(top1="nope"),
    "TopKCrossEntropyLoss reduction": lambda: losses.TopKCrossEntropyLoss(reduction="nope"),
    "TopKCrossEntropyLoss m": lambda: losses.TopKCrossEntropyLoss(m=0),
    "LogitsFilter top_k": lambda: sampling.LogitsFilter(top_k=-1),
    "LogitsFilter top_p": lambda: sampling.LogitsFilter(top_p=1.5),
    "LogitsFilter min_p": lambda: sampling.LogitsFilter(min_p=-0.5),
    "LogitsFilter dim": lambda: sampling.LogitsFilter(top_k=2, dim=1.5),
    "SampleK k": lambda: sampling.SampleK(-1),
    "SampleK straight_through": lambda: sampling.SampleK(2, straight_through=1),
    "SampleK generator": lambda: sampling.SampleK(2, generator=1),
    "SampleK dim": lambda: sampling.SampleK(2, dim="a"),
}


@pytest.mark.parametrize("case", list(BAD_MODULES), ids=str)
def test_modules_check_their_arguments_when_built(case):
    with pytest.raises((TypeError, ValueError)):
        BAD_MODULES[case]()


def test_every_module_is_covered():
    modules = {
        name
        for mod in (nn, losses, sampling)
        for name in mod.__all__
        if inspect.isclass(getattr(mod, name)) and issubclass(getattr(mod, name), torch.nn.Module)
    }
    assert modules == {case.split()[0] for case in BAD_MODULES}


# --------------------------------------------------------------- docstrings and comments

SRC = Path(softtopk.__file__).parent
HISTORY = re.compile(r"DESIGN|\b[Ii]ssue\s+#?\d|\bpreviously\b|\bused to (?!bracket)|\btests/")


def test_no_history_or_references_outside_the_package():
    found = [
        f"{path.relative_to(SRC)}:{i}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert not found, "\n".join(found)

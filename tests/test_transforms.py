"""Every operator under the transforms PyTorch users apply to it.

One table: every registered operator, plus soft_rank, soft_sort, isotonic_regression and
permutahedron_projection, under

* ``torch.func.vmap``: values equal the loop over the vmapped dim (leading or not), and
  ``vmap(grad(f))`` equals the per-row gradients;
* ``torch.compile(fullgraph=True)``: values and gradients equal eager (stochastic
  operators with their noise passed in; noise drawn from a generator runs eagerly, and
  ``fullgraph=True`` refuses it with an error that says why);
* ``torch.compile(dynamic=True)``: values and gradients equal eager on two shapes;
* the meta device: the right shape and dtype (forward and backward), nothing computed;
* forward mode (``torch.func.jvp`` and eager dual tensors): J u with J from reverse
  mode, and nested (``jacfwd(jacfwd(f))``) the second derivatives of reverse over
  reverse; or NotImplementedError for the operators listed in ``NO_FORWARD``, also nested.

Stochastic operators run under vmap with ``randomness="same"`` (one draw shared by the
vmapped entries: equal to the loop with the same seed) and ``"different"`` (independent
draws); ``randomness="error"`` (torch's default) raises. ``benchmarks/transforms_table.py``
runs this file and writes the table of outcomes to ``docs/api/transforms.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import softtopk
from softtopk.registry import OPERATORS

K = 3


def _registered(name: str) -> Callable[[Tensor], Tensor]:
    op = OPERATORS[name].seeded()
    return lambda x: op(x, K)


def _weights(x: Tensor) -> Tensor:
    return torch.linspace(2.0, 0.0, x.shape[-1], dtype=x.dtype, device=x.device)


#: Operator name -> f(x) on rows (..., n), n >= 8. Registry entries first.
OPS: dict[str, Callable[[Tensor], Tensor]] = {name: _registered(name) for name in OPERATORS}
OPS.update(
    {
        "soft_rank": lambda x: softtopk.soft_rank(x, temperature=0.5),
        "soft_rank[kl]": lambda x: softtopk.soft_rank(x, temperature=0.5, regularization="kl"),
        "soft_sort": lambda x: softtopk.soft_sort(x, temperature=0.5),
        "soft_sort[kl]": lambda x: softtopk.soft_sort(x, temperature=0.5, regularization="kl"),
        "isotonic_regression": lambda x: softtopk.isotonic_regression(x),
        "isotonic_regression[kl]": lambda x: softtopk.isotonic_regression(x, loss="kl"),
        "permutahedron_projection": lambda x: softtopk.permutahedron_projection(x, _weights(x)),
    }
)
NAMES = list(OPS)
STOCHASTIC = [name for name in OPERATORS if OPERATORS[name].stochastic]
DETERMINISTIC = [name for name in NAMES if name not in STOCHASTIC]
# Operators whose registry entry says ``compiles=False`` are left out; the stochastic
# operators compile with their noise passed in (``EXPLICIT_NOISE``). The sorting networks'
# compile tests take minutes each (tests/conftest.py marks them heavy).
COMPILED = [n for n in NAMES if n not in OPERATORS or OPERATORS[n].compiles or n in STOCHASTIC]


def rows(*shape: int, seed: int = 0, dtype=torch.float64) -> Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def loss(y: Tensor) -> Tensor:
    w = torch.linspace(-1.0, 1.0, y.shape[-1], dtype=y.dtype, device=y.device)
    return (y.pow(2) + w * y).sum()


def eager_grad(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(f(xr)), xr)
    return g


# ------------------------------------------------------------------------------- vmap


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_vmap(name):
    f, x = OPS[name], rows(4, 12)
    torch.testing.assert_close(torch.func.vmap(f)(x), torch.stack([f(r) for r in x]))
    grads = torch.func.vmap(torch.func.grad(lambda r: loss(f(r))))(x)
    torch.testing.assert_close(grads, torch.stack([eager_grad(f, r) for r in x]))
    # A vmapped dim that is not the leading one, over 2-D calls.
    x3 = rows(3, 2, 12, seed=1)
    out = torch.func.vmap(f, in_dims=1, out_dims=1)(x3)
    torch.testing.assert_close(out, torch.stack([f(x3[:, i]) for i in range(2)], 1))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_vmap_stochastic_same(name):
    """randomness="same": one draw for every vmapped entry, the draw of an unbatched call."""
    f, x = OPS[name], rows(4, 12)
    out = torch.func.vmap(f, randomness="same")(x)
    torch.testing.assert_close(out, torch.stack([f(r) for r in x]), rtol=0, atol=0)
    grads = torch.func.vmap(torch.func.grad(lambda r: loss(f(r))), randomness="same")(x)
    torch.testing.assert_close(grads, torch.stack([eager_grad(f, r) for r in x]))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_vmap_stochastic_different(name):
    """randomness="different": independent draws; each entry is a valid sample with a gradient."""
    op = OPERATORS[name]
    x = rows(1, 12).expand(4, 12).contiguous()  # four equal rows
    gen = torch.Generator().manual_seed(3)
    out = torch.func.vmap(lambda r: op(r, K, generator=gen), randomness="different")(x)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[2], out[3])
    torch.testing.assert_close(out.sum(-1), torch.full((4,), float(K), dtype=x.dtype))
    gen = torch.Generator().manual_seed(3)
    grads = torch.func.vmap(torch.func.grad(lambda r: loss(op(r, K, generator=gen))), randomness="different")(
        x
    )
    assert torch.isfinite(grads).all() and not torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_vmap_stochastic_error_mode(name):
    """torch's default randomness="error" refuses the draw (never a silently shared one)."""
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(OPS[name])(rows(4, 12))


# ------------------------------------------------------------------------------- meta


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meta(name, dtype):
    f = OPS[name]
    expected = f(rows(4, 12, dtype=dtype))
    x = torch.empty(4, 12, device="meta", dtype=dtype, requires_grad=True)
    y = f(x)
    assert y.device.type == "meta" and y.shape == expected.shape and y.dtype == dtype
    (g,) = torch.autograd.grad(loss(y), x)
    assert g.device.type == "meta" and g.shape == x.shape and g.dtype == dtype


# ----------------------------------------------------------------------- forward mode

#: Operators without forward mode: their autograd.Function has no jvp, and both
#: torch.func.jvp and eager dual tensors raise NotImplementedError (never a missing or
#: wrong tangent). perturbed's estimator is a reverse-mode score function.
NO_FORWARD = {"perturbed", "magnitude", "magnitude-p4/3", "soft-sinkhorn", "indicators"}
FORWARD = [name for name in NAMES if name not in NO_FORWARD]


@pytest.mark.parametrize("name", FORWARD)
def test_forward_mode_equals_the_reverse_mode_jacobian(name):
    """torch.func.jvp and eager dual tensors (torch.autograd.forward_ad, inputs that do
    not require grad) give J u with J from reverse mode (dftopk's tangent counted its
    boundary entries twice before; soft_rank's eager dual call raised)."""
    import torch.autograd.forward_ad as fwAD

    f = OPS[name]  # (the stochastic ones seeded: the same draws on every call)
    x, u = rows(2, 9), rows(2, 9, seed=1)
    jac = torch.func.jacrev(f)(x)  # (2, m, 2, 9)
    expected = torch.einsum("bmij,ij->bm", jac, u)
    _, ju = torch.func.jvp(f, (x,), (u,))
    torch.testing.assert_close(ju, expected, atol=1e-8, rtol=1e-6)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, u))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", FORWARD)
def test_forward_over_forward_equals_reverse_over_reverse(name):
    """Second derivatives by nested forward mode (jacfwd(jacfwd(f))) and by reverse mode.

    torch.func does not run an outer jvp through an autograd.Function's jvp (every
    second derivative came out 0 for the threshold family and isotonic regression's KL
    blocks); the operators take a tensor-op route there.
    """
    f = OPS[name]
    x = rows(1, 9)
    w = torch.randn(f(x).shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    loss = lambda a: (f(a) * w).sum()  # noqa: E731
    expected = torch.func.jacrev(torch.func.jacrev(loss))(x)
    fwd = functools.partial(torch.func.jacfwd, randomness="same")  # (seeded: one draw per call)
    torch.testing.assert_close(fwd(fwd(loss))(x), expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(NO_FORWARD))
def test_operators_without_forward_mode_raise(name):
    import torch.autograd.forward_ad as fwAD

    f = OPS[name]
    x, u = rows(2, 9), rows(2, 9, seed=1)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(f, (x,), (u,))
    with pytest.raises(NotImplementedError, match="jvp"), fwAD.dual_level():
        f(fwAD.make_dual(x, u))
    # (nested, torch's own check fails on an internal assertion: the operator raises first)
    fwd = functools.partial(torch.func.jacfwd, randomness="same")
    with pytest.raises(NotImplementedError, match="has no forward mode"):
        fwd(fwd(lambda a: f(a).sum()))(x)


# ---------------------------------------------------------------------------- compile

#: The stochastic operators with their noise passed in (what torch.compile traces).
EXPLICIT_NOISE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "perturbed": lambda x, z: softtopk.topk_mask(
        x, K, method="perturbed", temperature=OPERATORS["perturbed"].temperature, noise_samples=z
    ),
    "subset": lambda x, z: softtopk.relaxed_subset(
        x, K, temperature=OPERATORS["subset"].temperature, gumbel=z[0]
    ),
}


def noise_for(x: Tensor, samples: int = 8) -> Tensor:
    gen = torch.Generator().manual_seed(x.shape[-1])
    z = torch.randn(samples, *x.shape, dtype=x.dtype, generator=gen)
    return z


def _compare(f: Callable[[Tensor], Tensor], compiled: Callable[[Tensor], Tensor], x: Tensor) -> None:
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = f(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, atol=1e-7, rtol=1e-7)
    (ge,) = torch.autograd.grad(loss(ye), xe)
    (gc,) = torch.autograd.grad(loss(yc), xc)
    torch.testing.assert_close(gc, ge, atol=1e-6, rtol=1e-6)


def _compiled_pair(name: str, **options) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(eager f, compiled f) on x; a stochastic operator gets fixed noise for each shape."""
    if name not in STOCHASTIC:
        return OPS[name], torch.compile(OPS[name], **options)
    g = EXPLICIT_NOISE[name]
    compiled = torch.compile(g, **options)
    return (lambda x: g(x, noise_for(x))), (lambda x: compiled(x, noise_for(x)))


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    f, compiled = _compiled_pair(name, fullgraph=True)
    _compare(f, compiled, rows(3, 10))


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compile_dynamic(name):
    torch._dynamo.reset()
    f, compiled = _compiled_pair(name, dynamic=True)
    for shape in ((3, 10), (5, 17)):
        _compare(f, compiled, rows(*shape, seed=shape[1]))


@pytest.mark.slow
@pytest.mark.parametrize("name", STOCHASTIC)
def test_compile_refuses_generator_noise(name):
    """Noise drawn from a generator is not traced: an error naming the operator (fullgraph),
    and the eager draws (the same values as eager) without fullgraph."""
    torch._dynamo.reset()
    op, x = OPERATORS[name], rows(3, 10)

    def f(a):
        return op(a, K, generator=torch.Generator().manual_seed(0))

    with pytest.raises(Exception, match="torch.Generator"):
        torch.compile(lambda a: op(a, K), fullgraph=True)(x)
    torch.testing.assert_close(torch.compile(f)(x), f(x), rtol=0, atol=0)

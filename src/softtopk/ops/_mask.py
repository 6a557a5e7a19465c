"""``topk_mask``: one entry point for every soft top-k mask, chosen by ``method``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_p, check_positive, check_tensor, eager_only, may_sync
from .._rows import empty_result, rowwise
from ._dftopk import dftopk_mask
from ._hard import hard_mask
from ._perturbation import perturbation, perturbed_mask
from ._soft import soft_mask
from ._threshold_masks import entropic_mask, lapsum_mask, sparse_mask


class Method(NamedTuple):
    """A mask method: its row function and the solvers it accepts."""

    rows: Callable[..., Tensor]
    solvers: tuple[str, ...]
    uses_p: bool = False
    uses_noise: bool = False
    k_grad: bool = True
    k_dtype: torch.dtype | None = None  # the budgets' dtype if not the compute dtype


#: Row functions take (x (B, n), k (B,), *, temperature, [p], [pert], solver), x in the compute
#: dtype and k in the method's ``k_dtype`` (the threshold solvers' float64) or the compute dtype.
METHODS: dict[str, Method] = {
    "sparse": Method(
        sparse_mask, ("auto", "newton", "sort", "pav", "dykstra"), uses_p=True, k_dtype=torch.float64
    ),
    "entropic": Method(entropic_mask, ("auto", "newton"), k_dtype=torch.float64),
    "lapsum": Method(lapsum_mask, ("auto", "newton", "sort"), k_dtype=torch.float64),
    "hard": Method(hard_mask, ("auto",), k_grad=False),
    "soft": Method(soft_mask, ("auto", "newton")),
    "dftopk": Method(dftopk_mask, ("auto",), k_grad=False),
    "perturbed": Method(perturbed_mask, ("auto",), uses_noise=True, k_grad=False),
}

#: Monte-Carlo samples of method="perturbed" when neither num_samples nor noise_samples is given.
PERTURBED_SAMPLES = 100


def mask_methods() -> tuple[str, ...]:
    """Every ``method`` name of :func:`topk_mask`: the mask operators of the registry.

    The same names select an operator in the layers (``softtopk.nn``), the losses and
    the experiments; the rows of :data:`METHODS` are computed here, the other names run
    their registry entry (the subset sampler, the relaxed permutations, fixed-p variants).
    """
    from ..registry import OPERATORS  # the registry imports ops: read it at call time

    extra = tuple(name for name, op in OPERATORS.items() if op.kind == "mask" and name not in METHODS)
    return (*METHODS, *extra)


def topk_mask(
    x: Tensor,
    k: float | Tensor,
    dim: int = -1,
    *,
    method: str = "sparse",
    temperature: float = 0.1,
    largest: bool = True,
    p: float = 2.0,
    solver: str = "auto",
    num_samples: int | None = None,
    noise: str | None = None,
    generator: torch.Generator | None = None,
    noise_samples: Tensor | None = None,
) -> Tensor:
    r"""Soft top-k mask: a differentiable relaxation of the k-hot mask of the largest entries.

    Every method returns y in [0, 1]^n along ``dim`` with sum(y) = k and tends to the
    ``torch.topk`` mask as the temperature goes to 0 (when x_(k) > x_(k+1)). The sum is k
    up to rounding: about n eps of the dtype, plus n 2^-52 max abs(x) / t from the float64
    threshold (1/t amplifies its rounding); float64 scores with 8 max abs(x) / t beyond the
    float64 range are refused (ValueError) by the threshold methods. ``hard`` breaks ties
    as ``torch.topk`` does, ties between +inf entries included (the other methods share k
    equally among them). The methods of the threshold family share one form and one
    backward:

    .. math::

        y_i = G\Big(\frac{x_i - \tau}{t}\Big),\qquad \sum_i y_i = k,\qquad
        \frac{\partial y}{\partial x} = \operatorname{diag}(g) - \frac{g g^\top}{\sum_j g_j}

    with g_i = G'((x_i - tau)/t)/t, tau found per row without sorting it.

    ============  ==========================================  ====================  ===========
    method        G(z)                                        temperature is        sparse
    ============  ==========================================  ====================  ===========
    ``sparse``    clip(max(z, 0)^(1/(p-1)), 0, 1)             Sander's l            yes
    ``entropic``  logistic 1/(1+e^{-z})                       SOFT's eps C_max/2    no
    ``lapsum``    Laplace CDF                                 LapSum's alpha        no
    ``hard``      the torch.topk mask (zero gradient)         unused                yes
    ``soft``      logistic, SOFT's two-anchor transport       SOFT's eps            no
    ============  ==========================================  ====================  ===========

    ``soft`` is SOFT as published (Xie et al. 2020): the converged two-anchor Sinkhorn
    plan with the cost normalised by its maximum C_max, i.e. ``entropic`` at
    temperature eps * C_max / 2 per row, computed exactly by the threshold solver.

    Two published methods are outside the threshold family:

    * ``dftopk`` (Zhu et al. 2025): y = sigma((x - theta)/t) with theta the midpoint of
      x_(k) and x_(k+1), found by selection. **Its sum is not k** (by design: the paper
      relaxes the normalisation); it is not differentiable in k.
    * ``perturbed`` (Berthet et al. 2020): the mean of the hard masks of x + t Z_m over
      ``num_samples`` draws of Gaussian or Gumbel noise Z, with the paper's
      score-function backward on the same draws (a Monte-Carlo estimate: the output is
      random, sums to k and is sparse-ish). Not differentiable in k.

    Every other mask operator of :data:`softtopk.registry.OPERATORS` is a method too,
    so that one name set selects an operator here, in the layers (``softtopk.nn``), the
    losses and the experiments (:func:`mask_methods`): ``"sparse-p4/3"`` (``"sparse"``
    with p = 4/3), ``"subset"`` (:func:`softtopk.relaxed_subset`, a sampler whose
    entries can exceed 1) and the relaxed permutations ``"neuralsort"``, ``"softsort"``,
    ``"odd_even"`` and ``"bitonic"`` (:func:`softtopk.permutation_topk_mask`, logistic
    comparators for the networks). They take ``temperature``, ``largest`` and, for the
    sampler, ``generator``.

    Args:
        x: scores of any shape with a floating dtype (float16, bfloat16, float32, float64).
            Entries equal to -inf are padding: they get 0 and no gradient, and a row with
            fewer than k entries above -inf gets 1 on each of them. A row containing NaN
            gives NaN in that row only.
        k: the budget, a real number in [0, n] (n = x.shape[dim]) or a tensor of per-row
            budgets with the batch shape of x (x.shape without dim; size 1 at dim is also
            accepted). A floating k tensor that requires grad receives dy/dk = g/sum(g),
            also on a row near the hard mask, where every g is tiny and g/sum(g) is not:
            the dense links take g from (x - tau)/t, not from y, whose 1 - y rounds,
            and every route solves tau from (entries above tau - k) + fractions, exact
            there, where sum(y) - k rounds to 0 all across the gap around tau.
        dim: the dimension to select along.
        method: ``"sparse"``, ``"entropic"``, ``"lapsum"``, ``"hard"``, ``"soft"``,
            ``"dftopk"``, ``"perturbed"``, or a registry mask name as above.
        temperature: t > 0, in the units of x. Smaller is closer to the hard mask.
        largest: select the k largest entries (True) or the k smallest (False: the mask of
            -x; +inf entries are then the padding).
        p: exponent of the sparse p-norm regulariser, in (1, 2]; only for ``"sparse"``.
            p = 2 is piecewise linear; p = 4/3 gives a C^1 mask.
        solver: ``"auto"`` (a selection of the few candidates for sparse links, else a
            safeguarded Newton iteration on whole rows; both exact), ``"newton"`` (always
            whole rows), or ``"sort"`` (the O(n log n) sort + closed form route of the
            papers; p = 2 and lapsum), kept for reproduction and cross-checks. For
            ``"sparse"`` with p = 2 also ``"pav"`` and ``"dykstra"``: Sander et al.'s own
            sort + isotonic regression routes (exact PAV; Dykstra certified, warning
            when it is not), see :mod:`softtopk.isotonic`.
        num_samples: ``"perturbed"`` only: number of noise draws M (default
            100, or the size of ``noise_samples``).
        noise: ``"perturbed"`` only: ``"gaussian"`` (default) or ``"gumbel"``.
        generator: ``"perturbed"`` and ``"subset"`` only: the ``torch.Generator`` the noise is drawn from
            (default: the global generator of x's device). The backward replays the
            same draws from the state saved at the call. Under ``torch.compile`` a call that draws
            its noise (no ``noise_samples``) runs eagerly (a graph break; an error with
            ``fullgraph=True``), as a compiled graph would not reproduce the generator's
            draws. Under ``torch.func.vmap`` pass ``randomness="different"``
            (independent draws for the vmapped entries) or ``"same"`` (one draw shared
            by them, equal to the unbatched call's); torch's default ``"error"`` raises.
        noise_samples: ``"perturbed"`` only: explicit standard noise draws of shape
            ``(num_samples, *x.shape)``, instead of a generator.

    Returns:
        Tensor with the shape and dtype of x.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([[-5.0, -2.0, 3.0, 1.0], [0.0, 0.0, -5.0, 5.0]])
        >>> softtopk.topk_mask(x, 2, temperature=0.01)
        tensor([[0.0000, 0.0000, 1.0000, 1.0000],
                [0.5000, 0.5000, 0.0000, 1.0000]])

    References:
        Sander et al. 2023 (sparse), Xie et al. 2020 (SOFT, entropic), Struski et al. 2025
        (LapSum), Zhu et al. 2025 (DFTopK), Berthet et al. 2020 (perturbed); see each
        method's module for the details.
    """
    largest = check_bool(largest, "largest")
    if type(method) is not str or method not in METHODS:  # the registry is read only for other names
        method = check_choice(method, "method", mask_methods())
    t = check_positive(temperature, "temperature")
    p = check_p(p)
    if method not in METHODS:
        return _registry_mask(
            x, k, dim, method, t, largest, p, solver, num_samples, noise, generator, noise_samples
        )
    spec = METHODS[method]
    if p != 2.0 and not spec.uses_p:
        raise ValueError(f"p applies to method='sparse' only, got p={p!r} with method={method!r}")
    solver = check_choice(solver, "solver", spec.solvers)
    if solver in ("sort", "pav", "dykstra") and method == "sparse" and p != 2.0:
        raise ValueError(f"solver={solver!r} needs p = 2 for method='sparse', got p={p!r}")
    given = {
        "num_samples": num_samples,
        "noise": noise,
        "generator": generator,
        "noise_samples": noise_samples,
    }
    if not spec.uses_noise and any(value is not None for value in given.values()):
        for name, value in given.items():
            if value is not None and name == "generator":
                raise ValueError(
                    f"generator applies to the stochastic methods only, got generator={value!r} "
                    f"with method={method!r}"
                )
            if value is not None:
                raise ValueError(
                    f"{name} applies to method='perturbed' only, got {name}={value!r} with method={method!r}"
                )
    if spec.uses_noise and noise_samples is None and torch.compiler.is_compiling():
        return _eager_topk_mask(
            x, k, dim, method=method, temperature=t, largest=largest, num_samples=num_samples,
            noise=noise, generator=generator,
        )  # fmt: skip
    rows = rowwise(x, k, dim, k_grad=spec.k_grad, k_dtype=spec.k_dtype)
    options: dict[str, object] = {"p": p} if spec.uses_p else {}
    if spec.uses_noise:
        options["pert"] = perturbation(
            x, rows.dim, rows.x.shape[0], **given, default_samples=PERTURBED_SAMPLES
        )
    if rows.x.numel() == 0:
        return empty_result(x, k)
    if method in ("sparse", "entropic", "lapsum") and rows.x.dtype == torch.float64 and may_sync(rows.x):
        # The threshold is solved on x / t in float64; beyond its range the result would
        # be wrong (the largest entries lost), so such rows are refused.
        a = rows.x.detach().abs()
        top = torch.where(torch.isfinite(a), a, 0.0).amax().item()
        if not math.isfinite(8.0 * top / t):
            raise ValueError(
                f"topk_mask(method={method!r}) needs 8 max |x| / temperature within the float64 range; "
                f"got max |x| = {top:g} with temperature={t:g} (rescale x and the temperature together)"
            )
    v = rows.x if largest else -rows.x
    return rows.restore(spec.rows(v, rows.k, temperature=t, solver=solver, **options))


def _registry_mask(
    x: Tensor,
    k: object,
    dim: object,
    method: str,
    t: float,
    largest: bool,
    p: float,
    solver: object,
    num_samples: object,
    noise: object,
    generator: object,
    noise_samples: object,
) -> Tensor:
    """``topk_mask`` for a registry mask operator outside :data:`METHODS`: runs its entry."""
    from ..registry import OPERATORS

    op = OPERATORS[method]
    if p != 2.0:
        raise ValueError(f"p applies to method='sparse' only, got p={p!r} with method={method!r}")
    check_choice(solver, "solver", ("auto",))
    for name, value in (("num_samples", num_samples), ("noise", noise), ("noise_samples", noise_samples)):
        if value is not None:
            raise ValueError(
                f"{name} applies to method='perturbed' only, got {name}={value!r} with method={method!r}"
            )
    if generator is not None and not op.stochastic:
        raise ValueError(
            f"generator applies to the stochastic methods only, got generator={generator!r} "
            f"with method={method!r}"
        )
    if not largest:
        x = -check_tensor(x)
    return op(x, k, dim, temperature=t, generator=generator)  # type: ignore[arg-type]


_eager_topk_mask = eager_only(
    topk_mask,
    "topk_mask(method='perturbed') draws its noise from a torch.Generator, whose draws a compiled "
    "graph would not reproduce (and its backward replays them): the call runs eagerly; pass "
    "noise_samples= to compile it",
)

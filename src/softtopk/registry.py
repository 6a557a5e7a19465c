"""The operator registry: every top-k operator of the library, with what it promises.

The conformance test suite, the benchmark and the experiments iterate over
:data:`OPERATORS`, so adding an operator means adding one entry here (plus the
operator's own oracle tests). An entry is called as ``op(x, k, dim, temperature=...)``
(``generator=...`` for the stochastic ones) and returns a tensor of the shape of x (a
``"mask"`` or ``"magnitude"`` operator) or of x's shape with the size n at ``dim``
replaced by the two sizes (k, n) (an ``"indicators"`` operator, for an int k).

Example:
    >>> import torch
    >>> from softtopk.registry import OPERATORS
    >>> op = OPERATORS["sparse"]
    >>> op(torch.tensor([3.0, 1.0, 2.0]), 2, temperature=0.01)
    tensor([1., 0., 1.])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from .ops import (
    permutation_topk_mask,
    relaxed_subset,
    soft_sinkhorn_mask,
    topk_indicators,
    topk_mag,
    topk_mask,
)


@dataclass(frozen=True)
class Operator:
    """A registered operator and its contract.

    Attributes:
        name: registry key.
        fn: ``fn(x, k, dim=-1, *, temperature) -> Tensor``; a stochastic operator's
            ``fn`` also takes ``generator`` (a ``torch.Generator`` or None for the global one).
        kind: ``"mask"`` (values in [0, 1]), ``"magnitude"`` (values of x, kept or shrunk)
            or ``"indicators"`` (a soft (k, n) assignment per row, row j a soft one-hot of
            the (j+1)-th largest entry; k an int; for it ``sums_to_k`` means that every
            row sums to 1, ``bounded`` that every column sums to at most 1, the limits are
            the one-hot rows of ``torch.topk`` and 1/n).
        paper: the publication the operator reproduces.
        sums_to_k: a mask whose rows sum to k exactly.
        sparse: the output has exact zeros away from the top entries.
        k_grad: differentiable in a floating k tensor.
        exact_double_backward: the backward is itself differentiable.
        compiles: runs under ``torch.compile(fullgraph=True)`` as the entry is called.
        vmaps: runs under ``torch.func.vmap`` with its default ``randomness="error"``
            (stochastic operators need ``"same"`` or ``"different"``).
        temperature: a default that suits standard-normal scores.
        bench_max_elements: the benchmark skips larger inputs (for O(n^2) methods), and
            says so in its table.
        max_kn: for an operator with O(k n) memory per row, the largest rows x k x n that
            the benchmark and the experiments call it with (they skip larger calls and say so).
        stochastic: the output depends on random noise drawn from ``generator`` (the
            global generator by default), so two calls differ. :meth:`seeded` gives a
            reproducible view for tests and benchmarks; the conformance suite skips the
            properties that only hold in distribution (permutation equivariance,
            batch == loop, -inf padding, the uniform limit) and the operator's own tests
            check them statistically.
        equivariant: permuting the entries of x permutes the output the same way (False
            for sorting networks, whose soft comparisons depend on the wire order).
        bounded: mask entries lie in [0, 1] (sums of rows of a soft permutation, and
            relaxed subset samples, can exceed 1).
        exact_padding: -inf entries get 0 and no gradient, and the other entries equal
            the result on the row without them.
        hard_limit: t -> 0 gives the torch.topk mask of x when x_(k) > x_(k+1).
        uniform_limit: t -> inf gives k/n everywhere.
        exact_gradient: the backward is the derivative of the forward (False for a
            Monte-Carlo estimate of the derivative of the expected output).
        route_of: the registry entry whose operator this one computes by another route
            (the same mathematical operator, e.g. the published algorithm or a sort +
            isotonic regression solver). The conformance suite runs it like any entry;
            the experiments and the benchmark's operator list skip it, as it would
            repeat that entry's results.
        note: what the entry fixes beyond ``fn(x, k, dim, *, temperature)``.
    """

    name: str
    fn: Callable[..., Tensor]
    kind: str = "mask"
    paper: str = ""
    sums_to_k: bool = True
    sparse: bool = False
    k_grad: bool = True
    exact_double_backward: bool = False
    compiles: bool = True
    vmaps: bool = True
    temperature: float = 0.1
    bench_max_elements: int | None = None
    max_kn: int | None = None
    stochastic: bool = False
    equivariant: bool = True
    bounded: bool = True
    exact_padding: bool = True
    hard_limit: bool = True
    uniform_limit: bool = True
    exact_gradient: bool = True
    route_of: str = ""
    note: str = ""

    def __call__(
        self,
        x: Tensor,
        k: float | Tensor,
        dim: int = -1,
        *,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Runs the operator; ``temperature=None`` takes the entry's default.

        ``generator`` feeds a stochastic operator and is ignored by the others, so a
        layer can pass its generator whatever operator it was given.
        """
        t = self.temperature if temperature is None else temperature
        if self.stochastic:
            return self.fn(x, k, dim=dim, temperature=t, generator=generator)
        return self.fn(x, k, dim=dim, temperature=t)

    def seeded(self, seed: int = 0) -> Operator:
        """This operator with every call drawn from a fresh generator seeded with ``seed``.

        For tests and benchmarks, which need the same draws on every call. Training
        code passes a ``generator`` (or none) instead: a seeded view gives every call
        the same noise.
        """
        if not self.stochastic:
            return self
        fn = self.fn

        def seeded_fn(x: Tensor, k: float | Tensor, dim: int = -1, *, temperature: float, generator=None):
            # Meta tensors hold no values (and have no generator): their draws need none.
            gen = None if x.device.type == "meta" else torch.Generator(device=x.device).manual_seed(seed)
            return fn(x, k, dim=dim, temperature=temperature, generator=gen)

        return replace(self, fn=seeded_fn)


# rows x k x n of the calls the benchmark and the experiments make to an O(k n)-memory
# operator: 2^27 elements are 1 GiB of float64 for one (rows, k, n) tensor, and autograd keeps several.
KN_LIMIT = 1 << 27

OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in [
        Operator(
            "sparse",
            partial(topk_mask, method="sparse"),
            paper="Sander et al. 2023",
            sparse=True,
            exact_double_backward=True,
        ),
        Operator(
            "sparse-p4/3",
            partial(topk_mask, method="sparse", p=4.0 / 3.0),
            paper="Sander et al. 2023",
            sparse=True,
        ),
        Operator("entropic", partial(topk_mask, method="entropic"), paper="Xie et al. 2020 (SOFT)"),
        Operator("lapsum", partial(topk_mask, method="lapsum"), paper="Struski et al. 2025"),
        Operator(
            "hard",
            partial(topk_mask, method="hard"),
            paper="torch.topk",
            sparse=True,
            k_grad=False,
            exact_double_backward=True,
        ),
        Operator(
            "soft",
            partial(topk_mask, method="soft"),
            paper="Xie et al. 2020 (SOFT, two anchors, temperature = epsilon)",
            exact_gradient=False,
            note="the cost normaliser C_max is a constant in the backward, as published",
        ),
        Operator(
            "dftopk",
            partial(topk_mask, method="dftopk"),
            paper="Zhu et al. 2025 (DFTopK)",
            sums_to_k=False,
            k_grad=False,
            uniform_limit=False,
            note="sum(y) != k by design; t -> inf gives 1/2, not k/n",
        ),
        Operator(
            "perturbed",
            partial(topk_mask, method="perturbed", num_samples=100),
            paper="Berthet et al. 2020 (perturbed optimizers)",
            k_grad=False,
            compiles=False,
            vmaps=False,
            stochastic=True,
            uniform_limit=False,
            exact_gradient=False,
            note=(
                "100 Gaussian samples; score-function backward; vmap with randomness='same' or "
                "'different'; torch.compile traces it with noise_samples= (generator draws run eagerly)"
            ),
        ),
        Operator(
            "subset",
            relaxed_subset,
            paper="Xie and Ermon 2019 (Gumbel top-k relaxed subset sampling)",
            compiles=False,
            vmaps=False,
            stochastic=True,
            bounded=False,
            hard_limit=False,
            bench_max_elements=700_000,
            max_kn=KN_LIMIT,
            note=(
                "a sampler: t -> 0 gives the top k of x + Gumbel noise; O(k n) memory; vmap with "
                "randomness='same' or 'different'; torch.compile traces it with gumbel= (generator "
                "draws run eagerly)"
            ),
        ),
        Operator(
            "neuralsort",
            partial(permutation_topk_mask, method="neuralsort"),
            paper="Grover et al. 2019 (NeuralSort)",
            bounded=False,
            bench_max_elements=700_000,
            max_kn=KN_LIMIT,
            note="O(n log n + n k) time and memory (k rows of the n x n relaxation, float64 logits)",
        ),
        Operator(
            "softsort",
            partial(permutation_topk_mask, method="softsort"),
            paper="Prillo and Akinola 2020 (SoftSort)",
            bounded=False,
            bench_max_elements=700_000,
            max_kn=KN_LIMIT,
            note="O(n log k + n k) time and memory",
        ),
        Operator(
            "odd_even",
            partial(permutation_topk_mask, method="odd_even", distribution="logistic"),
            paper="Petersen et al. 2021 (odd-even sorting network)",
            equivariant=False,
            exact_padding=False,
            uniform_limit=False,
            bench_max_elements=64_000,
            note=(
                "logistic comparators; n layers: O(n^2) time and memory; torch.compile takes "
                "minutes (one graph node per comparator layer)"
            ),
        ),
        Operator(
            "bitonic",
            partial(permutation_topk_mask, method="bitonic", distribution="logistic"),
            paper="Petersen et al. 2021 (bitonic sorting network)",
            equivariant=False,
            exact_padding=False,
            uniform_limit=False,
            bench_max_elements=700_000,
            note=(
                "logistic comparators; log2(n)^2/2 layers: O(n log^2 n) time and memory; "
                "torch.compile takes minutes (one graph node per comparator layer)"
            ),
        ),
        Operator(
            "magnitude",
            partial(topk_mag),
            kind="magnitude",
            paper="Sander et al. 2023",
            sums_to_k=False,
            sparse=True,
            k_grad=False,
        ),
        Operator(
            "magnitude-p4/3",
            partial(topk_mag, p=4.0 / 3.0),
            kind="magnitude",
            paper="Sander et al. 2023",
            sums_to_k=False,
            sparse=True,
            k_grad=False,
        ),
        Operator(
            "sparse-pav",
            partial(topk_mask, method="sparse", solver="pav"),
            paper="Sander et al. 2023 (sort + isotonic regression, PAV)",
            sparse=True,
            exact_double_backward=True,
            route_of="sparse",
            note="the permutahedron route: sort, exact PAV in float64, the block Jacobian backward",
        ),
        Operator(
            "sparse-dykstra",
            partial(topk_mask, method="sparse", solver="dykstra"),
            paper="Sander et al. 2023 (sort + isotonic regression, Dykstra)",
            sparse=True,
            exact_double_backward=True,
            route_of="sparse",
            note="the permutahedron route with Dykstra's certified projections (warns if uncertified)",
        ),
        Operator(
            "soft-sinkhorn",
            soft_sinkhorn_mask,
            paper="Xie et al. 2020 (SOFT as published: 200 Sinkhorn iterations)",
            k_grad=False,
            bounded=False,
            hard_limit=False,
            exact_gradient=False,
            route_of="soft",
            bench_max_elements=700_000,
            note=(
                "200 log-domain Sinkhorn iterations from zero potentials, as the reference: "
                "not converged at small temperatures (no hard limit at t = 1e-4; entries can "
                "exceed 1, as the rows of the plan are not yet feasible); the implicit "
                "backward assumes a converged plan and a constant C_max; k takes no gradient "
                "(the reference's k is fixed)"
            ),
        ),
        Operator(
            "indicators",
            partial(topk_indicators, method="soft"),
            kind="indicators",
            paper="Xie et al. 2020 (sorted SOFT: k + 1 anchors)",
            k_grad=False,
            exact_gradient=False,
            bench_max_elements=700_000,
            max_kn=KN_LIMIT,
            note=(
                "topk_indicators: a (k, n) soft assignment per row, k an int; Sinkhorn to "
                "convergence (tol) with the implicit backward, C_max a constant in it, as published"
            ),
        ),
    ]
}


def get(name: str) -> Operator:
    """Returns the registered operator ``name`` (a ValueError lists the known names)."""
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; known: {', '.join(OPERATORS)}")
    return OPERATORS[name]


def resolve(method: object, *, name: str = "method", kinds: tuple[str, ...] = ("mask",)) -> Operator:
    """The operator a layer or loss should call: a registry name or a callable.

    Layers and losses take ``method`` as a registry name, so that comparing operators
    means changing one string; a callable ``fn(x, k, dim=-1, *, temperature)`` is
    accepted too (for an operator outside the registry) and is wrapped with no promises.

    Args:
        method: a key of :data:`OPERATORS` or a callable.
        name: the argument name used in error messages.
        kinds: the operator kinds the caller accepts (``"mask"``, ``"magnitude"``).

    Example:
        >>> resolve("sparse").name
        'sparse'
        >>> resolve("magnitude")
        Traceback (most recent call last):
        ...
        ValueError: method='magnitude' is a magnitude operator; this needs one of: mask
    """
    if isinstance(method, str):
        if method not in OPERATORS:
            raise ValueError(f"unknown {name} {method!r}; known: {', '.join(OPERATORS)}")
        op = OPERATORS[method]
        if op.kind not in kinds:
            raise ValueError(
                f"{name}={method!r} is a {op.kind} operator; this needs one of: {', '.join(kinds)}"
            )
        return op
    if callable(method):
        return Operator(
            getattr(method, "__name__", "custom"),
            method,
            kind=kinds[0],
            paper="user-supplied",
            sums_to_k=False,
            k_grad=False,
            compiles=False,
            vmaps=False,
        )
    raise TypeError(f"{name} must be a registry name or a callable, got {type(method).__name__} {method!r}")

"""The operator registry: every top-k operator of the library, with what it promises.

The conformance test suite, the benchmark and the experiments iterate over
:data:`OPERATORS`, so adding an operator means adding one entry here (plus the
operator's own oracle tests). Each entry's ``fn(x, k, *, dim, temperature)`` returns a
tensor of the shape of x.

Example:
    >>> import torch
    >>> from softtopk.registry import OPERATORS
    >>> op = OPERATORS["sparse"]
    >>> op.fn(torch.tensor([3.0, 1.0, 2.0]), 2, dim=-1, temperature=0.01)
    tensor([1., 0., 1.])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor

from .ops import topk_mag, topk_mask


@dataclass(frozen=True)
class Operator:
    """A registered operator and its contract.

    Attributes:
        name: registry key.
        fn: ``fn(x, k, *, dim, temperature) -> Tensor``.
        kind: ``"mask"`` (values in [0, 1]) or ``"magnitude"`` (values of x, kept or shrunk).
        paper: the publication the operator reproduces.
        sums_to_k: a mask whose rows sum to k exactly.
        sparse: the output has exact zeros away from the top entries.
        k_grad: differentiable in a floating k tensor.
        exact_double_backward: the backward is itself differentiable.
        compiles: runs under ``torch.compile(fullgraph=True)``.
        vmaps: runs under ``torch.func.vmap``.
        temperature: a default that suits standard-normal scores.
        bench_max_elements: the benchmark skips larger inputs (for O(n^2) methods), and
            says so in its table.
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
    means changing one string; a callable ``fn(x, k, *, dim, temperature)`` is accepted
    too (for an operator outside the registry) and is wrapped with no promises.

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

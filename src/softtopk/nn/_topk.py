"""Modules for the top-k operators: configuration only, the maths is in the functions."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_generator, check_int, check_p, check_positive
from ..ops import topk_mag, topk_mask
from ..ops._mask import METHODS, mask_methods


def check_budget(k: object) -> float | Tensor:
    """Checks a module's budget: a non-negative number or a real tensor (checked at the call)."""
    if isinstance(k, Tensor):
        if k.dtype == torch.bool or k.is_complex():
            raise TypeError(f"k must be a real number or a real tensor, got a tensor of {k.dtype}")
        return k
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a real number or a tensor, got {type(k).__name__} {k!r}")
    if not float(k) >= 0:
        raise ValueError(f"k must be a non-negative number, got {k!r}")
    return k


class TopKMask(nn.Module):
    """Module form of :func:`softtopk.topk_mask`.

    Args:
        k: the budget (a number, or a tensor of per-row budgets); ``forward`` may
            override it.
        dim, method, temperature, largest, p, solver, generator: as in
            :func:`softtopk.topk_mask` (``method``: any of its names).

    Example:
        >>> import torch, softtopk
        >>> layer = softtopk.nn.TopKMask(2, temperature=0.01)
        >>> layer(torch.tensor([-5.0, -2.0, 3.0, 1.0]))
        tensor([0., 0., 1., 1.])
    """

    def __init__(
        self,
        k: float | Tensor,
        dim: int = -1,
        *,
        method: str = "sparse",
        temperature: float = 0.1,
        largest: bool = True,
        p: float = 2.0,
        solver: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.k, self.dim = check_budget(k), check_int(dim, "dim")
        self.method = check_choice(method, "method", mask_methods())
        self.temperature = check_positive(temperature, "temperature")
        self.largest = check_bool(largest, "largest")
        self.p = check_p(p)
        if self.p != 2.0 and method != "sparse":
            raise ValueError(f"p applies to method='sparse' only, got p={p!r} with method={method!r}")
        self.solver = check_choice(
            solver, "solver", METHODS[method].solvers if method in METHODS else ("auto",)
        )
        self.generator = check_generator(generator)

    def forward(self, x: Tensor, k: float | Tensor | None = None) -> Tensor:
        return topk_mask(
            x,
            self.k if k is None else k,
            self.dim,
            method=self.method,
            temperature=self.temperature,
            largest=self.largest,
            p=self.p,
            solver=self.solver,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, dim={self.dim}, method={self.method!r}, temperature={self.temperature}, "
            f"largest={self.largest}, p={self.p}, solver={self.solver!r}"
        )


class TopKMag(nn.Module):
    """Module form of :func:`softtopk.topk_mag`.

    Args:
        k: number of entries kept; ``forward`` may override it.
        dim, temperature, p, debias: as in :func:`softtopk.topk_mag`.

    Example:
        >>> import torch, softtopk
        >>> softtopk.nn.TopKMag(2, temperature=0.01)(torch.tensor([-5.0, -2.0, 3.0, 1.0]))
        tensor([-5.,  0.,  3.,  0.])
    """

    def __init__(
        self,
        k: int | Tensor,
        dim: int = -1,
        *,
        temperature: float = 0.1,
        p: float = 2.0,
        debias: bool = True,
    ) -> None:
        super().__init__()
        self.k = k if isinstance(k, Tensor) else check_int(k, "k")
        if isinstance(self.k, int) and self.k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        self.dim = check_int(dim, "dim")
        self.temperature = check_positive(temperature, "temperature")
        self.p = check_p(p)
        if abs(self.p - 2.0) > 1e-12 and abs(self.p - 4.0 / 3.0) > 1e-12:
            raise ValueError(f"topk_mag implements p = 2 and p = 4/3, got p={p!r}")
        self.debias = check_bool(debias, "debias")

    def forward(self, x: Tensor, k: int | Tensor | None = None) -> Tensor:
        return topk_mag(
            x,
            self.k if k is None else k,
            self.dim,
            temperature=self.temperature,
            p=self.p,
            debias=self.debias,
        )

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}, temperature={self.temperature}, p={self.p}, debias={self.debias}"

"""Modules for the top-k operators: configuration only, the maths is in the functions."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import topk_mag, topk_mask


class TopKMask(nn.Module):
    """Module form of :func:`softtopk.topk_mask`.

    Args:
        k: the budget (a number, or a tensor of per-row budgets); ``forward`` may
            override it.
        dim, method, temperature, p, solver: as in :func:`softtopk.topk_mask`.

    Example:
        >>> import torch, softtopk
        >>> layer = softtopk.nn.TopKMask(2, temperature=0.01)
        >>> layer(torch.tensor([-5.0, -2.0, 3.0, 1.0]))
        tensor([0., 0., 1., 1.])
    """

    def __init__(
        self,
        k: float | Tensor,
        *,
        dim: int = -1,
        method: str = "sparse",
        temperature: float = 0.1,
        p: float = 2.0,
        solver: str = "auto",
    ) -> None:
        super().__init__()
        self.k, self.dim, self.method = k, dim, method
        self.temperature, self.p, self.solver = temperature, p, solver

    def forward(self, x: Tensor, k: float | Tensor | None = None) -> Tensor:
        return topk_mask(
            x,
            self.k if k is None else k,
            dim=self.dim,
            method=self.method,
            temperature=self.temperature,
            p=self.p,
            solver=self.solver,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, dim={self.dim}, method={self.method!r}, "
            f"temperature={self.temperature}, p={self.p}, solver={self.solver!r}"
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
        *,
        dim: int = -1,
        temperature: float = 0.1,
        p: float = 2.0,
        debias: bool = True,
    ) -> None:
        super().__init__()
        self.k, self.dim, self.temperature, self.p, self.debias = k, dim, temperature, p, debias

    def forward(self, x: Tensor, k: int | Tensor | None = None) -> Tensor:
        return topk_mag(
            x,
            self.k if k is None else k,
            dim=self.dim,
            temperature=self.temperature,
            p=self.p,
            debias=self.debias,
        )

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}, temperature={self.temperature}, p={self.p}, debias={self.debias}"

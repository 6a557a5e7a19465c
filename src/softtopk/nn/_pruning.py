"""Magnitude pruning trained through the sparse soft top-k in magnitude (Sander et al. 2023).

A weight W is re-parametrised as W_eff = topk_mag(W, k) (torch.nn.utils.parametrize):
the forward keeps the k largest |W| with a smooth transition band, and the gradient
reaches every weight in the band, so weights can enter and leave the kept set during
training. The budget follows a sparsity schedule; at the end :meth:`MagnitudePruner.export`
writes the exactly sparse weights (hard top-k magnitude of the trained W, exactly k
non-zeros per layer or per slice) and removes the parametrisation.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._checks import check_generator, check_int, check_positive, check_temperature, check_tensor
from ..registry import resolve


def polynomial_sparsity(
    step: int, final: float, *, initial: float = 0.0, begin: int = 0, end: int = 1000, power: float = 3.0
) -> float:
    r"""Gradual pruning schedule (Zhu and Gupta 2017): sparsity at a training step.

    .. math::

        s_t = s_f + (s_i - s_f)\Big(1 - \frac{t - t_0}{t_1 - t_0}\Big)^{\text{power}}
        \quad\text{for } t_0 \le t \le t_1

    s_i before ``begin``, s_f after ``end``. power = 3 prunes fast early and slowly late.

    Example:
        >>> from softtopk.nn import polynomial_sparsity
        >>> [round(polynomial_sparsity(t, 0.9, end=100), 3) for t in (0, 50, 100, 200)]
        [0.0, 0.787, 0.9, 0.9]
    """
    for name, value in (("final", final), ("initial", initial)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} sparsity must be in [0, 1), got {value!r}")
    if end <= begin:
        raise ValueError(f"end must be after begin, got begin={begin}, end={end}")
    if step <= begin:
        return float(initial)
    if step >= end:
        return float(final)
    frac = (step - begin) / (end - begin)
    return float(final + (initial - final) * (1.0 - frac) ** power)


def kept_count(size: int, sparsity: float) -> int:
    """Entries kept at a sparsity: size - round(sparsity * size)."""
    return size - round(sparsity * size)


def magnitude_prune(
    weight: Tensor,
    sparsity: float,
    *,
    dim: int | None = None,
    method: str | Callable[..., Tensor] = "magnitude",
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The pruned weight: a soft top-k in magnitude at the given sparsity.

    .. math::

        W_{\mathrm{eff}} = \operatorname{topkmag}_l(W, k),\qquad k = n - \operatorname{round}(s\,n)

    over the whole tensor (``dim=None``, n = W.numel()) or each slice along ``dim``
    (n = W.shape[dim]). A mask operator of the registry (``method="sparse"``, ...) gives
    ``W * mask(|W|, k)`` instead.

    Args:
        weight: the weight, any shape.
        sparsity: fraction of zeros in [0, 1).
        dim: None (one budget for the tensor) or the dimension of the slices.
        method: ``"magnitude"`` (:func:`softtopk.topk_mag`, the default) or a mask operator.
        temperature: the operator's temperature; None uses the registry default.
        generator: the ``torch.Generator`` a stochastic method (``"perturbed"``, ``"subset"``)
            draws its noise from; None uses the global generator. Ignored by the other methods.

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import magnitude_prune
        >>> magnitude_prune(torch.tensor([[0.1, -2.0], [3.0, 0.2]]), 0.5, temperature=0.01)
        tensor([[ 0., -2.],
                [ 3.,  0.]])
    """
    weight = check_tensor(weight, "weight")
    op = resolve(method, kinds=("magnitude", "mask"))
    t = op.temperature if temperature is None else check_positive(temperature, "temperature")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    rows = weight.reshape(1, -1) if dim is None else weight
    d = -1 if dim is None else dim
    k = kept_count(rows.shape[d], float(sparsity))
    if op.kind == "magnitude":
        out = op(rows, k, d, temperature=t, generator=generator)
    else:
        out = rows * op(rows.abs(), k, d, temperature=t, generator=generator)
    return out.reshape(weight.shape)


def hard_magnitude_prune(weight: Tensor, sparsity: float, *, dim: int | None = None) -> Tensor:
    """Exactly sparse weight: the k largest ``|W|`` kept unchanged, the rest set to 0 (ties by torch.topk).

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import hard_magnitude_prune
        >>> hard_magnitude_prune(torch.tensor([0.1, -2.0, 3.0, 0.2]), 0.5)
        tensor([ 0., -2.,  3.,  0.])
    """
    weight = check_tensor(weight, "weight")
    rows = weight.reshape(1, -1) if dim is None else weight.movedim(dim, -1)
    k = kept_count(rows.shape[-1], float(sparsity))
    idx = torch.topk(rows.abs(), k, dim=-1).indices
    mask = torch.zeros_like(rows, dtype=torch.bool).scatter(-1, idx, True)
    out = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return out.reshape(weight.shape) if dim is None else out.movedim(-1, dim)


class MagnitudePruning(nn.Module):
    """Parametrisation W -> :func:`magnitude_prune` (W) for ``torch.nn.utils.parametrize``.

    The current sparsity is part of the state dict (extra state), so a checkpoint
    resumes the schedule where it stopped.

    Args:
        sparsity: the current sparsity in [0, 1) (the pruner's schedule updates it).
        dim, method, temperature, generator: as in :func:`magnitude_prune`.

    Example:
        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> from softtopk.nn import MagnitudePruning
        >>> layer = torch.nn.Linear(10, 10)
        >>> parametrize.register_parametrization(layer, "weight", MagnitudePruning(0.9))  # doctest: +ELLIPSIS
        ParametrizedLinear(...)
        >>> int((layer.weight != 0).sum()) <= 20
        True
    """

    def __init__(
        self,
        sparsity: float = 0.0,
        *,
        dim: int | None = None,
        method: str | Callable[..., Tensor] = "magnitude",
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        resolve(method, kinds=("magnitude", "mask"))
        if dim is not None:
            check_int(dim, "dim")
        check_temperature(temperature)
        check_generator(generator)
        self.dim, self.method, self.temperature, self.generator = dim, method, temperature, generator
        self.sparsity = sparsity

    @property
    def sparsity(self) -> float:
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {value!r}")
        self._sparsity = float(value)

    def forward(self, weight: Tensor) -> Tensor:
        if self._sparsity == 0.0:
            return weight
        return magnitude_prune(
            weight,
            self._sparsity,
            dim=self.dim,
            method=self.method,
            temperature=self.temperature,
            generator=self.generator,
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {"sparsity": self._sparsity}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.sparsity = state["sparsity"]

    def extra_repr(self) -> str:
        return (
            f"sparsity={self._sparsity}, dim={self.dim}, method={self.method!r}, "
            f"temperature={self.temperature}"
        )


class MagnitudePruner:
    """Trains chosen weights through :class:`MagnitudePruning` on a sparsity schedule, then exports them.

    Args:
        model: the model whose weights are pruned.
        sparsity: the final sparsity, one number for every target or a dict
            ``{parameter name: sparsity}`` (e.g. ``{"0.weight": 0.9, "2.weight": 0.5}``).
        targets: parameter names to prune; default: the keys of ``sparsity`` if it is a
            dict, else the ``weight`` of every Linear and Conv layer.
        begin, end, initial, power: the schedule (:func:`polynomial_sparsity`) in calls
            of :meth:`step`; ``end=0`` applies the final sparsity at once.
        dim, method, temperature, generator: as in :func:`magnitude_prune`.

    Example:
        >>> import torch
        >>> from softtopk.nn import MagnitudePruner
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2))
        >>> pruner = MagnitudePruner(model, 0.9, end=10)
        >>> for _ in range(10):
        ...     pruner.step()  # after each optimiser step
        >>> pruner.export()
        {'0.weight': 0.9, '2.weight': 0.9}
        >>> int((model[0].weight != 0).sum())
        40
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | dict[str, float],
        *,
        targets: Iterable[str] | None = None,
        begin: int = 0,
        end: int = 0,
        initial: float = 0.0,
        power: float = 3.0,
        dim: int | None = None,
        method: str | Callable[..., Tensor] = "magnitude",
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if targets is None:
            if isinstance(sparsity, dict):
                targets = list(sparsity)
            else:
                targets = [
                    f"{name}.weight" if name else "weight"
                    for name, module in model.named_modules()
                    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
                ]
        self.targets = list(targets)
        params = dict(model.named_parameters())
        for name in self.targets:
            if name not in params:
                raise ValueError(f"targets: model has no parameter {name!r}")
        if isinstance(sparsity, dict):
            missing = set(self.targets) - set(sparsity)
            if missing:
                raise ValueError(f"sparsity has no entry for {sorted(missing)}")
            self.final = {name: float(sparsity[name]) for name in self.targets}
        else:
            self.final = dict.fromkeys(self.targets, float(sparsity))
        for s in self.final.values():
            polynomial_sparsity(0, s, initial=initial, begin=0, end=1)  # validates s
        if end < begin:
            raise ValueError(f"end must not be before begin, got begin={begin}, end={end}")
        self.model, self.begin, self.end, self.initial, self.power = model, begin, end, initial, power
        self.step_count = 0
        self.parametrizations: dict[str, MagnitudePruning] = {}
        for name in self.targets:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            pruning = MagnitudePruning(
                self._scheduled(name), dim=dim, method=method, temperature=temperature, generator=generator
            )
            parametrize.register_parametrization(module, attr, pruning)
            self.parametrizations[name] = pruning

    def _scheduled(self, name: str) -> float:
        if self.end <= self.begin:
            return self.final[name] if self.step_count >= self.begin else self.initial
        return polynomial_sparsity(
            self.step_count,
            self.final[name],
            initial=self.initial,
            begin=self.begin,
            end=self.end,
            power=self.power,
        )

    def step(self) -> None:
        """Advances the schedule by one step and updates every layer's sparsity."""
        self.step_count += 1
        for name, pruning in self.parametrizations.items():
            pruning.sparsity = self._scheduled(name)

    @property
    def sparsity(self) -> dict[str, float]:
        """The current scheduled sparsity of each target."""
        return {name: p.sparsity for name, p in self.parametrizations.items()}

    @torch.no_grad()
    def export(self) -> dict[str, float]:
        """Removes the parametrisations and writes the exactly sparse weights.

        Each target becomes the hard top-k magnitude of its trained weight at its final
        sparsity: exactly k = n - round(s n) entries are kept (per tensor, or per slice
        with ``dim``), unchanged, the others are 0. Returns the realised sparsity
        (fraction of zeros) of each target; it equals the requested one unless a kept
        weight is itself exactly 0.
        """
        realised = {}
        for name, pruning in self.parametrizations.items():
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            original = module.parametrizations[attr].original
            sparse = hard_magnitude_prune(original, self.final[name], dim=pruning.dim)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            getattr(module, attr).copy_(sparse)
            realised[name] = float((sparse == 0).sum()) / sparse.numel()
        self.parametrizations = {}
        return {name: round(value, 12) for name, value in realised.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        for name, pruning in self.parametrizations.items():
            pruning.sparsity = self._scheduled(name)

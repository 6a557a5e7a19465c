r"""The perturbation engine: Monte-Carlo means of a hard top-k over noisy copies of the input.

Every perturbed operator of the library (the perturbed mask and sorted indicators of
Berthet et al. 2020, the smoothed k-th value of Garcin et al. 2022 and the perturbed
Fenchel-Young loss) is one call of :func:`perturbed`: a *selection* maps each perturbed
row u_m = x + t Z_m to the slots it picks and their weights, and one autograd Function
returns the two Monte-Carlo means

.. math::

    y = \frac1M \sum_{m=1}^M y^*(u_m),\qquad
    F = \frac1M \sum_{m=1}^M \big(\langle y^*(u_m), u_m\rangle - \langle c, x\rangle\big),

with the two gradients of the paper: the score-function estimator for y
(:math:`J^\top v = \frac{1}{tM}\sum_m \langle y^*(u_m), v\rangle\, s(Z_m)`, with
s(z) = -d log p(z)/dz the score of the noise) and the pathwise one for F
(:math:`\nabla_x F = y - c`). The noise is a :class:`Noise` object (:data:`GAUSSIAN`,
:data:`GUMBEL`, or any subclass); it comes from an explicit ``torch.Generator`` (or is
given as a tensor), is drawn in chunks so that at most about :data:`CHUNK_ELEMENTS`
perturbed values exist at a time, and is drawn again from the saved generator state in
the backward pass, so the backward reuses exactly the forward's samples without storing
them: memory is O(M k) per row plus one chunk, not O(M n). Means divide each sample by
M before summing, so a mean of finite values is finite.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._checks import check_choice, check_tensor, may_sync, refuse_forward_mode
from .._checks import check_generator as check_generator_type
from .._rows import apply_rules, classify, regular_rows

#: Perturbed values held at once (num_samples is processed in chunks of this size).
CHUNK_ELEMENTS = 1 << 23


# ------------------------------------------------------------------------------ noise


class Noise:
    """A standard noise distribution with density p(z) = exp(-nu(z)) / C, entry by entry.

    Subclasses define :meth:`sample`, :meth:`log_prob` and :meth:`score`; the engine
    needs only ``sample`` and ``score``.
    """

    name = "noise"

    def sample(
        self, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: Any
    ) -> Tensor:
        """Independent draws of the given shape from ``generator``."""
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z), entry by entry."""
        raise NotImplementedError

    def score(self, z: Tensor) -> Tensor:
        """The score -d log p(z) / dz = nu'(z), entry by entry."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Gaussian(Noise):
    r"""Standard normal noise: log p(z) = -z^2/2 - log(2 pi)/2, score s(z) = z.

    Example:
        >>> from softtopk.ops._perturbation import GAUSSIAN
        >>> GAUSSIAN.score(torch.tensor([0.5, -2.0]))
        tensor([ 0.5000, -2.0000])
    """

    name = "gaussian"

    def sample(self, shape, generator, dtype, device):  # noqa: ANN001, ANN201
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * z * z - 0.5 * math.log(2.0 * math.pi)

    def score(self, z: Tensor) -> Tensor:
        return z


class Gumbel(Noise):
    r"""Standard Gumbel noise -log(-log U): log p(z) = -z - e^{-z}, score s(z) = 1 - e^{-z}.

    Example:
        >>> from softtopk.ops._perturbation import GUMBEL
        >>> GUMBEL.score(torch.tensor([0.0]))
        tensor([0.])
    """

    name = "gumbel"

    def sample(self, shape, generator, dtype, device):  # noqa: ANN001, ANN201
        u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
        return -torch.log(-torch.log(u.clamp(min=torch.finfo(dtype).tiny)))

    def log_prob(self, z: Tensor) -> Tensor:
        return -z - torch.exp(-z)

    def score(self, z: Tensor) -> Tensor:
        return 1.0 - torch.exp(-z)


GAUSSIAN = Gaussian()
GUMBEL = Gumbel()
#: The noises known by name.
NOISES: dict[str, Noise] = {"gaussian": GAUSSIAN, "gumbel": GUMBEL}


def default_generator(device: torch.device) -> torch.Generator | None:
    """The global generator of ``device`` (what ``torch.randn`` draws from); None on meta."""
    if device.type == "meta":
        return None  # meta tensors hold no values: their draws need no generator
    if device.type == "cpu":
        return torch.default_generator
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def check_generator(generator: object, device: torch.device) -> torch.Generator | None:
    """A ``torch.Generator`` on the device type of ``device`` (None: that device's global one)."""
    if check_generator_type(generator) is None:
        return default_generator(device)
    if torch.device(generator.device).type != device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {device}")
    return generator


def check_noise(noise: object) -> Noise:
    """A :class:`Noise`: None (Gaussian), a name of :data:`NOISES` or a Noise object."""
    if noise is None:
        return GAUSSIAN
    if isinstance(noise, Noise):
        return noise
    return NOISES[check_choice(noise, "noise", tuple(NOISES))]


# ------------------------------------------------------------------- the source of noise


@dataclass
class Perturbation:
    """Where the noise of one call comes from, for rows (B, n).

    Either ``samples`` (M, B, n) given by the user, or a generator: the forward draws
    from it (advancing it, as any draw would) and the backward replays the same draws
    from the state saved before them.
    """

    num_samples: int
    noise: Noise
    device: torch.device
    generator: torch.Generator | None = None
    state: Tensor | None = None
    samples: Tensor | None = None

    def chunks(self, B: int, n: int, dtype: torch.dtype, replay: bool = False) -> Iterator[Tensor]:
        """Yields the noise in chunks (m, B, n); ``replay`` yields the forward's chunks again."""
        M = self.num_samples
        step = max(1, min(M, CHUNK_ELEMENTS // max(1, B * n)))
        if self.samples is not None:
            for start in range(0, M, step):
                yield self.samples[start : start + step].to(dtype)
            return
        gen = self.generator
        if replay and self.state is not None:
            gen = torch.Generator(device=self.device)
            gen.set_state(self.state)  # type: ignore[arg-type]
        for start in range(0, M, step):
            yield self.noise.sample((min(step, M - start), B, n), gen, dtype, self.device)  # type: ignore[arg-type]


def check_num_samples(num_samples: object) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(
            f"num_samples must be a positive int, got {type(num_samples).__name__} {num_samples!r}"
        )
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return int(num_samples)


def perturbation(
    x: Tensor,
    dim: int,
    rows: int,
    *,
    num_samples: object,
    noise: object,
    generator: object,
    noise_samples: object,
    default_samples: int,
) -> Perturbation:
    """Validates the noise arguments of a public operator and returns its Perturbation.

    Args:
        x: the input (any shape).
        dim: its (non-negative) selection dimension.
        rows: number of rows B of x seen as rows (dim last, the rest flattened).
        num_samples: None (use ``default_samples`` or the first size of
            ``noise_samples``) or a positive int.
        noise: None (Gaussian), ``"gaussian"``, ``"gumbel"`` or a :class:`Noise`.
        generator: None (draws from the default generator of x's device, advancing it)
            or a ``torch.Generator`` on x's device.
        noise_samples: None or a tensor ``(num_samples, *x.shape)`` of standard noise draws.
        default_samples: num_samples when neither it nor noise_samples is given.
    """
    law = check_noise(noise)
    if noise_samples is not None:
        z = check_tensor(noise_samples, "noise_samples")
        if generator is not None:
            raise ValueError("pass either generator or noise_samples, not both")
        if z.dim() != x.dim() + 1 or tuple(z.shape[1:]) != tuple(x.shape):
            raise ValueError(
                "noise_samples must have shape (num_samples, *x.shape) = "
                f"(M, {', '.join(map(str, x.shape))}); got {tuple(z.shape)}"
            )
        if z.device != x.device:
            raise ValueError(f"noise_samples must be on the device of x ({x.device}), got {z.device}")
        M = z.shape[0]
        if M < 1:
            raise ValueError("noise_samples must hold at least one sample, got num_samples = 0")
        if num_samples is not None and check_num_samples(num_samples) != M:
            raise ValueError(f"num_samples={num_samples!r} disagrees with noise_samples.shape[0] = {M}")
        z_rows = z.detach().movedim(dim + 1, -1).reshape(M, rows, x.shape[dim])
        return Perturbation(M, law, x.device, samples=z_rows)
    M = default_samples if num_samples is None else check_num_samples(num_samples)
    gen = check_generator(generator, x.device)
    if gen is None:  # meta tensors: shapes only
        return Perturbation(M, law, x.device)
    return Perturbation(M, law, x.device, generator=gen, state=gen.get_state())


# ---------------------------------------------------------------------------- the engine

#: A selection maps perturbed rows (m, B, n) and the per-row budget (B,) (or None) to
#: (slots (m, B, K), weights (m, B, K)): the
#: hard solution y*(u_m) is the vector of ``width`` slots with the weights at those slots,
#: and slot s stands for entry s % n of the row.
Selection = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]


class _Perturbed(torch.autograd.Function):
    """(y, F) of the module docstring; score-function backward for y, pathwise for F."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        budget: Tensor | None,
        target: Tensor | None,
        select: Selection,
        width: int,
        t: float,
        pert: Perturbation,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, n = x.shape
        xd = x.detach()
        M = pert.num_samples
        y = x.new_zeros(B, width)
        value = x.new_zeros(B)
        slots, weights = [], []
        if target is None:
            scale, offset = x.new_ones(B), x.new_zeros(B)
        else:
            # F is computed on x / s with s a power of two near max |x| (exact scaling), and
            # <c, x> / s is subtracted from every sample before the mean: each term is then
            # O(k), so large scores give a finite loss whenever the loss itself is finite.
            top = torch.where(torch.isfinite(xd), xd.abs(), 0.0).amax(-1)
            scale = torch.exp2(torch.frexp(top).exponent.to(top.dtype) - 1.0).clamp(min=1.0)
            c = target.detach()
            offset = torch.where(c != 0, c * (xd / scale.unsqueeze(-1)), 0.0).sum(-1)
        for z in pert.chunks(B, n, x.dtype):
            u = xd.unsqueeze(0) + t * z
            slot, w = select(u, budget)
            pos = slot % n if width != n else slot
            y.scatter_add_(-1, slot.permute(1, 0, 2).reshape(B, -1), w.permute(1, 0, 2).reshape(B, -1))
            vals = u.gather(-1, pos) / scale.view(1, B, 1)
            per_sample = torch.where(w != 0, w * vals, 0.0).sum(-1) - offset
            value += (per_sample / M).sum(0)
            slots.append(slot)
            weights.append(w)
        return y / M, value * scale, torch.cat(slots), torch.cat(weights)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, _, target, _, width, t, pert = inputs
        y, _, slot, w = output
        ctx.mark_non_differentiable(slot, w)
        ctx.set_materialize_grads(False)
        # The outputs do not depend on infinite entries (always or never selected).
        ctx.save_for_backward(x, target, y, slot, w)
        ctx.t, ctx.pert, ctx.width = t, pert, width

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor | None, grad_value: Tensor | None, *unused: Tensor):  # type: ignore[override]
        x, target, y, slot, w = ctx.saved_tensors
        pert: Perturbation = ctx.pert
        B, n = x.shape
        finite = torch.isfinite(x)
        grad = x.new_zeros(B, n)
        if grad_y is not None and ctx.needs_input_grad[0]:
            start = 0
            for z in pert.chunks(B, n, x.dtype, replay=True):
                m = z.shape[0]
                s, wc = slot[start : start + m], w[start : start + m]
                inner = (wc * grad_y.unsqueeze(0).expand(m, B, ctx.width).gather(-1, s)).sum(-1)  # (m, B)
                grad += torch.einsum("mb,mbn->bn", inner, pert.noise.score(z))
                start += m
            grad = grad / (ctx.t * pert.num_samples)
        grad_target = None
        if grad_value is not None:
            g = grad_value.unsqueeze(-1)
            mean = y if ctx.width == n else y.view(B, -1, n).sum(1)
            if target is not None:
                mean = mean - target
                if ctx.needs_input_grad[2]:
                    grad_target = -g * x
            grad = grad + g * mean
        return torch.where(finite, grad, 0.0), None, grad_target, None, None, None, None


def perturbed(
    x: Tensor,
    select: Selection,
    *,
    temperature: float,
    pert: Perturbation,
    width: int | None = None,
    target: Tensor | None = None,
    budget: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The Monte-Carlo means (y, F) of a selection over perturbed rows (B, n).

    .. math::

        y = \frac1M \sum_m y^*(x + tZ_m),\qquad
        F = \frac1M \sum_m \big(\langle y^*(x + tZ_m), x + tZ_m\rangle - \langle c, x\rangle\big)

    with the score-function backward of Berthet et al. (2020) for y,
    :math:`\frac{1}{tM}\sum_m \langle y^*(x + tZ_m), v\rangle\, s(Z_m)` with s the score
    of the noise, and the pathwise gradient y - c for F (c = ``target``, zero by
    default). Infinite entries of x get no gradient.

    Args:
        x: rows (B, n) in the compute dtype.
        select: the hard solution of perturbed rows (see :data:`Selection`).
        temperature: t > 0, the scale of the noise.
        pert: the source of the noise (:func:`perturbation`).
        width: the number of slots of y* (n by default; k n for sorted indicators).
        target: c (B, n), or None.
        budget: the per-row tensor the selection reads (k), passed to ``select``.

    Returns:
        y (B, width) and F (B,).

    Example:
        >>> x = torch.tensor([[3.0, 1.0, 2.0]])
        >>> gen = torch.Generator().manual_seed(0)
        >>> pert = perturbation(x, 1, 1, num_samples=4, noise=None, generator=gen,
        ...                     noise_samples=None, default_samples=4)
        >>> k = torch.tensor([2.0])
        >>> y, F = perturbed(x, topk_selection(k, 3), temperature=1e-6, pert=pert, budget=k)
        >>> y
        tensor([[1., 0., 1.]])
        >>> F.round(decimals=3)
        tensor([5.])

    Reference:
        Berthet, Blondel, Teboul, Cuturi, Vert, Bach. "Learning with Differentiable
        Perturbed Optimizers", NeurIPS 2020.
    """
    w = x.shape[-1] if width is None else width
    b = None if budget is None else budget.detach()
    refuse_forward_mode("the perturbed estimator")
    y, value, _, _ = _Perturbed.apply(x, b, target, select, w, temperature, pert)
    return y, value


# ----------------------------------------------------------------------- the selections


def max_budget(k: Tensor, n: int) -> int:
    """The number of largest entries a budget k (B,) in [0, n] can touch: ceil(max k).

    All n where k's values cannot be read (meta tensors, tracing, vmap): the weights
    clip(k - j, 0, 1) are zero beyond k anyway.
    """
    if not may_sync(k):
        return max(1, n)
    return max(1, min(n, math.ceil(float(k.amax().item())))) if k.numel() else 1


def topk_selection(k: Tensor, n: int) -> Selection:
    """y* = the top-k mask: weight clip(k - j, 0, 1) on the j-th largest (0-based), 0 on -inf."""
    K = max_budget(k, n)

    def select(u: Tensor, budget: Tensor | None) -> tuple[Tensor, Tensor]:
        vals, idx = torch.topk(u, K, dim=-1)
        rank = torch.arange(K, device=u.device, dtype=u.dtype)
        w = (budget.view(1, -1, 1) - rank).clamp(0.0, 1.0)  # type: ignore[union-attr]
        return idx, torch.where(vals > -math.inf, w, 0.0)

    return select


def sorted_selection(k: int, n: int) -> Selection:
    """y* = the k one-hot rows of the k largest, in decreasing order, flattened (width k n)."""
    offset = None

    def select(u: Tensor, budget: Tensor | None) -> tuple[Tensor, Tensor]:
        nonlocal offset
        vals, idx = torch.topk(u, k, dim=-1)
        if offset is None:
            offset = (torch.arange(k, device=u.device) * n).view(1, 1, k)
        return idx + offset, (vals > -math.inf).to(u.dtype)

    return select


def kth_selection(k: Tensor) -> Selection:
    """y* = the one-hot of the k-th largest entry, for integer ranks k (B,) (long) in [1, n]."""
    K = int(k.amax().item())
    uniform = bool((k == K).all())

    def select(u: Tensor, budget: Tensor | None) -> tuple[Tensor, Tensor]:
        if uniform:
            _, idx = torch.kthvalue(-u, K, dim=-1, keepdim=True)  # selection, no sort
        else:
            top = torch.topk(u, K, dim=-1).indices
            idx = top.gather(-1, (budget - 1).view(1, -1, 1).expand(u.shape[0], -1, 1))  # type: ignore[operator]
        return idx, torch.ones(idx.shape, dtype=u.dtype, device=u.device)

    return select


# ------------------------------------------------------------------------ the operators


def perturbed_mask(
    x: Tensor, k: Tensor, *, temperature: float, pert: Perturbation, solver: str = "auto"
) -> Tensor:
    r"""Perturbed top-k mask on rows (B, n) (Berthet et al. 2020).

    .. math::

        y = \mathbb{E}_Z\big[\operatorname{topkmask}(x + t Z)\big]
          \approx \frac1M \sum_{m=1}^M \operatorname{topkmask}(x + t Z_m),\qquad
        J^\top v \approx \frac{1}{t M}\sum_{m=1}^M
            \langle \operatorname{topkmask}(x + t Z_m), v\rangle\, s(Z_m)

    with Z standard Gaussian (s(z) = z) or Gumbel (s(z) = 1 - e^{-z}). The Monte-Carlo
    estimate sums to k exactly, lies in [0, 1] and is exactly 0 on entries never
    selected; the backward is the paper's score-function estimator on the forward's own
    samples (an unbiased estimate of the Jacobian of the expectation, not the derivative
    of the piecewise-constant estimate). Cost O(M n) time; memory O(M k) plus one chunk of
    noise. Hard limit: t -> 0 gives the torch.topk mask. Rows set by a row rule (see
    :mod:`softtopk._rows`) take the rule's value.

    Reference:
        Berthet, Blondel, Teboul, Cuturi, Vert, Bach. "Learning with Differentiable
        Perturbed Optimizers", NeurIPS 2020.
    """
    if k.requires_grad:
        raise ValueError("method='perturbed' is not differentiable in k; pass a k that does not require grad")
    rules = classify(x, k)
    v = regular_rows(x, rules)
    k_reg = torch.where(rules.regular, k, 1.0)
    y, _ = perturbed(v, topk_selection(k_reg, x.shape[-1]), temperature=temperature, pert=pert, budget=k_reg)
    return apply_rules(x, k, y, rules)


def perturbed_indicators(x: Tensor, k: int, *, temperature: float, pert: Perturbation) -> Tensor:
    r"""Perturbed sorted top-k indicators of rows (B, n): (B, k, n).

    .. math::

        Y = \mathbb{E}_Z\big[\operatorname{onehots}(\operatorname{topk}(x + tZ))\big],\qquad
        Y_{j,i} = P(\text{entry } i \text{ is the } (j+1)\text{-th largest of } x + tZ)

    estimated from M samples, with the score-function backward of Berthet et al. on the
    same samples (as :func:`perturbed_mask`). Rows are sorted by value (Cordonnier et
    al. 2021 sort the selected indices by position instead). Each row sums to 1.
    """
    B, n = x.shape
    y, _ = perturbed(x, sorted_selection(k, n), temperature=temperature, pert=pert, width=k * n)
    return y.view(B, k, n)


def smoothed_kth_rows(x: Tensor, k: Tensor, t: float, pert: Perturbation) -> Tensor:
    r"""Smoothed k-th largest value of rows (B, n) for integer ranks k (B,) (long) in [1, n].

    .. math::

        \frac1M \sum_m (x + tZ_m)_{(k)},\qquad \nabla = \frac1M \sum_m e_{i_m}

    (the pathwise gradient: i_m holds the k-th largest of the m-th sample).
    """
    return perturbed(x, kth_selection(k), temperature=t, pert=pert, budget=k)[1]


def fenchel_young_rows(
    x: Tensor, target: Tensor, k: Tensor, t: float, pert: Perturbation
) -> tuple[Tensor, Tensor]:
    r"""Per-row Fenchel-Young loss and the perturbed mask y_t(x) on rows (B, n).

    .. math::

        L = \frac1M \sum_m \max_{y \in C_k} \langle y, x + tZ_m\rangle - \langle c, x\rangle,
        \qquad \nabla_x L = y_t(x) - c.
    """
    y, loss = perturbed(x, topk_selection(k, x.shape[-1]), temperature=t, pert=pert, target=target, budget=k)
    return loss, y

"""Perturbed top-k (Berthet et al. 2020) and the smoothed k-th value (Garcin et al. 2022).

Every operator here averages a hard top-k over ``num_samples`` perturbations x + t Z_m of
its input. The noise Z comes from an explicit ``torch.Generator`` (or is given as a
tensor), is drawn in chunks so that at most about :data:`CHUNK_ELEMENTS` perturbed
values exist at a time, and is drawn again from the saved generator state in the
backward pass, so the backward reuses exactly the forward's samples without storing
them: memory is O(num_samples * k) per row plus one chunk, not O(num_samples * n).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._checks import check_choice, check_tensor, may_sync
from .._rows import apply_rules, classify, regular_rows

NOISES = ("gaussian", "gumbel")
#: Perturbed values held at once (num_samples is processed in chunks of this size).
CHUNK_ELEMENTS = 1 << 23


# ------------------------------------------------------------------------------ noise


def noise_score(z: Tensor, noise: str) -> Tensor:
    """grad nu(z) for the density exp(-nu(z)) of the noise: z (Gaussian), 1 - exp(-z) (Gumbel)."""
    if noise == "gaussian":
        return z
    return 1.0 - torch.exp(-z)


def draw(
    shape: tuple[int, ...], noise: str, generator: torch.Generator, dtype: torch.dtype, device: Any
) -> Tensor:
    """Standard noise: N(0, 1) or Gumbel(0, 1) (= -log(-log U), U uniform on (0, 1))."""
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return -torch.log(-torch.log(u.clamp(min=torch.finfo(dtype).tiny)))


def default_generator(device: torch.device) -> torch.Generator | None:
    """The global generator of ``device`` (what ``torch.randn`` draws from); None on meta."""
    if device.type == "meta":
        return None  # meta tensors hold no values: their draws need no generator
    if device.type == "cpu":
        return torch.default_generator
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


@dataclass
class Perturbation:
    """Where the noise of one call comes from, for rows (B, n).

    Either ``samples`` (M, B, n) given by the user, or a generator: the forward draws
    from it (advancing it, as any draw would) and the backward replays the same draws
    from the state saved before them.
    """

    num_samples: int
    noise: str
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
            yield draw((min(step, M - start), B, n), self.noise, gen, dtype, self.device)  # type: ignore[arg-type]


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
        rows: number of rows B after ``to_rows``.
        num_samples: None (use ``default_samples`` or the first size of
            ``noise_samples``) or a positive int.
        noise: None (``"gaussian"``), ``"gaussian"`` or ``"gumbel"``.
        generator: None (draws from the default generator of x's device, advancing it)
            or a ``torch.Generator`` on x's device.
        noise_samples: None or a tensor ``(num_samples, *x.shape)`` of standard noise draws.
        default_samples: num_samples when neither it nor noise_samples is given.
    """
    noise = "gaussian" if noise is None else check_choice(noise, "noise", NOISES)
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
        return Perturbation(M, noise, x.device, samples=z_rows)
    M = default_samples if num_samples is None else check_num_samples(num_samples)
    if generator is None:
        generator = default_generator(x.device)
        if generator is None:
            return Perturbation(M, noise, x.device)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if torch.device(generator.device).type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}")
    return Perturbation(M, noise, x.device, generator=generator, state=generator.get_state())


# ----------------------------------------------------------------- hard top-k of samples


def _weights(vals: Tensor, k: Tensor) -> Tensor:
    """Weights clip(k - j, 0, 1) of the j-th largest (0-based), zero on -inf values."""
    rank = torch.arange(vals.shape[-1], device=vals.device, dtype=vals.dtype)
    w = (k.unsqueeze(-1) - rank).clamp(0.0, 1.0)
    return torch.where(vals > -math.inf, w, 0.0)


def _samples_topk(v: Tensor, k: Tensor, pert: Perturbation, t: float, K: int):
    """For each chunk: (idx (m, B, K), weights (m, B, K), weighted top values (m, B))."""
    B, n = v.shape
    for z in pert.chunks(B, n, v.dtype):
        vals, idx = torch.topk(v.unsqueeze(0) + t * z, K, dim=-1)
        w = _weights(vals, k)
        top = torch.where(w > 0, w * vals, 0.0).sum(-1)
        yield idx, w, top


def _max_k(k: Tensor, n: int) -> int:
    return max(1, min(n, math.ceil(float(k.amax().item())))) if k.numel() else 1


class _PerturbedMask(torch.autograd.Function):
    """y = mean_m topkmask(x + t Z_m); score-function VJP (1/(t M)) sum_m <y_m, v> grad nu(Z_m)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: Tensor, t: float, pert: Perturbation) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        B, n = x.shape
        K = _max_k(k, n) if may_sync(k) else n  # traced: all n (the weights zero the rest)
        y = torch.zeros_like(x)
        idxs, ws = [], []
        for idx, w, _ in _samples_topk(x.detach(), k.detach(), pert, t, K):
            y.scatter_add_(-1, idx.permute(1, 0, 2).reshape(B, -1), w.permute(1, 0, 2).reshape(B, -1))
            idxs.append(idx)
            ws.append(w)
        return y / pert.num_samples, torch.cat(idxs), torch.cat(ws)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, _, t, pert = inputs
        _, idx, w = output
        ctx.mark_non_differentiable(idx, w)
        # The output does not depend on infinite entries (always or never selected).
        ctx.save_for_backward(idx, w, torch.isfinite(x))
        ctx.t, ctx.pert, ctx.shape, ctx.dtype = t, pert, x.shape, x.dtype

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        idx, w, finite = ctx.saved_tensors
        pert: Perturbation = ctx.pert
        B, n = ctx.shape
        grad = grad_y.new_zeros(B, n)
        start = 0
        for z in pert.chunks(B, n, ctx.dtype, replay=True):
            m = z.shape[0]
            i, wc = idx[start : start + m], w[start : start + m]
            inner = (wc * grad_y.unsqueeze(0).expand(m, B, n).gather(-1, i)).sum(-1)  # <y_m, v>, (m, B)
            grad += torch.einsum("mb,mbn->bn", inner, noise_score(z, pert.noise))
            start += m
        grad = torch.where(finite, grad / (ctx.t * pert.num_samples), 0.0)
        return grad, None, None, None


def perturbed_mask(
    x: Tensor, k: Tensor, *, temperature: float, pert: Perturbation, solver: str = "auto"
) -> Tensor:
    r"""Perturbed top-k mask on rows (B, n) (Berthet et al. 2020).

    .. math::

        y = \mathbb{E}_Z\big[\operatorname{topkmask}(x + t Z)\big]
          \approx \frac1M \sum_{m=1}^M \operatorname{topkmask}(x + t Z_m),\qquad
        J^\top v \approx \frac{1}{t M}\sum_{m=1}^M
            \langle \operatorname{topkmask}(x + t Z_m), v\rangle\, \nabla\nu(Z_m)

    with Z standard Gaussian (grad nu(z) = z) or Gumbel (grad nu(z) = 1 - e^{-z}). The
    Monte-Carlo estimate sums to k exactly, lies in [0, 1] and is exactly 0 on entries
    never selected; the backward is the paper's score-function estimator on the forward's
    own samples (an unbiased estimate of the Jacobian of the expectation, not the
    derivative of the piecewise-constant estimate). Cost O(M n) time; memory O(M k) plus
    one chunk of noise. Hard limit: t -> 0 gives the torch.topk mask.

    Reference:
        Berthet, Blondel, Teboul, Cuturi, Vert, Bach. "Learning with Differentiable
        Perturbed Optimizers", NeurIPS 2020.
    """
    if k.requires_grad:
        raise ValueError("method='perturbed' is not differentiable in k; pass a k that does not require grad")
    rules = classify(x, k)
    v = regular_rows(x, rules)
    y = _PerturbedMask.apply(v, torch.where(rules.regular, k, 1.0), temperature, pert)[0]
    return apply_rules(x, k, y, rules)


# -------------------------------------------------------------------- smoothed k-th value


class _SmoothedKth(torch.autograd.Function):
    """mean_m (x + t Z_m)_(k); gradient: the mean one-hot of the k-th largest index."""

    @staticmethod
    def forward(x: Tensor, k: Tensor, t: float, pert: Perturbation) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        B, n = x.shape
        K = int(k.amax().item())
        uniform = bool((k == K).all())
        total = x.new_zeros(B)
        picks = []
        for z in pert.chunks(B, n, x.dtype):
            v = x.detach().unsqueeze(0) + t * z
            if uniform:
                val, idx = torch.kthvalue(-v, K, dim=-1)  # as pytopk: selection, no sort
                val = -val
            else:
                vals, top = torch.topk(v, K, dim=-1)
                j = (k - 1).view(1, B, 1).expand(v.shape[0], B, 1)
                val, idx = vals.gather(-1, j).squeeze(-1), top.gather(-1, j).squeeze(-1)
            total += val.sum(0)
            picks.append(idx)
        return total / pert.num_samples, torch.cat(picks)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x = inputs[0]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], torch.isfinite(x))
        ctx.M = inputs[3].num_samples

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_v: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        idx, finite = ctx.saved_tensors
        counts = grad_v.new_zeros(finite.shape).scatter_add_(-1, idx.t(), grad_v.new_ones(idx.t().shape))
        grad = counts * (grad_v / ctx.M).unsqueeze(-1)
        return torch.where(finite, grad, 0.0), None, None, None


def smoothed_kth_rows(x: Tensor, k: Tensor, t: float, pert: Perturbation) -> Tensor:
    """Smoothed k-th largest value of rows (B, n) for integer k (B,) in [1, n] (long)."""
    return _SmoothedKth.apply(x, k, t, pert)[0]


# ---------------------------------------------------------------- Fenchel-Young top-k loss


class _FenchelYoung(torch.autograd.Function):
    """F(x) - <x, target> with F(x) = mean_m sum of the top k of x + t Z_m; grad y_t(x) - target."""

    @staticmethod
    def forward(x: Tensor, target: Tensor, k: Tensor, t: float, pert: Perturbation) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        B, n = x.shape
        K = _max_k(k, n) if may_sync(k) else n  # traced: all n (the weights zero the rest)
        y = torch.zeros_like(x)
        top = x.new_zeros(B)
        for idx, w, tops in _samples_topk(x.detach(), k, pert, t, K):
            y.scatter_add_(-1, idx.permute(1, 0, 2).reshape(B, -1), w.permute(1, 0, 2).reshape(B, -1))
            top += tops.sum(0)
        y = y / pert.num_samples
        inner = torch.where(target != 0, target * x.detach(), 0.0).sum(-1)
        return top / pert.num_samples - inner, y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, target = inputs[0], inputs[1]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, target, output[1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, target, y = ctx.saved_tensors
        g = grad_loss.unsqueeze(-1)
        grad_x = g * torch.where(torch.isfinite(x), y - target, 0.0)
        grad_target = -g * x if ctx.needs_input_grad[1] else None
        return grad_x, grad_target, None, None, None


def fenchel_young_rows(
    x: Tensor, target: Tensor, k: Tensor, t: float, pert: Perturbation
) -> tuple[Tensor, Tensor]:
    """Per-row Fenchel-Young loss and the perturbed mask y_t(x) on rows (B, n)."""
    return _FenchelYoung.apply(x, target, k, t, pert)


# -------------------------------------------------------------- perturbed sorted indicators


class _PerturbedIndicators(torch.autograd.Function):
    """Y = mean_m onehots(topk(x + t Z_m)) (B, k, n), rows sorted by value; score-function VJP."""

    @staticmethod
    def forward(x: Tensor, k: int, t: float, pert: Perturbation) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        B, n = x.shape
        out = x.new_zeros(B, k * n)
        offset = (torch.arange(k, device=x.device) * n).view(1, 1, k)
        flats, ws = [], []
        for z in pert.chunks(B, n, x.dtype):
            vals, idx = torch.topk(x.detach().unsqueeze(0) + t * z, k, dim=-1)  # (m, B, k)
            w = (vals > -math.inf).to(x.dtype)
            flat = idx + offset
            out.scatter_add_(-1, flat.permute(1, 0, 2).reshape(B, -1), w.permute(1, 0, 2).reshape(B, -1))
            flats.append(flat)
            ws.append(w)
        return (out / pert.num_samples).view(B, k, n), torch.cat(flats), torch.cat(ws)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, k, t, pert = inputs
        _, flat, w = output
        ctx.mark_non_differentiable(flat, w)
        ctx.save_for_backward(flat, w, torch.isfinite(x))
        ctx.t, ctx.pert, ctx.shape, ctx.dtype, ctx.k = t, pert, x.shape, x.dtype, k

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        flat, w, finite = ctx.saved_tensors
        pert: Perturbation = ctx.pert
        B, n = ctx.shape
        g = grad_y.reshape(B, ctx.k * n)
        grad = g.new_zeros(B, n)
        start = 0
        for z in pert.chunks(B, n, ctx.dtype, replay=True):
            m = z.shape[0]
            inner = (
                w[start : start + m] * g.unsqueeze(0).expand(m, B, -1).gather(-1, flat[start : start + m])
            ).sum(-1)
            grad += torch.einsum("mb,mbn->bn", inner, noise_score(z, pert.noise))
            start += m
        grad = torch.where(finite, grad / (ctx.t * pert.num_samples), 0.0)
        return grad, None, None, None


def perturbed_indicators(x: Tensor, k: int, *, temperature: float, pert: Perturbation) -> Tensor:
    r"""Perturbed sorted top-k indicators of rows (B, n): (B, k, n).

    .. math::

        Y = \mathbb{E}_Z\big[\operatorname{onehots}(\operatorname{topk}(x + tZ))\big],\qquad
        Y_{j,i} = P(\text{entry } i \text{ is the } (j+1)\text{-th largest of } x + tZ)

    estimated from M samples, with the score-function backward of Berthet et al. on the
    same samples (as :func:`perturbed_mask`). Rows are sorted by value (Cordonnier et
    al. 2021 sort the selected indices by position instead). Each row sums to 1.
    """
    return _PerturbedIndicators.apply(x, k, temperature, pert)[0]

"""Top-k sparse autoencoders: TopK (Gao et al. 2024), BatchTopK (Bussmann et al. 2024), soft masks.

A sparse autoencoder (SAE) writes an activation x in R^d as a sparse combination of m
learned directions (the decoder's unit-norm rows):

    pre = W_enc (x - b_pre) + b_enc,    z = TopK(pre),    x_hat = z D + b_pre.

TopK keeps the k largest pre-activations of each sample (then ReLU). BatchTopK keeps the
k * B largest over a whole batch of B samples, so the number of active latents varies
from sample to sample around k; at inference a fixed threshold estimated in training
replaces the batch selection (a JumpReLU), so each sample is encoded on its own. Either
selection can be a soft top-k mask of the library (``method``), which passes gradient to
the latents near the threshold. Latents that have not fired for a while are *dead*; the
AuxK loss asks the k_aux largest dead latents to reconstruct the residual x - x_hat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_dim, check_int, check_positive, check_tensor
from ..registry import resolve

ACTIVATIONS = ("topk", "batch_topk")


def topk_activation(
    pre: Tensor,
    k: float | Tensor,
    dim: int = -1,
    *,
    method: str | Callable[..., Tensor] = "hard",
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""TopK activation of a sparse autoencoder (Gao et al. 2024): the k largest latents, ReLU'd.

    .. math::

        z = \operatorname{ReLU}(\text{pre}) \odot \operatorname{mask}_k(\text{pre})

    with mask_k the torch.topk mask (``method="hard"``: Gao et al.'s TopK, whose gradient
    reaches the k kept latents only) or a soft top-k mask of the registry (``"sparse"``:
    exactly sparse, differentiable in the latents near the threshold).

    Args:
        pre: pre-activations (..., m), floating.
        k: latents per sample (see :func:`softtopk.topk_mask` for per-row k).
        dim: the latent dimension.
        method: a mask operator of :data:`softtopk.registry.OPERATORS` or a callable.
        temperature: the operator's temperature (None: its registered default).
        generator: for stochastic operators.

    Returns:
        z, the shape and dtype of pre.

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import topk_activation
        >>> topk_activation(torch.tensor([0.5, -1.0, 2.0, 1.5]), 2)
        tensor([0.0000, 0.0000, 2.0000, 1.5000])

    Reference:
        Gao et al. "Scaling and Evaluating Sparse Autoencoders", ICLR 2025 (arXiv 2406.04093, 2024).
    """
    pre = check_tensor(pre, "pre")
    d = check_dim(dim, pre.dim())
    op = resolve(method)
    return F.relu(pre) * op(pre, k, d, temperature=temperature, generator=generator)


class BatchTopK(NamedTuple):
    """What :func:`batch_topk_activation` returns.

    Attributes:
        latents: z, the shape of pre.
        threshold: (0-dim, no gradient) the k*B-th largest ReLU(pre) of the batch: the
            JumpReLU threshold that keeps the same number of latents on this batch.
    """

    latents: Tensor
    threshold: Tensor


def batch_topk_activation(
    pre: Tensor,
    k: float,
    *,
    method: str | Callable[..., Tensor] = "hard",
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> BatchTopK:
    r"""BatchTopK (Bussmann et al. 2024): the k * B largest latents over a batch of B samples.

    .. math::

        z = \operatorname{ReLU}(\text{pre}) \odot
        \operatorname{mask}_{kB}\big(\operatorname{vec}(\text{pre})\big),\qquad
        \theta = \operatorname{ReLU}(\text{pre})_{(kB)}

    pre is (B, m) (leading dims are flattened into the batch); the budget is
    round(k * B) entries of the flattened batch, so samples keep different numbers of
    latents, k on average. theta, the (kB)-th largest value, is the threshold that
    :func:`jumprelu` uses at inference.

    Args:
        pre: pre-activations (..., m); every position of the leading dims is a sample.
        k: the mean number of latents per sample (> 0).
        method: the selection over the flattened batch, as in :func:`topk_activation`.
        temperature: the operator's temperature (None: its registered default).
        generator: for stochastic operators.

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import batch_topk_activation
        >>> out = batch_topk_activation(torch.tensor([[3.0, 2.0, 0.1], [0.2, 0.3, -1.0]]), 1)
        >>> out.latents, out.threshold
        (tensor([[3., 2., 0.],
                [0., 0., 0.]]), tensor(2.))

    Reference:
        Bussmann, Leask, Nanda. "BatchTopK Sparse Autoencoders", arXiv 2412.06410, 2024.
    """
    pre = check_tensor(pre, "pre")
    check_positive(k, "k")
    op = resolve(method)
    flat = pre.reshape(1, -1)
    budget = min(flat.shape[-1], max(1, round(float(k) * (flat.shape[-1] // max(pre.shape[-1], 1)))))
    mask = op(flat, budget, -1, temperature=temperature, generator=generator)
    latents = (F.relu(flat) * mask).reshape(pre.shape)
    with torch.no_grad():
        threshold = F.relu(torch.topk(flat.detach(), budget, dim=-1).values[0, -1])
    return BatchTopK(latents, threshold)


def jumprelu(pre: Tensor, threshold: float | Tensor) -> Tensor:
    r"""JumpReLU: pre where pre > threshold, else 0 (BatchTopK's inference rule).

    .. math::

        z_i = \text{pre}_i \, [\text{pre}_i > \theta]

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import jumprelu
        >>> jumprelu(torch.tensor([0.5, 2.0, 1.0]), 0.9)
        tensor([0., 2., 1.])

    Reference:
        Rajamanoharan et al. "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
        Sparse Autoencoders", arXiv 2407.14435, 2024.
    """
    pre = check_tensor(pre, "pre")
    return torch.where(pre > threshold, pre, 0.0)


def auxk_loss(residual: Tensor, pre: Tensor, dead: Tensor, dictionary: Tensor, k_aux: int) -> Tensor:
    r"""AuxK loss (Gao et al. 2024): the k_aux largest dead latents reconstruct the residual.

    .. math::

        \hat e = \operatorname{TopK}_{k_\text{aux}}(\text{pre restricted to dead latents})\, D,\qquad
        L_\text{aux} = \frac{\sum_b \lVert e_b - \hat e_b \rVert^2}{\sum_b \lVert e_b \rVert^2}

    with e = x - x_hat (given, without gradient) and D the decoder's unit-norm rows. 0
    when no latent is dead. Gao et al. add it with a coefficient of 1/32.

    Args:
        residual: e (B, d); detached here.
        pre: pre-activations (B, m).
        dead: (m,) bool, the dead latents.
        dictionary: D (m, d).
        k_aux: latents used (at most the number of dead ones).

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import auxk_loss
        >>> D = torch.eye(3)
        >>> e = torch.tensor([[0.0, 0.0, 2.0]])
        >>> auxk_loss(e, torch.tensor([[5.0, 0.0, 2.0]]), torch.tensor([False, False, True]), D, 1)
        tensor(0.)
    """
    k_aux = min(check_int(k_aux, "k_aux"), pre.shape[-1])
    e = residual.detach()
    masked = pre.masked_fill(~dead, -math.inf)
    vals, idx = torch.topk(masked, k_aux, dim=-1)
    vals = torch.where(vals > -math.inf, F.relu(vals), 0.0)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    e_hat = z @ dictionary
    loss = (e - e_hat).pow(2).sum() / e.pow(2).sum().clamp_min(torch.finfo(e.dtype).tiny)
    return torch.where(dead.any(), loss, torch.zeros_like(loss))


def fraction_of_variance_unexplained(x: Tensor, recon: Tensor) -> Tensor:
    r"""Reconstruction error of an autoencoder: the fraction of variance unexplained (FVU).

    .. math::

        \text{FVU} = \frac{\sum_b \lVert x_b - \hat x_b \rVert^2}{\sum_b \lVert x_b - \bar x \rVert^2}

    (Gao et al.'s normalised MSE; 1 - FVU is the explained variance.)

    Example:
        >>> import torch
        >>> from softtopk.nn.functional import fraction_of_variance_unexplained
        >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
        >>> fraction_of_variance_unexplained(x, x.mean(0).expand(2, 2))
        tensor(1.)
    """
    x2 = x.reshape(-1, x.shape[-1])
    err = (x2 - recon.reshape(x2.shape)).pow(2).sum()
    return err / (x2 - x2.mean(0)).pow(2).sum().clamp_min(torch.finfo(x2.dtype).tiny)


class SAEOutput(NamedTuple):
    """What :class:`TopKSAE` returns.

    Attributes:
        recon: x_hat, the shape of x.
        latents: z (..., m), the sparse code.
        pre: encoder pre-activations (..., m).
        loss: FVU + aux_coefficient * AuxK (0-dim; the training objective).
        fvu: the reconstruction term (fraction of variance unexplained on the batch).
        aux_loss: the AuxK loss (0 outside training or with no dead latents).
        l0: mean number of non-zero latents per sample (0-dim, no gradient).
    """

    recon: Tensor
    latents: Tensor
    pre: Tensor
    loss: Tensor
    fvu: Tensor
    aux_loss: Tensor
    l0: Tensor


class TopKSAE(nn.Module):
    """A top-k sparse autoencoder: TopK, BatchTopK with a JumpReLU threshold, or a soft mask.

    ``pre = W_enc (x - b_pre) + b_enc``, ``z = select(pre)``, ``x_hat = z D + b_pre`` with D
    the decoder whose m rows are kept at unit norm (they are normalised in every forward,
    which also removes the gradient component along each row, as Gao et al. do by hand).
    The encoder is initialised to D transposed and b_pre to the data mean (call
    :meth:`init_pre_bias`).

    In training, the module counts for each latent the samples since it last fired;
    latents past ``dead_after`` samples are dead and feed the AuxK loss; with
    ``activation="batch_topk"`` it keeps a running average (``threshold_momentum``) of
    each batch's threshold. In ``eval()``, BatchTopK is replaced by
    ``jumprelu(pre, threshold)`` (each sample on its own); TopK stays per sample.

    Args:
        d_in: input width d.
        latents: m.
        k: latents per sample (the mean, for BatchTopK).
        activation: ``"topk"`` (Gao et al. 2024) or ``"batch_topk"`` (Bussmann et al. 2024).
        method: the selection: ``"hard"`` (torch.topk, the papers' SAEs) or a soft mask
            of :data:`softtopk.registry.OPERATORS` such as ``"sparse"``.
        temperature: the mask's temperature (None: its registered default).
        generator: for stochastic masks.
        k_aux: latents of the AuxK loss (default d_in // 2, as Gao et al.).
        aux_coefficient: weight of the AuxK loss (1/32 in Gao et al.); 0 turns it off.
        dead_after: samples without firing after which a latent counts as dead.
        threshold_momentum: weight of each batch in the running JumpReLU threshold (an
            exponential average over about the last 1 / momentum batches; Bussmann et al.
            use 0.01 over much longer runs).

    Example:
        >>> import torch
        >>> from softtopk.nn import TopKSAE
        >>> sae = TopKSAE(8, 32, k=4)
        >>> out = sae(torch.randn(16, 8))
        >>> out.latents.shape, int((out.latents != 0).sum(-1).max())
        (torch.Size([16, 32]), 4)
        >>> out.loss.backward()

    References:
        Gao et al. "Scaling and Evaluating Sparse Autoencoders", 2024;
        Bussmann, Leask, Nanda. "BatchTopK Sparse Autoencoders", 2024.
    """

    def __init__(
        self,
        d_in: int,
        latents: int,
        k: float,
        *,
        activation: str = "topk",
        method: str | Callable[..., Tensor] = "hard",
        temperature: float | None = None,
        generator: torch.Generator | None = None,
        k_aux: int | None = None,
        aux_coefficient: float = 1.0 / 32.0,
        dead_after: int = 100_000,
        threshold_momentum: float = 0.05,
    ) -> None:
        super().__init__()
        d_in, latents = check_int(d_in, "d_in"), check_int(latents, "latents")
        if d_in < 1 or latents < 1:
            raise ValueError(f"d_in and latents must be >= 1, got {d_in} and {latents}")
        k = check_positive(k, "k")
        if k > latents:
            raise ValueError(f"k must be at most latents = {latents}, got {k}")
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        resolve(method)
        self.method = method
        self.temperature = None if temperature is None else check_positive(temperature, "temperature")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        self.k_aux = max(1, d_in // 2) if k_aux is None else check_int(k_aux, "k_aux")
        if self.k_aux < 1:
            raise ValueError(f"k_aux must be >= 1, got {self.k_aux}")
        if isinstance(aux_coefficient, bool) or not isinstance(aux_coefficient, int | float):
            raise TypeError(f"aux_coefficient must be a number, got {type(aux_coefficient).__name__}")
        if not (aux_coefficient >= 0 and math.isfinite(aux_coefficient)):
            raise ValueError(f"aux_coefficient must be a finite number >= 0, got {aux_coefficient}")
        self.aux_coefficient = float(aux_coefficient)
        self.dead_after = check_int(dead_after, "dead_after")
        if self.dead_after < 1:
            raise ValueError(f"dead_after must be >= 1, got {self.dead_after}")
        self.threshold_momentum = check_positive(threshold_momentum, "threshold_momentum")
        if self.threshold_momentum > 1:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {threshold_momentum}")
        self.d_in, self.latents, self.k = d_in, latents, k
        decoder = torch.randn(latents, d_in)
        decoder = decoder / decoder.norm(dim=-1, keepdim=True)
        self.decoder = nn.Parameter(decoder)
        self.encoder = nn.Parameter(decoder.clone())  # (m, d): W_enc = D^T at initialisation
        self.latent_bias = nn.Parameter(torch.zeros(latents))
        self.pre_bias = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("since_fired", torch.zeros(latents, dtype=torch.int64))
        self.register_buffer("threshold", torch.tensor(math.nan))

    @property
    def dictionary(self) -> Tensor:
        """D (m, d): the decoder's rows at unit norm, the directions the latents write."""
        return self.decoder / self.decoder.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def init_pre_bias(self, x: Tensor) -> None:
        """Sets b_pre to the mean of the samples ``x`` (..., d)."""
        x = check_tensor(x, "x")
        self.pre_bias.copy_(x.reshape(-1, self.d_in).mean(0))

    def dead_mask(self) -> Tensor:
        """(m,) bool: latents that have not fired in the last ``dead_after`` training samples."""
        return self.since_fired >= self.dead_after

    @property
    def dead_latents(self) -> int:
        """The number of dead latents."""
        return int(self.dead_mask().sum())

    def encode(self, x: Tensor) -> Tensor:
        """The pre-activations W_enc (x - b_pre) + b_enc."""
        return (x - self.pre_bias) @ self.encoder.t() + self.latent_bias

    def select(self, pre: Tensor) -> Tensor:
        """The sparse code of pre-activations: the configured selection (JumpReLU in eval for BatchTopK)."""
        if self.activation == "topk":
            return topk_activation(
                pre, self.k, method=self.method, temperature=self.temperature, generator=self.generator
            )
        if not self.training:
            if torch.isnan(self.threshold):
                raise RuntimeError(
                    "TopKSAE(activation='batch_topk') in eval() needs the JumpReLU threshold, which is "
                    "estimated in training; train it first (or set sae.threshold)"
                )
            return jumprelu(pre, self.threshold)
        out = batch_topk_activation(
            pre, self.k, method=self.method, temperature=self.temperature, generator=self.generator
        )
        with torch.no_grad():
            t = out.threshold.to(self.threshold.dtype)
            m = self.threshold_momentum
            self.threshold.copy_(
                torch.where(torch.isnan(self.threshold), t, (1 - m) * self.threshold + m * t)
            )
        return out.latents

    def forward(self, x: Tensor) -> SAEOutput:
        x = check_tensor(x, "x")
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must have {self.d_in} features in its last dim, got shape {tuple(x.shape)}")
        pre = self.encode(x)
        z = self.select(pre)
        dictionary = self.dictionary
        recon = z @ dictionary + self.pre_bias
        fvu = fraction_of_variance_unexplained(x, recon)
        aux = torch.zeros((), dtype=fvu.dtype, device=fvu.device)
        with torch.no_grad():
            fired = (z.reshape(-1, self.latents) != 0).any(0)
            l0 = (z != 0).sum(-1).to(fvu.dtype).mean()
        if self.training:
            with torch.no_grad():
                samples = math.prod(x.shape[:-1])
                self.since_fired.copy_(torch.where(fired, 0, self.since_fired + samples))
            dead = self.dead_mask()
            if self.aux_coefficient > 0 and bool(dead.any()):
                aux = auxk_loss(
                    (x - recon).reshape(-1, self.d_in),
                    pre.reshape(-1, self.latents),
                    dead,
                    dictionary,
                    self.k_aux,
                )
        return SAEOutput(recon, z, pre, fvu + self.aux_coefficient * aux, fvu, aux, l0)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, latents={self.latents}, k={self.k:g}, activation={self.activation!r}, "
            f"method={self.method!r}, temperature={self.temperature}, k_aux={self.k_aux}"
        )

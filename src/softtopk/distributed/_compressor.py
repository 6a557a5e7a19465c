"""The compressor: which entries of a flat tensor to send, and in how many bits.

Selection is top-k in magnitude (``torch.topk``, a selection, not a sort) or random-k
with indices every rank draws alike from a shared seed. Values travel in the tensor's
dtype or quantised to 8 or 2 bits with one power-of-two scale per message; an optional
orthonormal DCT of fixed-size chunks (DeMo) changes the basis before selection. Every
step is chosen so that ``residual = accumulated - sent`` holds exactly in floating
point (see :func:`quantize`).
"""

from __future__ import annotations

import functools
import math
import numbers
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_choice, check_int


def topk_sparsify(acc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""The k largest entries of a flat tensor in magnitude, and what is left.

    .. math::

        I = \operatorname{top}_k(|a|),\qquad \text{sent} = a_I,\qquad
        r = a - \sum_{i \in I} a_i e_i

    A NaN counts as larger than every number (as in ``torch.topk``), so it is sent, not
    hidden in the residual.

    Args:
        acc: (n,) the accumulated gradient (gradient + residual).
        k: entries to send, in [0, n].

    Returns:
        ``(values, indices, residual)``: values (k,) = acc[indices], indices (k,) int64,
        residual (n,) = acc with those entries set to 0, so that
        residual + scatter(indices, values) == acc exactly.

    Example:
        >>> import torch
        >>> from softtopk.distributed import topk_sparsify
        >>> topk_sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), 2)
        (tensor([-3.,  2.]), tensor([1, 2]), tensor([0.1000, 0.0000, 0.0000, 0.5000]))

    Reference: Aji & Heafield 2017, "Sparse Communication for Distributed Gradient Descent".
    """
    _check_flat(acc, "acc")
    k = _check_k(k, acc.numel())
    indices = torch.topk(acc.abs(), k, sorted=False).indices
    return acc.index_select(0, indices), indices, acc.index_fill(0, indices, 0.0)


def randk_indices(n: int, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    r"""k distinct indices in [0, n), uniformly at random (random-k sparsification).

    .. math::

        I \sim \operatorname{Uniform}\{S \subset \{0, \dots, n-1\} : |S| = k\}

    Ranks that pass generators seeded alike draw the same indices, so their values can be
    summed by an all-reduce without sending indices.

    Args:
        n: length of the tensor.
        k: indices to draw, in [0, n].
        generator: a CPU generator (None: torch's default one).

    Returns:
        (k,) int64 indices on the CPU, in random order.

    Example:
        >>> import torch
        >>> from softtopk.distributed import randk_indices
        >>> randk_indices(10, 3, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([3])

    Reference: Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with Memory".
    """
    n = check_int(n, "n")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    k = _check_k(k, n)
    return torch.randperm(n, generator=generator)[:k]


def quantize(values: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    r"""Codes and one power-of-two step such that ``codes * step`` approximates ``values``.

    .. math::

        c_i = \operatorname{clip}\bigl(\operatorname{round}(v_i / s), -L, L\bigr),\qquad
        \hat v_i = c_i\, s,\qquad s = 2^e

    8 bits: L = 127 and s the smallest power of two with L s >= max abs(v), so
    abs(v - v_hat) <= s / 2 <= max abs(v) / 127 (the largest code lies in [64, 127]).
    2 bits: L = 1 (ternary: -s, 0, s, as in TernGrad) and s the power of two nearest to
    mean abs(v) (the scale of EF-signSGD), so abs(v - v_hat) <= max(s / 2, abs(v) - s).
    Because s is a power of two no smaller than the spacing of the floats it divides,
    and c_i is 0 or shares the sign of v_i with abs(c_i s) <= 2 abs(v_i), the difference
    ``values - codes * step`` is computed without rounding: the sender's residual plus
    what it sent is exactly what it had. A message with a non-finite value gets a NaN
    step, so every decoded value is NaN (a non-finite gradient stays visible).

    Args:
        values: (k,) floating values (quantised in float32, or float64 for float64 input).
        bits: 8 or 2.

    Returns:
        ``(codes, step)``: int8 codes (k,) in [-L, L] and a 0-dim step of the
        computation dtype.

    Example:
        >>> import torch
        >>> from softtopk.distributed import dequantize, quantize
        >>> v = torch.tensor([0.5, -1.0, 0.02])
        >>> codes, step = quantize(v, 8)
        >>> step.item(), codes.tolist()
        (0.015625, [32, -64, 1])
        >>> residual = v - dequantize(codes, step)  # exact: residual + sent == v
        >>> torch.equal(residual + dequantize(codes, step), v)
        True

    Reference: Wen et al. 2017, "TernGrad"; Karimireddy et al. 2019, "Error Feedback Fixes
    SignSGD and other Gradient Compression Schemes".
    """
    _check_flat(values, "values")
    bits = _check_bits(bits)
    v = values.to(torch.float64 if values.dtype == torch.float64 else torch.float32)
    levels = 127 if bits == 8 else 1
    mag = v.abs()
    top = mag.max() if v.numel() else v.new_zeros(())
    if bits == 8:
        step = _pow2_ceil(top / levels)
    else:
        mean = mag.mean() if v.numel() else v.new_zeros(())
        step = torch.exp2(torch.round(torch.log2(mean)))
        step = torch.maximum(step, _pow2_ceil(top * 2.0**-23))  # the spacing condition
    step = torch.where(top > 0, step, torch.ones_like(step))
    step = torch.where(torch.isfinite(top) & torch.isfinite(step), step, torch.full_like(step, math.nan))
    codes = torch.round(v / step).clamp_(-levels, levels).nan_to_num_(0.0)
    return codes.to(torch.int8), step


def dequantize(codes: Tensor, step: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Values from :func:`quantize`'s codes and step: ``codes * step``.

    .. math::

        \hat v_i = c_i\, s

    Args:
        codes: (k,) int8 codes.
        step: 0-dim step.
        dtype: dtype of the result.

    Returns:
        (k,) values of ``dtype``.

    Example:
        >>> import torch
        >>> from softtopk.distributed import dequantize
        >>> dequantize(torch.tensor([1, -1, 0], dtype=torch.int8), torch.tensor(0.25))
        tensor([ 0.2500, -0.2500,  0.0000])
    """
    return (codes.to(step.dtype) * step).to(dtype)


@functools.lru_cache(maxsize=16)
def _dct_matrix(chunk: int, dtype: torch.dtype, device: str) -> Tensor:
    i = torch.arange(chunk, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * chunk)) * math.sqrt(2.0 / chunk)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype=dtype, device=device)


def chunked_dct(x: Tensor, chunk: int) -> Tensor:
    r"""Orthonormal DCT-II of consecutive chunks of a flat tensor (the last one zero-padded).

    .. math::

        X_{c,j} = \sqrt{\tfrac{2 - [j = 0]}{C}} \sum_{i=0}^{C-1} x_{cC+i}
        \cos\frac{\pi (2i + 1) j}{2C}

    Args:
        x: (n,) floating tensor.
        chunk: chunk length C >= 2.

    Returns:
        (ceil(n / C) C,) coefficients, chunk after chunk; the transform is orthogonal, so
        :func:`chunked_idct` inverts it and norms are kept.

    Example:
        >>> import torch
        >>> from softtopk.distributed import chunked_dct, chunked_idct
        >>> x = torch.randn(10, dtype=torch.float64)
        >>> torch.allclose(chunked_idct(chunked_dct(x, 4), 4, 10), x)
        True

    Reference: Peng, Quesnelle & Kingma 2024, "DeMo: Decoupled Momentum Optimization".
    """
    _check_flat(x, "x")
    chunk = _check_chunk(chunk)
    pad = -x.numel() % chunk
    rows = torch.nn.functional.pad(x, (0, pad)).view(-1, chunk)
    return (rows @ _dct_matrix(chunk, x.dtype, str(x.device)).T).reshape(-1)


def chunked_idct(coeffs: Tensor, chunk: int, n: int) -> Tensor:
    r"""Inverse of :func:`chunked_dct`: the first ``n`` entries of the inverse transform.

    .. math::

        x_{cC+i} = \sum_{j=0}^{C-1} \sqrt{\tfrac{2 - [j = 0]}{C}} X_{c,j}
        \cos\frac{\pi (2i + 1) j}{2C}

    Args:
        coeffs: (m,) coefficients, m a multiple of ``chunk``.
        chunk: chunk length C >= 2.
        n: length of the signal, at most m.

    Returns:
        (n,) tensor.

    Example:
        >>> import torch
        >>> from softtopk.distributed import chunked_idct
        >>> chunked_idct(torch.tensor([2.0, 0.0]), 2, 2)
        tensor([1.4142, 1.4142])
    """
    _check_flat(coeffs, "coeffs")
    chunk = _check_chunk(chunk)
    if coeffs.numel() % chunk:
        raise ValueError(f"coeffs must have a multiple of chunk={chunk} entries, got {coeffs.numel()}")
    n = check_int(n, "n")
    if not 0 <= n <= coeffs.numel():
        raise ValueError(f"n must be in [0, {coeffs.numel()}], got {n}")
    rows = coeffs.view(-1, chunk) @ _dct_matrix(chunk, coeffs.dtype, str(coeffs.device))
    return rows.reshape(-1)[:n]


class Encoded(NamedTuple):
    """One rank's compressed message.

    Attributes:
        payload: the bytes (uint8) or the values (for random-k without quantisation, whose
            values are summed by an all-reduce) this rank puts into its collective.
        sent: (m,) dense, what the receivers reconstruct from this rank's message.
        residual: (m,) accumulated - sent, exactly.
        indices: (k,) int64 indices of the entries sent.
        shared: whether every rank sends the same indices (random-k).
    """

    payload: Tensor
    sent: Tensor
    residual: Tensor
    indices: Tensor
    shared: bool


@dataclass(frozen=True)
class Compressor:
    """Which entries to send and how: density, selection, value bits, basis.

    Args:
        density: fraction of the entries sent per message, in (0, 1]; k = ceil(density m)
            for a tensor of m entries (at least 1).
        method: ``"topk"`` (largest in magnitude; each rank sends its own indices) or
            ``"randk"`` (uniform; every rank draws the same indices from ``seed``, the
            message counter and its key, so only values travel).
        bits: ``None`` (values in the tensor's dtype), 8 or 2 (see :func:`quantize`).
        chunk: ``None`` or the chunk length of an orthonormal DCT applied before
            selection (:func:`chunked_dct`; selection, memory and messages then live
            in the coefficients).
        seed: random-k's shared seed.

    Example:
        >>> from softtopk.distributed import Compressor
        >>> Compressor(density=0.01, bits=2).message_bytes(1000, 4)  # 10 codes in 3 bytes, 10 int32
        [43, 4]
    """

    density: float = 0.01
    method: str = "topk"
    bits: int | None = None
    chunk: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        d = self.density
        if isinstance(d, bool) or not isinstance(d, numbers.Real):
            raise TypeError(f"density must be a number in (0, 1], got {type(d).__name__} {d!r}")
        if not 0 < d <= 1:
            raise ValueError(f"density must be in (0, 1], got {d!r}")
        check_choice(self.method, "method", ("topk", "randk"))
        if self.bits is not None:
            _check_bits(self.bits)
        if self.chunk is not None:
            _check_chunk(self.chunk)
        check_int(self.seed, "seed")

    @property
    def is_identity(self) -> bool:
        """Density 1 in the tensor's own basis and dtype: a plain all-reduce."""
        return self.density == 1 and self.bits is None and self.chunk is None

    def size(self, n: int) -> int:
        """Entries of the transformed tensor (n rounded up to whole chunks)."""
        return n if self.chunk is None else -(-n // self.chunk) * self.chunk

    def k(self, m: int) -> int:
        """Entries sent from a (transformed) tensor of m entries."""
        return min(m, max(1, math.ceil(self.density * m))) if m else 0

    def transform(self, x: Tensor) -> Tensor:
        """The tensor in the basis where entries are selected (itself without ``chunk``)."""
        return x if self.chunk is None else chunked_dct(x, self.chunk)

    def inverse(self, coeffs: Tensor, n: int) -> Tensor:
        """Back from :meth:`transform`'s basis to the first n entries."""
        return coeffs if self.chunk is None else chunked_idct(coeffs, self.chunk, n)

    def message_bytes(self, m: int, value_size: int) -> list[int]:
        """[bytes of the values (or codes) + indices, bytes of the scale] of one message."""
        k = self.k(m)
        values = k * value_size if self.bits is None else (k if self.bits == 8 else -(-k // 4))
        indices = 0 if self.method == "randk" else k * _index_dtype(m).itemsize
        return [values + indices, 0 if self.bits is None else 4]

    def select(self, acc: Tensor, *, key: object = 0, counter: int = 0) -> Tensor:
        """Indices to send from ``acc`` (random-k: the same on every rank for equal key and counter)."""
        k = self.k(acc.numel())
        if self.method == "topk":
            return torch.topk(acc.abs(), k, sorted=False).indices
        seed = zlib.crc32(repr((self.seed, key, counter)).encode())
        return randk_indices(acc.numel(), k, generator=torch.Generator().manual_seed(seed)).to(acc.device)

    def encode(self, acc: Tensor, value_dtype: torch.dtype, *, key: object = 0, counter: int = 0) -> Encoded:
        """Compresses ``acc`` (the transformed, accumulated tensor) into one message.

        Values travel in ``value_dtype`` (the gradient's own dtype) or as codes; in both
        cases ``sent + residual == acc`` exactly (rounding to a narrower float is exact to
        subtract again, as is :func:`quantize`'s rounding).
        """
        indices = self.select(acc, key=key, counter=counter)
        picked = acc.index_select(0, indices)
        if self.bits is None:
            wire = picked.to(value_dtype)
            decoded = wire.to(acc.dtype)
            values = wire.contiguous().view(torch.uint8)
        else:
            codes, step = quantize(picked, self.bits)
            decoded = dequantize(codes, step, acc.dtype)
            values = codes.view(torch.uint8) if self.bits == 8 else _pack2(codes)
        sent = torch.zeros_like(acc).index_copy_(0, indices, decoded)
        residual = acc.index_copy(0, indices, picked - decoded)
        shared = self.method == "randk"
        if shared and self.bits is None:
            payload = wire
        else:
            parts = [values]
            if not shared:
                parts.append(indices.to(_index_dtype(acc.numel())).view(torch.uint8))
            if self.bits is not None:
                parts.append(step.to(torch.float32).reshape(1).view(torch.uint8))
            payload = torch.cat(parts)
        return Encoded(payload, sent, residual, indices, shared)

    def decode(
        self,
        payload: Tensor,
        m: int,
        value_dtype: torch.dtype,
        dtype: torch.dtype,
        indices: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(indices, values of ``dtype``) of one rank's byte message for a tensor of m entries.

        ``indices`` are the shared ones of random-k (its messages carry none).
        """
        k = self.k(m)
        if self.bits is None:
            nv = k * torch.empty((), dtype=value_dtype).element_size()
            values = payload[:nv].clone().view(value_dtype).to(dtype)
        else:
            nv = k if self.bits == 8 else -(-k // 4)
            raw = payload[:nv]
            codes = raw.view(torch.int8) if self.bits == 8 else _unpack2(raw, k)
            step = payload[-4:].clone().view(torch.float32)[0]
            values = dequantize(
                codes, step.to(torch.float64 if dtype == torch.float64 else torch.float32), dtype
            )
        if indices is None:
            index_dtype = _index_dtype(m)
            indices = payload[nv : nv + k * index_dtype.itemsize].clone().view(index_dtype).long()
        return indices, values


def _pack2(codes: Tensor) -> Tensor:
    """Ternary codes in {-1, 0, 1} packed four to a byte (2 bits each, code + 1)."""
    c = (codes.to(torch.int16) + 1).to(torch.uint8)
    c = torch.nn.functional.pad(c, (0, -c.numel() % 4)).view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def _unpack2(packed: Tensor, k: int) -> Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    c = (packed[:, None] >> shifts) & 3
    return (c.reshape(-1)[:k].to(torch.int16) - 1).to(torch.int8)


def _pow2_ceil(x: Tensor) -> Tensor:
    """The smallest power of two >= x (x > 0), exactly."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), torch.where(mantissa == 0.5, exponent - 1, exponent))


def _index_dtype(m: int) -> torch.dtype:
    return torch.int32 if m < 2**31 else torch.int64


def _check_flat(x: object, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be a flat tensor, got shape {tuple(x.shape)}")


def _check_k(k: object, n: int) -> int:
    k = check_int(k, "k")
    if not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    return k


def _check_bits(bits: object) -> int:
    bits = check_int(bits, "bits")
    if bits not in (8, 2):
        raise ValueError(f"bits must be 8 or 2 (or None for no quantisation), got {bits}")
    return bits


def _check_chunk(chunk: object) -> int:
    chunk = check_int(chunk, "chunk")
    if chunk < 2:
        raise ValueError(f"chunk must be at least 2, got {chunk}")
    return chunk

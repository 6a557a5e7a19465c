"""Links G of the threshold family ``y_i = G((x_i - tau) / t)``.

A link is a non-decreasing map of the real line onto [0, 1]. Each link returns its
value and its derivative together, because the solver needs both at every step and the
backward needs the derivative at the solution.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Link:
    """A link of the threshold family.

    Attributes:
        name: ``"sparse"``, ``"logistic"`` or ``"laplace"``.
        p: exponent of the sparse p-norm link (only for ``"sparse"``).
    """

    name: str
    p: float = 2.0

    @property
    def sparse(self) -> bool:
        """G(z) = 0 for z <= 0 and G(z) = 1 for z >= 1: the support is bounded."""
        return self.name == "sparse"

    @property
    def piecewise_linear(self) -> bool:
        """The Jacobian is locally constant, so second derivatives vanish almost everywhere."""
        return self.name == "sparse" and self.p == 2.0

    @property
    def code(self) -> int:
        """The link's number in the compiled kernels: 0 clip, 1 sparse p < 2, 2 logistic, 3 Laplace."""
        if self.name == "sparse":
            return 0 if self.p == 2.0 else 1
        return {"logistic": 2, "laplace": 3}[self.name]

    def slope_from_value(self, y: Tensor) -> Tensor:
        """G'(G^{-1}(y)): the slope at the solution from the mask value alone.

        Every link is strictly increasing where 0 < G < 1 and flat where G is 0 or 1, so
        the value fixes the slope: 1 on (0, 1) for p = 2, a y^(2-p) with a = 1/(p-1) for
        p < 2, y (1 - y) for the logistic and min(y, 1 - y) for the Laplace CDF (0 at
        y = 0 and y = 1). Written in differentiable ops, safe at the ends (its derivative
        is finite everywhere the mask is), so a backward built on it can be differentiated
        again: d/dy [G'(G^{-1}(y))] dy/dx = G''(z)/t dz/dx.
        """
        inside = (y > 0) & (y < 1)
        if self.name == "sparse":
            if self.p == 2.0:
                return inside.to(y.dtype)
            a = 1.0 / (self.p - 1.0)
            safe = torch.where(inside, y, 1.0)
            return torch.where(inside, a * safe.pow(2.0 - self.p), 0.0)
        if self.name == "logistic":
            return torch.where(inside, y * (1.0 - y), 0.0)
        if self.name == "laplace":
            return torch.where(inside, torch.minimum(y, 1.0 - y), 0.0)
        raise ValueError(f"unknown link {self.name!r}")

    def dense_slopes(self, x: Tensor, tau: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """A dense link's slope h = G'(z) at z = (x - tau)/t, and w = h e^m, in float64.

        The slope is taken from z, not from the mask value: where 1 - y has rounded
        (y within a few ulps of 1, or exactly 1), y (1 - y) and min(y, 1 - y) are wrong,
        and the gradient in k = <h, v>/sum h on a row near the hard mask with them. m is
        the row's smallest finite |z|, so the largest w is about 1 and sums of w do not
        underflow where every h does (every |z| beyond about 745); w gives every ratio
        of sums that the backward takes. tau and t are (B,), x is (B, n) rows; an
        infinite entry has h = w = 0.
        """
        z = (x.to(torch.float64) - tau.unsqueeze(-1)) / t.to(torch.float64).unsqueeze(-1)
        a = z.abs()
        m = _smallest_finite(a)
        e = torch.exp(-a)
        s = torch.exp(m - a)
        if self.name == "logistic":
            r = 1.0 / (1.0 + e) ** 2  # G'(z) = e^-|z| / (1 + e^-|z|)^2
            return e * r, s * r
        if self.name == "laplace":
            return 0.5 * e, 0.5 * s  # G'(z) = e^-|z| / 2
        raise ValueError(f"link {self.name!r} is not dense")

    def smooth_slope_from_value(self, y: Tensor) -> Tensor:
        """y (1 - y) (logistic) or min(y, 1 - y) (Laplace), with no mask at y = 0 and 1.

        Its derivatives in y are those of G'(G^{-1}(y)) to every order (1 - 2y and -2,
        or +-1), also at a y that rounded to 1; a backward differentiated again takes
        them from here and the value from :meth:`dense_slopes`.
        """
        if self.name == "logistic":
            return y * (1.0 - y)
        if self.name == "laplace":
            return torch.minimum(y, 1.0 - y)
        raise ValueError(f"link {self.name!r} is not dense")

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``G(z)`` and ``G'(z)``, differentiable to any order (NaN-free at the ends)."""
        if self.name == "sparse":
            inside = (z > 0) & (z < 1)
            if self.p == 2.0:
                return z.clamp(0.0, 1.0), inside.to(z.dtype)
            a = 1.0 / (self.p - 1.0)
            zs = torch.where(inside, z, 0.5)  # (z^(a - 2) is infinite at 0 for a < 2)
            g = torch.where(inside, zs.pow(a), (z >= 1).to(z.dtype))
            return g, torch.where(inside, a * zs.pow(a - 1.0), 0.0)
        if self.name == "logistic":
            y = torch.sigmoid(z)
            return y, y * (1.0 - y)
        if self.name == "laplace":
            e = 0.5 * torch.exp(-z.abs())
            return torch.where(z <= 0, e, 1.0 - e), e
        raise ValueError(f"unknown link {self.name!r}")

    def evaluate(self, z: Tensor, in_place: bool = False, snap: float = 0.0) -> tuple[Tensor, Tensor]:
        """G(z) and G'(z) at the solution; with ``in_place`` G(z) is written into z.

        For a sparse link, ``snap`` sets z <= snap to 0: an entry that sits on the
        threshold up to rounding (say z = 3e-8 where the exact value is 0) must not count
        in the support. This changes y by at most ``snap``.
        """
        if self.sparse and snap > 0:
            z = z.masked_fill_(z <= snap, 0.0) if in_place else z.masked_fill(z <= snap, 0.0)
        if not in_place:
            return self(z)
        if self.name == "sparse" and self.p == 2.0:
            slope = torch.logical_and(z > 0, z < 1).to(z.dtype)
            return z.clamp_(0.0, 1.0), slope
        if self.name == "logistic":
            y = z.sigmoid_()
            return y, y * (1.0 - y)
        return self(z)

    def sums(self, z: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """sum(G(z)) - k and sum(G'(z)) over rows (a dense link's both times e^m), in float64; overwrites z.

        Overwriting z saves passes over memory in the solver's inner loop. A sum near k
        has a resolution of eps * k, too coarse for a mask exact to float32, and for a
        dense link's threshold on a row near the hard mask (where 1 - y of the
        saturated entries, far below eps, must balance the smallest y). So the entries
        are counted apart from their fractions: a sparse link's saturated entries
        (exactly 1) are an integer recovered exactly by rounding, and a dense link's
        entries above tau count 1 each, less their 1 - G(z), taken as G(-z); the count
        minus k is exact, and the fractions sum to only as much as they weigh.
        """
        f64 = torch.float64

        def split_total(y: Tensor) -> Tensor:
            # y in [0, 1]; frac(1) = 0, so y.frac_() keeps the fractional entries only.
            rough = y.sum(-1)
            fractional = y.frac_().sum(-1)
            return (torch.round(rough - fractional).to(f64) - k) + fractional.to(f64)

        if self.name == "sparse":
            a = 1.0 / (self.p - 1.0)
            zc = z.clamp_(0.0, 1.0)
            if self.p == 2.0:
                total = split_total(zc)
                return total, zc.sign_().sum(-1).to(f64)  # sign(frac(y)) = G'
            # y = zc^a and G' = a zc^(a-1) on (0, 1), 0 where zc = 1 (saturated).
            rough = zc.sum(-1)
            fractional = zc.frac_().sum(-1)
            saturated = torch.round(rough - fractional).to(f64)
            power = zc.pow(a - 1.0)
            return (saturated - k) + torch.linalg.vecdot(power, zc).to(f64), a * power.sum(-1).to(f64)
        if self.name in ("logistic", "laplace"):
            # The fractions and slopes are summed times e^m, m the smallest finite |z|, so
            # that they do not underflow where every |z| exceeds about 745. Where the
            # count of entries above tau equals k (tau in the gap after the k-th entry),
            # f = e^-m (fractions e^m) is returned times e^m, otherwise f is dominated by
            # the count and both sums are returned times e^min(m, SCALE_LIMIT) (no
            # overflow). Newton's step f/f' and the sign of f are unchanged either way.
            logistic = self.name == "logistic"
            above = (z > 0).to(z.dtype) if logistic else None
            sign = None if logistic else torch.sign(z)
            a = z.abs_()
            m = _smallest_finite(a)
            e = a.sub_(m).neg_().exp_()  # e^(m - |z|)
            m = m.squeeze(-1).to(f64)
            if logistic:
                # r = e^-|z| / (1 + e^-|z|), times e^m: G(z) below tau and 1 - G(z) above it
                r = e / (1.0 + e * torch.exp(-m).to(e.dtype).unsqueeze(-1))
                slope = r.sum(-1).to(f64) - torch.exp(-m) * torch.linalg.vecdot(r, r).to(f64)
                fractions = r.sum(-1).to(f64) - 2.0 * torch.linalg.vecdot(above, r).to(f64)
                count = above.sum(-1).to(f64) - k
            else:
                # y = 1/2 + sign(z) (1/2 - e) with e = exp(-|z|)/2 = G'(z).
                e = e.mul_(0.5)
                slope = e.sum(-1).to(f64)
                fractions = -torch.linalg.vecdot(sign, e).to(f64)
                count = 0.5 * (z.shape[-1] + sign.sum(-1).to(f64)) - k
            capped = m.clamp(max=SCALE_LIMIT)
            shrink = torch.exp(capped - m)
            in_gap = count == 0
            f = torch.where(in_gap, fractions, count * torch.exp(capped) + fractions * shrink)
            return f, torch.where(in_gap, slope, slope * shrink)
        y, slope = self(z)
        return y.sum(-1, dtype=f64) - k, slope.sum(-1, dtype=f64)

    def inverse(self, q: Tensor) -> Tensor:
        """G^{-1}(q) for q in (0, 1); used to bracket the threshold of a dense link."""
        if self.name == "logistic":
            return torch.log(q) - torch.log1p(-q)
        if self.name == "laplace":
            return torch.where(q <= 0.5, torch.log(2.0 * q), -torch.log(2.0 * (1.0 - q)))
        raise ValueError(f"link {self.name!r} has a bounded support and needs no inverse")


def _smallest_finite(a: Tensor) -> Tensor:
    """The smallest finite entry of each row of a >= 0 (keepdim), 0 where a row has none."""
    m = torch.where(torch.isfinite(a), a, torch.inf).amin(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, 0.0)


#: The largest m by which :meth:`Link.sums` scales a dense link's sums (e^m times the
#: count n still far from overflow).
SCALE_LIMIT = 600.0


@functools.lru_cache(maxsize=64)
def sparse_link(p: float) -> Link:
    """The sparse p-norm link ``clip(max(z, 0)^(1/(p-1)), 0, 1)``, p in (1, 2]."""
    return Link("sparse", float(p))


LOGISTIC = Link("logistic")
LAPLACE = Link("laplace")


def link_of_code(code: int, p: float = 2.0) -> Link:
    """The link numbered ``code`` in the compiled kernels (see :attr:`Link.code`)."""
    if code == 0:
        return Link("sparse", 2.0)
    if code == 1:
        return Link("sparse", float(p))
    if code == 2:
        return LOGISTIC
    if code == 3:
        return LAPLACE
    raise ValueError(f"unknown link code {code!r}")

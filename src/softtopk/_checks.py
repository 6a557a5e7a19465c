"""Argument validation shared by every public function.

Every public operator validates its arguments here, so that all of them raise the
same errors: a ``TypeError`` for a wrong type, a ``ValueError`` for a wrong value,
each naming the argument and the value received. Nothing here uses ``assert``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:  # torch's fake tensors (shapes without values) have no public type to test against
    from torch._subclasses.fake_tensor import FakeTensor as _FAKE_TENSOR
except ImportError:  # pragma: no cover - a torch without it has no fake tensors to meet
    _FAKE_TENSOR = None


def is_tracing() -> bool:
    """True under torch.compile / torch.func transforms, where host syncs are not allowed."""
    if torch.compiler.is_compiling():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    level = getattr(functorch, "maybe_current_level", None)
    return level is not None and level() is not None


def forward_levels() -> int:
    """How many torch.func forward-mode transforms (``jvp``, ``jacfwd``) are active.

    torch.func does not differentiate an autograd.Function's ``jvp`` rule by an outer
    forward-mode transform (pytorch/pytorch#197867: every second derivative comes out
    0), so the operators built on one take a tensor-op route where this is 2 or more.
    """
    if torch.compiler.is_compiling() or not is_tracing():
        return 0  # (Dynamo refuses to trace torch.func's interpreter stack)
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return sum(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def refuse_forward_mode(name: str) -> None:
    """Raises NotImplementedError under a torch.func forward-mode transform.

    For the operators whose autograd.Function has no jvp: torch raises for a single
    ``jvp``, but under ``jacfwd(jacfwd(f))`` it fails on an internal assertion instead.
    """
    if forward_levels() >= 1:
        raise NotImplementedError(
            f"{name} has no forward mode: its autograd.Function defines no jvp, which "
            "torch.func.jvp, jacfwd and hessian need; use reverse mode (torch.func.jacrev, "
            "torch.autograd.grad)"
        )


def in_dual_level() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()``.

    Tensors may carry tangents there without requiring grad, so an eager call must go
    through autograd.
    """
    return getattr(forward_ad, "_current_level", 0) >= 0  # (private: assume a level if it is gone)


def has_values(x: Tensor) -> bool:
    """True when the entries of ``x`` can be read without tracing or faking them.

    False under torch.compile and torch.func transforms, for meta tensors and for fake
    tensors (shapes only): value checks are skipped there, never turned into errors.
    """
    return not is_tracing() and is_real(x)


def is_real(x: Tensor) -> bool:
    """True unless ``x`` is a meta or a fake tensor (shapes without values)."""
    if x.is_meta:
        return False
    return _FAKE_TENSOR is None or not isinstance(x, _FAKE_TENSOR)


def may_sync(x: Tensor) -> bool:
    """True when reading a value of ``x`` on the host is cheap: a CPU tensor with values.

    Shortcuts that look at data (``bool(mask.any())``) are taken only then; on an
    accelerator they would stall the stream, so the code takes the branch-free path.
    """
    return x.is_cpu and has_values(x)


def check_tensor(x: object, name: str = "x") -> Tensor:
    """Checks that ``x`` is a floating tensor with at least one dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")
    return x


def check_dim(dim: object, ndim: int) -> int:
    """Returns ``dim`` as a non-negative index into a tensor of rank ``ndim``.

    A non-integer ``dim`` is a TypeError; an integer out of range is an IndexError, as in
    torch (``torch.topk(x, 1, dim=5)``).
    """
    dim = check_int(dim, "dim")
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"dim out of range: expected a dim in [{-ndim}, {ndim - 1}] for a {ndim}-d input, got {dim}"
        )
    return dim % ndim


def check_int(value: object, name: str) -> int:
    """Checks an integer (Python or NumPy; not a bool) and returns it as a Python int.

    Ranges differ from argument to argument, so callers check them with their own message.
    """
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_bool(value: object, name: str) -> bool:
    """Checks a Python bool (not a number or a tensor standing for one)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_positive(value: object, name: str) -> float:
    """Checks a strictly positive, finite Python number (e.g. a temperature)."""
    if type(value) is not float:  # a float needs no type check (isinstance of an ABC is slow)
        if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a positive number, got {type(value).__name__} {value!r}")
        value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def check_temperature(value: object, name: str = "temperature") -> float | None:
    """Checks an optional temperature: None (the operator's default) or a positive number."""
    return None if value is None else check_positive(value, name)


def check_generator(value: object, name: str = "generator") -> torch.Generator | None:
    """Checks an optional ``torch.Generator`` (None: the global generator)."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def check_p(p: object) -> float:
    """Checks the exponent of the sparse p-norm regulariser, p in (1, 2]."""
    if type(p) is not float:
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"p must be a number in (1, 2], got {type(p).__name__} {p!r}")
        p = float(p)
    if not 1.0 < p <= 2.0:
        raise ValueError(f"p must be in (1, 2], got {p!r}")
    return p


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Checks that ``value`` is one of the strings in ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the solvers accumulate in: float64 stays, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scatter_rows(like: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """Zeros shaped like ``like`` with ``src`` scattered along the last dim at ``idx``.

    In place in eager mode; out of place under torch.func transforms, which have no
    batching rule for the in-place form.
    """
    zeros = torch.zeros_like(like)
    if is_tracing():
        return zeros.scatter(-1, idx, src)
    return zeros.scatter_(-1, idx, src)


def eager_only(fn: Callable[..., Any], reason: str) -> Callable[..., Any]:
    """``fn`` run outside torch.compile: a graph break (an error naming ``reason`` with fullgraph).

    For code that draws from a ``torch.Generator``, whose draws a compiled graph would not
    reproduce. Eager calls run ``fn`` itself; the disabled wrapper is made on the first
    compiled call, because ``torch.compiler.disable`` imports torch._dynamo (over a second
    at ``import softtopk``).
    """
    disabled: list[Callable[..., Any]] = []

    def wrapper() -> Callable[..., Any]:
        if not disabled:
            try:
                disabled.append(torch.compiler.disable(fn, reason=reason))
            except TypeError:  # a torch without the reason argument
                disabled.append(torch.compiler.disable(fn))
        return disabled[0]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # dynamo is loaded while it compiles; it refuses to trace the making of the
            # disabled wrapper, so the graph breaks here, with the reason, first
            torch._dynamo.graph_break(msg=reason)
            return wrapper()(*args, **kwargs)
        return fn(*args, **kwargs)

    return call

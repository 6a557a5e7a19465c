"""Every Triton kernel compiles for a CUDA GPU (sm_90) here, without one.

The interpreter (``TRITON_INTERPRET=1``, tests/threshold/test_triton.py) runs the kernels
as NumPy code and accepts programs the compiler refuses: a loop-carried variable whose
shape changes in the loop, for one, compiled on no GPU until it had failed on one.
``triton.compile`` takes each kernel through Triton's IR, LLVM, PTX and ptxas (shipped
in the triton wheel) for a given target, which needs no device. The argument types and
constexprs are those the launches in softtopk.threshold._triton use.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="the interpreter replaces the kernels it would compile",
    ),
]

TARGET = GPUTarget("cuda", 90, 32)
#: Scalar arguments' types (pointers are float64 but for the rows' own tensors).
INTS = {"n", "n_row", "nb", "chunks", "B", "src", "dst"}
FLOATS = {"a_hi", "a_lo"}
ROWS = {"x_ptr", "y_ptr", "v_ptr", "gx_ptr"}
ELEMENT = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16"}


def _compile(kernel, rows, constexprs):  # noqa: ANN001
    """Compiles ``kernel`` with rows of element type ``rows`` (a tl dtype) and the constexprs."""
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INTS:
            signature[name] = "i32"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "*" + (ELEMENT[rows] if name in ROWS else "fp64")
    source = ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
    )
    compiled = triton.compile(source, target=TARGET, options={"enable_fp_fusion": False})
    assert compiled.asm["cubin"]


@pytest.fixture(scope="module")
def tri():
    from softtopk.threshold import _triton

    return _triton


LINKS = pytest.mark.parametrize("link", [0, 1, 2, 3], ids=["clip", "power", "logistic", "laplace"])


@LINKS
@pytest.mark.parametrize("onchip", [True, False], ids=["one program", "chunks"])
def test_forward_kernel_compiles(tri, link, onchip):
    _compile(
        tri._forward_kernel,
        tl.float32,
        dict(
            LINK=link,
            LOW=tl.float32,
            NARROW=True,
            ITER_LOW=tri.ITER_LOW,
            ITER_F64=tri.ITER_F64,
            BLOCK=1024 if onchip else tri.CHUNK,
            ONCHIP=onchip,
            FINISH=not onchip,
        ),
    )


@pytest.mark.parametrize("rows", [tl.float64, tl.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("link", [1, 2], ids=["power", "logistic"])
def test_forward_kernel_compiles_for_other_dtypes(tri, link, rows):
    wide = rows == tl.float64
    _compile(
        tri._forward_kernel,
        rows,
        dict(
            LINK=link,
            LOW=tl.float64 if wide else tl.float32,
            NARROW=not wide,
            ITER_LOW=tri.ITER_LOW,
            ITER_F64=tri.ITER_F64,
            BLOCK=256,
            ONCHIP=True,
            FINISH=False,
        ),
    )


@LINKS
def test_split_route_kernels_compile(tri, link):
    block = tri.SPLIT_BLOCK
    for first in (True, False):
        _compile(
            tri._split_step_kernel,
            tl.float32,
            dict(LINK=link, LOW=tl.float32, BLOCK=block, RBLOCK=128, NPOINT=tri.SPLIT_POINTS, FIRST=first),
        )
    _compile(tri._split_write_kernel, tl.float32, dict(LINK=link, NARROW=True, BLOCK=block))
    if link == 0:
        _compile(tri._split_scan_kernel, tl.float32, dict(LOW=tl.float32, BLOCK=block))


@LINKS
def test_backward_kernels_compile(tri, link):
    for onchip in (True, False):
        block = 1024 if onchip else tri.CHUNK
        _compile(tri._backward_kernel, tl.float32, dict(LINK=link, DT=tl.float64, BLOCK=block, ONCHIP=onchip))
    block = tri.SPLIT_BLOCK
    _compile(tri._split_backward_sums_kernel, tl.float32, dict(LINK=link, DT=tl.float64, BLOCK=block))
    _compile(tri._split_backward_kernel, tl.float32, dict(LINK=link, DT=tl.float64, BLOCK=block, RBLOCK=128))

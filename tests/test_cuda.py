"""CUDA: the same code on the GPU gives the CPU's answers. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import softtopk
from softtopk.registry import OPERATORS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", list(OPERATORS))
@pytest.mark.parametrize("n", [50, 5000, 200_000])
def test_cuda_matches_cpu(name, n):
    op = OPERATORS[name]
    if op.stochastic:
        pytest.skip(
            "CPU and CUDA generators draw different noise (tests/test_ops_cuda.py uses explicit noise)"
        )
    if op.bench_max_elements is not None and 4 * n > op.bench_max_elements:
        pytest.skip(f"more than {op.bench_max_elements} elements for an O(n^2)-memory operator")
    x = torch.randn(4, n, dtype=torch.float64)
    k = max(1, n // 100)
    y_cpu = op(x, k, temperature=0.1)
    xg = x.cuda().requires_grad_()
    y_gpu = op(xg, k, temperature=0.1)
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-9, rtol=0)
    v = torch.randn_like(x)
    y_gpu.backward(v.cuda())
    xc = x.clone().requires_grad_()
    op(xc, k, temperature=0.1).backward(v)
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_low_precision(dtype):
    x = torch.randn(16, 4096, device="cuda").to(dtype)
    y = softtopk.topk_mask(x, 32, temperature=0.1)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float().sum(-1), torch.full((16,), 32.0, device="cuda"), atol=0.2, rtol=0)

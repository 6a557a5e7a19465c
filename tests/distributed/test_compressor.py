"""The compressor and the memory on their own: selection, quantisers, DCT, messages, costs, checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from softtopk.distributed import (
    Communicator,
    CompressedAllReduce,
    Compressor,
    DDPCompressionState,
    ErrorFeedback,
    OuterStep,
    chunked_dct,
    chunked_idct,
    dequantize,
    quantize,
    randk_indices,
    topk_sparsify,
)


def spread(seed: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """Values over many binades (1e-12 .. 1e12), both signs, a few exact zeros and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(n, generator=g) * 24 - 12)
    x[:: max(1, n // 7)] = 0.0
    x[1 :: max(1, n // 5)] = 0.5
    return x.to(dtype)


def test_topk_sparsify_keeps_all_the_mass():
    acc = torch.randn(1000, dtype=torch.float64)
    for k in (0, 1, 10, 1000):
        values, indices, residual = topk_sparsify(acc, k)
        sent = torch.zeros_like(acc).index_put_((indices,), values)
        assert torch.equal(sent + residual, acc)
        assert indices.unique().numel() == k and int((residual != 0).sum()) == 1000 - k
        if 0 < k < 1000:
            assert acc[indices].abs().min() >= residual.abs().max()
    # a NaN is sent, not hidden in the residual
    x = torch.tensor([1.0, math.nan, -3.0])
    values, indices, residual = topk_sparsify(x, 1)
    assert indices.tolist() == [1] and not residual.isnan().any()


def test_randk_is_uniform_distinct_and_shared_by_seed():
    a = randk_indices(50, 10, generator=torch.Generator().manual_seed(3))
    b = randk_indices(50, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.unique().numel() == 10
    counts = torch.zeros(20)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[randk_indices(20, 5, generator=g)] += 1
    assert counts.sum() == 10_000 and (counts - 500).abs().max() < 100  # about 4.5 sigma
    comp = Compressor(density=0.2, method="randk", seed=7)
    acc = torch.randn(30)
    assert torch.equal(comp.select(acc, key=1, counter=4), comp.select(acc, key=1, counter=4))
    assert not torch.equal(comp.select(acc, key=1, counter=4), comp.select(acc, key=1, counter=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantise_8_bits_error_bound_and_exact_residual(dtype):
    for seed in range(20):
        v = spread(seed, 257, dtype)
        codes, step = quantize(v, 8)
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
        assert 64 <= int(codes.abs().max())  # a power-of-two step keeps at least 7 bits
        decoded = dequantize(codes, step, dtype)
        top = v.abs().max().double()
        assert (v.double() - decoded.double()).abs().max() <= top / 127  # bound of the docstring
        assert math.log2(step.item()).is_integer()
        # residual = v - decoded in the value's own dtype, checked exact against float64 and back
        residual = v - decoded
        assert torch.equal(residual.double(), v.double() - decoded.double())
        assert torch.equal(residual + decoded, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantise_2_bits_error_bound_and_exact_residual(dtype):
    for seed in range(20):
        v = spread(seed, 130, dtype)
        codes, step = quantize(v, 2)
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        s = step.double()
        mean = v.abs().double().mean()
        assert mean / math.sqrt(2) <= s <= mean * math.sqrt(2)  # the power of two nearest the mean
        decoded = dequantize(codes, step, dtype).double()
        err = (v.double() - decoded).abs()
        assert (err <= torch.maximum(s / 2, v.abs().double() - s)).all()
        residual = v - dequantize(codes, step, dtype)
        assert torch.equal(residual.double(), v.double() - decoded)  # no rounding in the subtraction


def test_quantise_edge_cases():
    codes, step = quantize(torch.zeros(5), 2)
    assert codes.abs().sum() == 0 and step.item() == 1.0
    codes, step = quantize(torch.tensor([1.0, math.inf]), 8)
    assert math.isnan(step.item()) and dequantize(codes, step).isnan().all()  # stays visible
    codes, step = quantize(torch.empty(0), 8)
    assert codes.numel() == 0


def test_two_bit_messages_pack_four_codes_per_byte():
    comp = Compressor(density=1.0, bits=2)
    acc = spread(1, 37)
    enc = comp.encode(acc, torch.float32)
    assert enc.payload.numel() == 10 + 37 * 4 + 4  # ceil(37 / 4) bytes of codes, int32 indices, the scale
    indices, values = comp.decode(enc.payload, 37, torch.float32, torch.float32)
    assert torch.equal(torch.zeros(37).index_put_((indices,), values), enc.sent)


def test_dct_matches_scipy_and_round_trips():
    x = torch.randn(37, dtype=torch.float64)
    coeffs = chunked_dct(x, 8)
    padded = np.concatenate([x.numpy(), np.zeros(3)]).reshape(-1, 8)
    assert np.allclose(coeffs.numpy().reshape(-1, 8), scipy.fft.dct(padded, type=2, norm="ortho", axis=1))
    assert coeffs.numel() == 40
    assert torch.allclose(coeffs.norm(), x.norm())  # orthonormal
    assert (chunked_idct(coeffs, 8, 37) - x).abs().max() < 1e-13
    x32 = torch.randn(1000)
    assert (chunked_idct(chunked_dct(x32, 64), 64, 1000) - x32).abs().max() < 1e-5


@pytest.mark.parametrize(
    "comp",
    [
        Compressor(density=0.1),
        Compressor(density=0.1, bits=8),
        Compressor(density=0.1, bits=2),
        Compressor(density=0.1, chunk=16),
        Compressor(density=0.1, method="randk"),
        Compressor(density=0.1, method="randk", bits=2),
    ],
    ids=["topk", "8bit", "2bit", "dct", "randk", "randk2bit"],
)
def test_messages_decode_to_what_was_sent_and_sizes_are_counted(comp):
    n = 300
    acc = comp.transform(torch.randn(n))
    m = acc.numel()
    enc = comp.encode(acc, torch.float32, key=0, counter=0)
    assert torch.equal(enc.sent + enc.residual, acc)  # exactly
    shared = enc.indices if enc.shared else None
    if comp.method == "randk" and comp.bits is None:
        indices, values = enc.indices, enc.payload
    else:
        indices, values = comp.decode(enc.payload, m, torch.float32, torch.float32, shared)
    assert torch.equal(torch.zeros(m).index_put_((indices,), values), enc.sent)
    assert enc.payload.numel() * enc.payload.element_size() == sum(comp.message_bytes(m, 4))


def test_bfloat16_values_travel_in_bfloat16_and_the_residual_keeps_the_rounding():
    comp = Compressor(density=0.5)
    acc = torch.randn(64, dtype=torch.float32)
    enc = comp.encode(acc, torch.bfloat16)
    assert enc.payload.numel() == 32 * (2 + 4)
    assert torch.equal(enc.sent + enc.residual, acc)
    assert enc.residual[enc.indices].abs().max() > 0  # the bfloat16 rounding stays in the memory


def test_wire_cost_and_dense_fallback_rule():
    assert Communicator.wire_bytes("all_reduce", 400, 2) == 400
    assert Communicator.wire_bytes("all_gather", 100, 3) == 200
    # W * sparse < 2 * dense decides; at density d, float32 pairs cost 8 d n bytes
    n = 1000
    for world in (2, 3, 4, 8):
        for density in (0.01, 0.1, 0.2, 0.3, 0.5, 0.9):
            sparse = sum(Compressor(density=density).message_bytes(n, 4))
            cheaper = Communicator.sparse_is_cheaper("all_gather", sparse, 4 * n, world)
            assert cheaper == (world * 8 * density * n < 2 * 4 * n), (world, density)
    assert Communicator.sparse_is_cheaper("all_gather", 10, 100, 1)  # one process: as for two
    with pytest.raises(ValueError, match="collective"):
        Communicator.wire_bytes("broadcast", 1, 2)


def test_error_feedback_memory():
    memory = ErrorFeedback(decay=0.5)
    x = torch.ones(3)
    assert memory.accumulate("a", x) == (x, None)
    memory.store("a", torch.tensor([2.0, 0.0, -2.0]))
    acc, carried = memory.accumulate("a", x)
    assert torch.equal(acc, torch.tensor([2.0, 1.0, 0.0])) and torch.equal(
        carried, torch.tensor([1.0, 0.0, -1.0])
    )
    acc, carried = memory.accumulate("a", torch.ones(4))  # another shape: dropped, not broadcast
    assert carried is None and memory.resets == 1 and "a" not in memory.residuals
    memory.store("b", torch.ones(2))
    memory.store("b", None)
    assert memory.pop("b") is None


def test_validation_errors():
    with pytest.raises(ValueError, match="density"):
        Compressor(density=0.0)
    with pytest.raises(ValueError, match="density"):
        Compressor(density=1.5)
    with pytest.raises(TypeError, match="density"):
        Compressor(density="0.1")
    with pytest.raises(ValueError, match="method"):
        Compressor(method="sortk")
    with pytest.raises(ValueError, match="bits"):
        Compressor(bits=4)
    with pytest.raises(TypeError, match="bits"):
        Compressor(bits=2.0)
    with pytest.raises(ValueError, match="chunk"):
        Compressor(chunk=1)
    with pytest.raises(TypeError, match="seed"):
        Compressor(seed=None)
    with pytest.raises(ValueError, match="decay"):
        ErrorFeedback(decay=0.0)
    with pytest.raises(TypeError, match="decay"):
        ErrorFeedback(decay=True)
    with pytest.raises(TypeError, match="compressor"):
        CompressedAllReduce(0.01)
    with pytest.raises(TypeError, match="error_feedback"):
        CompressedAllReduce(Compressor(), error_feedback=1)
    with pytest.raises(TypeError, match="dense_fallback"):
        CompressedAllReduce(Compressor(), dense_fallback=None)
    with pytest.raises(ValueError, match="warmup_steps"):
        DDPCompressionState(Compressor(), warmup_steps=-1)
    with pytest.raises(TypeError, match="warmup_steps"):
        DDPCompressionState(Compressor(), warmup_steps=1.5)
    with pytest.raises(ValueError, match="flat"):
        topk_sparsify(torch.randn(3, 3), 2)
    with pytest.raises(ValueError, match="k must be"):
        topk_sparsify(torch.randn(5), 6)
    with pytest.raises(TypeError, match="k must be"):
        topk_sparsify(torch.randn(5), 2.0)
    with pytest.raises(ValueError, match="multiple of chunk"):
        chunked_idct(torch.randn(5), 2, 5)
    with pytest.raises(ValueError, match="n must be"):
        chunked_idct(torch.randn(4), 2, 5)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="sync_every"):
        OuterStep(model.parameters(), opt, Compressor(), sync_every=0)
    with pytest.raises(ValueError, match="exactly the parameters"):
        OuterStep([model.weight], opt, Compressor(), sync_every=2)
    with pytest.raises(TypeError, match="outer_optimizer"):
        OuterStep(model.parameters(), "sgd", Compressor(), sync_every=2)
    with pytest.raises(ValueError, match="empty"):
        OuterStep([], opt, Compressor(), sync_every=2)

"""The DDP hook in spawned gloo processes: nothing lost, averages right, density 1 is DDP bit for bit.

Each world size spawns its processes once (a module fixture) and runs every scenario
there; the workers return the figures the tests assert on.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from softtopk.distributed import CompressedAllReduce, Compressor, DDPCompressionState, ddp_compression_hook

from ._spawn import spawn


class Shuffled(torch.nn.Module):
    """Four layers registered in another order than the forward uses them (DDP rebuilds its buckets)."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c = torch.nn.Linear(48, 48)
        self.a = torch.nn.Linear(32, 48)
        self.d = torch.nn.Linear(48, 10)
        self.b = torch.nn.Linear(48, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def _batch(rank: int, step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _pieces(state: DDPCompressionState, index: int, flat: torch.Tensor) -> dict[object, torch.Tensor]:
    layout = state.layouts[index]
    return {key: piece for (key, _), piece in zip(layout, flat.split([n for _, n in layout]), strict=True)}


def _check_steps(rank: int, world: int, compressor: Compressor, steps: int, rewrap_at: int | None) -> dict:
    """Trains with the hook and checks, on every step and bucket, the identities of error feedback."""
    model = Shuffled()
    state = DDPCompressionState(compressor, record=True)
    ddp = DDP(model, bucket_cap_mb=0.01)
    ddp.register_comm_hook(state, ddp_compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    by_id = {id(p): p for p in model.parameters()}
    previous: dict[object, torch.Tensor] = {}
    worst = {"mass": 0.0, "carry": 0.0, "accumulate": 0.0, "average": 0.0, "grad": 0.0}
    buckets_seen, payload = set(), []
    for step in range(steps):
        if step == rewrap_at:  # forced re-bucketing: a new DDP with other buckets, the same state
            ddp = DDP(model, bucket_cap_mb=0.004)
            ddp.register_comm_hook(state, ddp_compression_hook)
        x, y = _batch(rank, step)
        opt.zero_grad()
        state.core.last.clear()  # only this step's buckets
        F.cross_entropy(ddp(x), y).backward()
        current: dict[object, torch.Tensor] = {}
        for index, rec in state.core.last.items():
            buckets_seen.add((step >= (rewrap_at or steps), index))
            exact = rec["sent"] + rec["residual"] - rec["acc"]
            worst["mass"] = max(worst["mass"], exact.abs().max().item())
            accumulated = compressor.transform(rec["grad"]) + rec["carried"]
            worst["accumulate"] = max(worst["accumulate"], (accumulated - rec["acc"]).abs().max().item())
            n = rec["grad"].numel()
            carried = _pieces(state, index, compressor.inverse(rec["carried"], n))
            for key, piece in carried.items():
                before = previous.get(key, torch.zeros_like(piece))
                worst["carry"] = max(worst["carry"], (piece - before).abs().max().item())
            current.update(_pieces(state, index, compressor.inverse(rec["residual"], n)))
            sent = [torch.empty_like(rec["sent"]) for _ in range(world)]
            dist.all_gather(sent, rec["sent"])
            mean = compressor.inverse(torch.stack(sent).sum(0) / world, n)
            worst["average"] = max(worst["average"], (rec["result"] - mean).abs().max().item())
            for key, piece in _pieces(state, index, rec["result"]).items():
                grad = by_id[key].grad.reshape(-1)
                worst["grad"] = max(worst["grad"], (grad - piece).abs().max().item())
        previous = current
        payload.append(state.core.traffic.history[-1]["payload"])
        opt.step()
    return {
        **worst,
        "rebuilds": state.rebuilds,
        "buckets": len(state.core.last),
        "steps": state.steps,
        "payload": payload,
        "sizes": {i: sum(n for _, n in layout) for i, layout in state.layouts.items()},
        "history": state.core.traffic.history,
        "sparse": state.core.traffic.sparse_messages,
        "dense": state.core.traffic.dense_messages,
    }


def _dense_equality(rank: int, world: int, steps: int = 4) -> dict:
    """Density 1 against DDP without a hook and with torch's allreduce_hook: parameters bit for bit."""
    params = {}
    for mode in ("plain", "allreduce_hook", "density1"):
        model = Shuffled()
        ddp = DDP(model, bucket_cap_mb=0.01)
        if mode == "allreduce_hook":
            ddp.register_comm_hook(None, allreduce_hook)
        elif mode == "density1":
            ddp.register_comm_hook(DDPCompressionState(Compressor(density=1.0)), ddp_compression_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(steps):
            x, y = _batch(rank, step)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        params[mode] = [p.detach().clone() for p in model.parameters()]
    # The averaged gradient itself against an all-gather of the local gradients.
    model, local = Shuffled(), Shuffled()
    ddp = DDP(model, bucket_cap_mb=0.01)
    ddp.register_comm_hook(DDPCompressionState(Compressor(density=1.0)), ddp_compression_hook)
    x, y = _batch(rank, 0)
    F.cross_entropy(ddp(x), y).backward()
    F.cross_entropy(local(x), y).backward()
    worst = 0.0
    for p, q in zip(model.parameters(), local.parameters(), strict=True):
        every = [torch.empty_like(q.grad) for _ in range(world)]
        dist.all_gather(every, q.grad)
        worst = max(worst, (p.grad - torch.stack(every).mean(0)).abs().max().item())
    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(params[a], params[b], strict=True))  # noqa: E731
    gap = max((u - v).abs().max().item() for u, v in zip(params["density1"], params["plain"], strict=True))
    return {
        "plain_gap": gap,
        "hook_vs_plain": same("density1", "plain"),
        "hook_vs_allreduce_hook": same("density1", "allreduce_hook"),
        "allreduce_hook_vs_plain": same("allreduce_hook", "plain"),
        "average_error": worst,
    }


def _half_core(rank: int, world: int) -> dict:
    """The core on bfloat16 tensors: memory in float32, still exact."""
    core = CompressedAllReduce(Compressor(density=0.1), record=True)
    worst = 0.0
    for step in range(3):
        g = torch.randn(200, generator=torch.Generator().manual_seed(step * 10 + rank)).to(torch.bfloat16)
        core.average("w", g).wait()
        rec = core.last["w"]
        worst = max(worst, (rec["sent"] + rec["residual"] - rec["acc"]).abs().max().item())
    return {"mass": worst, "dtype": str(core.memory.residuals["w"].dtype), "out": str(g.dtype)}


def _all(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    out = {"dense": _dense_equality(rank, world), "half": _half_core(rank, world)}
    configs = {
        "topk": (Compressor(density=0.05), 4, 2),
        "topk2bit": (Compressor(density=0.05, bits=2), 4, 2),
        "topk8bit_dct": (Compressor(density=0.1, bits=8, chunk=16), 3, None),
        "randk": (Compressor(density=0.05, method="randk"), 3, None),
        "randk2bit": (Compressor(density=0.05, method="randk", bits=2), 3, None),
        "fallback": (Compressor(density=0.6), 2, None),
    }
    for name, (comp, steps, rewrap) in configs.items():
        out[name] = _check_steps(rank, world, comp, steps, rewrap)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2 processes", "3 processes"])
def runs(request):
    return request.param, spawn(_all, request.param)


@pytest.mark.slow
def test_density_one_is_ddp_bit_for_bit(runs):
    world, results = runs
    for r in results:
        d = r["dense"]
        assert d["hook_vs_allreduce_hook"]
        # DDP without a hook multiplies by 1 / W, torch's allreduce_hook divides by W: the
        # same for W = 2, a last-bit difference for W = 3 (measured; the hook follows
        # allreduce_hook).
        assert d["hook_vs_plain"] == d["allreduce_hook_vs_plain"] == (world == 2)
        assert d["plain_gap"] < 1e-6
        assert d["average_error"] < 1e-7  # the mean of the local gradients


@pytest.mark.slow
@pytest.mark.parametrize("name", ["topk", "topk2bit", "topk8bit_dct", "randk", "randk2bit", "fallback"])
def test_no_mass_lost_on_any_step_or_bucket(runs, name):
    world, results = runs
    for r in results:
        c = r[name]
        assert c["buckets"] >= 2
        assert c["mass"] == 0.0  # sent + residual == accumulated, exactly
        assert c["accumulate"] == 0.0  # accumulated == gradient + carried residual
        if name == "topk8bit_dct":
            assert c["carry"] < 1e-6  # residuals back through the inverse DCT: exact up to rounding
        else:
            assert c["carry"] == 0.0  # carried == last step's residual of the same parameters
        assert c["average"] < 1e-6 and c["grad"] == 0.0  # every rank's contribution averaged
        assert c["steps"] == len(c["payload"])


@pytest.mark.slow
def test_rebucketing_keeps_the_residual(runs):
    world, results = runs
    for r in results:
        assert r["topk"]["rebuilds"] >= 1 and r["topk2bit"]["rebuilds"] >= 1  # the forced re-bucketing
        assert r["topk"]["carry"] == 0.0


@pytest.mark.slow
def test_bytes_and_dense_fallback(runs):
    world, results = runs
    r = results[0]
    c = r["topk"]
    for step in c["history"][-1:]:  # the layout of the last step
        sizes = c["sizes"].values()
        expected = sum(math.ceil(0.05 * n) * (4 + 4) for n in sizes)  # float32 value + int32 index
        assert step["payload"] == expected
        assert step["wire"] == (world - 1) * expected  # an all-gather sends every byte to W - 1 ranks
        assert step["dense"] == 4 * sum(sizes)
        assert step["dense_wire"] == pytest.approx(2 * (world - 1) / world * 4 * sum(sizes))
    q = r["topk2bit"]["history"][-1]
    sizes = r["topk2bit"]["sizes"].values()
    assert q["payload"] == sum(
        math.ceil(math.ceil(0.05 * n) / 4) + 4 * math.ceil(0.05 * n) + 4 for n in sizes
    )
    k = r["randk"]["history"][-1]
    assert k["payload"] == sum(4 * math.ceil(0.05 * n) for n in r["randk"]["sizes"].values())  # no indices
    # density 0.6: pairs cost W * 8 * 0.6 n > 2 * 4 n bytes, so every bucket goes dense
    assert r["fallback"]["sparse"] == 0 and r["fallback"]["dense"] > 0
    assert r["topk"]["dense"] == 0


@pytest.mark.slow
def test_half_precision_memory_is_float32_and_exact(runs):
    world, results = runs
    for r in results:
        assert r["half"]["mass"] == 0.0
        assert r["half"]["dtype"] == "torch.float32" and r["half"]["out"] == "torch.bfloat16"

"""The FSDP2 replica hook: FSDP2 (fully_shard) runs on CPU with gloo, so the hook is tested in place.

Two processes form two replicas of shard size 1 (``mesh["shard"]`` is 1-D); the hook does the
replica all-reduce. Native HSDP (the 2-D mesh) is the dense reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from softtopk.distributed import Compressor, register_fsdp_replica_hooks

from ._spawn import spawn


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _shard(model: torch.nn.Module, mesh) -> torch.nn.Module:  # noqa: ANN001
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.full_tensor().clone() for p in model.parameters()]


def _step(model: torch.nn.Module, rank: int, step: int) -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 * step + rank))
    model(x).square().sum().backward()


def _worker(rank: int, world: int) -> dict:
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    replicas = mesh2["replicate"].get_group()
    out: dict[str, object] = {}
    # dense reference: native HSDP (FSDP all-reduces over the replicas itself)
    native = _shard(_model(), mesh2)
    _step(native, rank, 0)
    reference = _grads(native)
    # the local gradient, averaged by hand
    local = _model()
    _step(local, rank, 0)
    mean = []
    for p in local.parameters():
        every = [torch.empty_like(p.grad) for _ in range(world)]
        dist.all_gather(every, p.grad)
        mean.append(torch.stack(every).mean(0))
    # density 1 through the hook equals native HSDP
    dense = _shard(_model(), mesh2["shard"])
    register_fsdp_replica_hooks(dense, Compressor(density=1.0), process_group=replicas)
    _step(dense, rank, 0)
    got = _grads(dense)
    out["dense_vs_native"] = max((a - b).abs().max().item() for a, b in zip(got, reference, strict=True))
    out["dense_vs_mean"] = max((a - b).abs().max().item() for a, b in zip(got, mean, strict=True))
    # top-k 2-bit: nothing lost per module and step, and the gradient is the replicas' mean of what was sent
    model = _shard(_model(), mesh2["shard"])
    core = register_fsdp_replica_hooks(
        model, Compressor(density=0.1, bits=2), process_group=replicas, record=True
    )
    worst = {"mass": 0.0, "average": 0.0, "carry": 0.0}
    previous: dict[str, torch.Tensor] = {}
    for step in range(3):
        model.zero_grad()
        _step(model, rank, step)
        for key, rec in core.last.items():
            worst["mass"] = max(
                worst["mass"], (rec["sent"] + rec["residual"] - rec["acc"]).abs().max().item()
            )
            if key in previous:
                worst["carry"] = max(worst["carry"], (rec["carried"] - previous[key]).abs().max().item())
            previous[key] = rec["residual"].clone()
            sent = [torch.empty_like(rec["sent"]) for _ in range(world)]
            dist.all_gather(sent, rec["sent"], group=replicas)
            worst["average"] = max(
                worst["average"], (rec["result"] - torch.stack(sent).mean(0)).abs().max().item()
            )
        flat = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
        results = torch.cat([core.last[k]["result"] for k in ("0", "2")])
        worst["grad"] = max(worst.get("grad", 0.0), (flat - results).abs().max().item())
    out.update(worst)
    out["keys"] = sorted(core.last)
    out["steps"] = core.traffic.steps
    try:
        register_fsdp_replica_hooks(native, Compressor(), process_group=replicas)
    except ValueError as err:
        out["native_error"] = str(err)
    return out


@pytest.mark.slow
def test_fsdp2_replica_hook_on_gloo():
    for r in spawn(_worker, 2):
        assert r["dense_vs_native"] == 0.0 and r["dense_vs_mean"] < 1e-6
        assert r["keys"] == ["0", "2"]  # one memory per FSDP module with parameters
        assert (
            r["mass"] == 0.0 and r["carry"] == 0.0
        )  # sent + residual == accumulated; carried == last residual
        assert r["average"] < 1e-6 and r["grad"] == 0.0
        assert r["steps"] == 2  # a step closes when a module comes again; the last is still open
        assert "native HSDP" in r["native_error"]

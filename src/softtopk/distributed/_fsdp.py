"""The FSDP2 adapter: the replica all-reduce of HSDP, compressed, through ``set_all_reduce_hook``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._compressor import Compressor
from ._core import CompressedAllReduce


class FSDPReplicaHook:
    """An FSDP2 all-reduce hook that averages the reduce-scatter output over the replicas.

    HSDP shards parameters within a group of ranks (the shard group, usually a node) and
    replicates them across groups; the replica all-reduce crosses the slow links. Shard
    the model with ``fully_shard(module, mesh=mesh["shard"])`` (the 1-D shard mesh, so
    FSDP does only the reduce-scatter, which already averages over the shard group) and
    let this hook do the replica all-reduce: FSDP calls it with the flat reduce-scatter
    output of each FSDP module, and the hook replaces it in place by its compressed
    average over ``process_group`` (the replicate group), with error feedback keyed by
    ``key``. Do not use it on a 2-D (native HSDP) mesh: FSDP then calls the hook after
    its own replica all-reduce; :func:`register_fsdp_replica_hooks` refuses such modules.

    Args:
        core: the :class:`CompressedAllReduce` (shared by the hooks of one model).
        key: the memory key of this module's reduce-scatter output.

    Example:
        >>> from softtopk.distributed import CompressedAllReduce, Compressor, FSDPReplicaHook
        >>> hook = FSDPReplicaHook(CompressedAllReduce(Compressor(density=0.01)), "layers.0")
        >>> hook.key
        'layers.0'

    Reference: Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
    Parallel" (HSDP).
    """

    def __init__(self, core: CompressedAllReduce, key: str) -> None:
        if not isinstance(core, CompressedAllReduce):
            raise TypeError(f"core must be a CompressedAllReduce, got {type(core).__name__}")
        self.core = core
        self.key = key

    def __call__(self, reduce_output: Tensor) -> None:
        self.core.average(self.key, reduce_output).wait()


def register_fsdp_replica_hooks(
    module: nn.Module,
    compressor: Compressor,
    *,
    process_group: Any,
    error_feedback: bool = True,
    decay: float = 1.0,
    dense_fallback: bool = True,
    record: bool = False,
) -> CompressedAllReduce:
    r"""Sets a :class:`FSDPReplicaHook` on every FSDP2 module inside ``module``.

    .. math::

        g \leftarrow \frac1R \sum_{\rho=1}^{R} C\bigl(g_\rho + e_\rho\bigr)

    over the R replicas, after FSDP's reduce-scatter has averaged g over the shard
    group, so g ends as the average over all R x S ranks.

    Args:
        module: a model whose submodules (and itself) may be ``fully_shard``-ed.
        compressor: the :class:`~softtopk.distributed.Compressor`.
        process_group: the replicate group (``mesh["replicate"].get_group()``).
        error_feedback: keep the unsent mass per FSDP module.
        decay: the memory's decay in (0, 1].
        dense_fallback: all-reduce densely when that is cheaper.
        record: keep the last call's tensors per module (``core.last``).

    Raises:
        ValueError: for a module sharded on a 2-D mesh (native HSDP: FSDP all-reduces
            over the replicas itself, before the hook).

    Returns:
        The shared :class:`CompressedAllReduce` (``.traffic`` counts the bytes); memory
        keys are the modules' qualified names (``""`` for ``module`` itself).

    Example:
        >>> import torch
        >>> from softtopk.distributed import Compressor, register_fsdp_replica_hooks
        >>> register_fsdp_replica_hooks(torch.nn.Linear(2, 2), Compressor(), process_group=None).memory.decay
        1.0
    """
    from torch.distributed.fsdp import FSDPModule

    core = CompressedAllReduce(
        compressor,
        error_feedback=error_feedback,
        decay=decay,
        dense_fallback=dense_fallback,
        process_group=process_group,
        record=record,
    )
    for name, sub in module.named_modules():
        if not isinstance(sub, FSDPModule):
            continue
        for p in sub.parameters():
            mesh = getattr(p, "device_mesh", None)
            if mesh is not None and mesh.ndim > 1:
                raise ValueError(
                    f"module {name or '<root>'} is sharded on a {mesh.ndim}-D mesh (native HSDP): FSDP "
                    "all-reduces over the replicas before the hook; shard on mesh['shard'] instead"
                )
        sub.set_all_reduce_hook(FSDPReplicaHook(core, name))
    return core

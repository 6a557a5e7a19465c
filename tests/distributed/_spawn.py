"""Runs a function in W spawned gloo processes on this machine and returns every rank's result."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, fn, kwargs) -> None:  # noqa: ANN001
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = fn(rank, world, **kwargs)
        torch.save(out, os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, **kwargs) -> list:  # noqa: ANN001
    """``[fn(rank, world, **kwargs) for rank in range(world)]``, each rank in its own process."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, _free_port(), folder, fn, kwargs), nprocs=world)
        return [torch.load(os.path.join(folder, f"{r}.pt"), weights_only=False) for r in range(world)]

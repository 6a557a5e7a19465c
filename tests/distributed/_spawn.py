"""Runs a function in W spawned gloo processes on this machine and returns every rank's result.

Each rank writes its result, meets the others at a barrier, destroys its process groups and
leaves with ``os._exit(0)``: interpreter finalisation can otherwise abort a gloo process
("terminate called without an active exception", a worker thread destroyed while joinable)
after the work is done. A rank that dies by a signal anyway is retried once, as a whole
run, only when every rank had written its result before the crash; any other failure, and a
second crash, fail the test.
"""

from __future__ import annotations

import os
import socket
import tempfile
import warnings

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
    out = fn(rank, world, **kwargs)
    torch.save(out, os.path.join(folder, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def spawn(fn, world: int, **kwargs) -> list:  # noqa: ANN001
    """``[fn(rank, world, **kwargs) for rank in range(world)]``, each rank in its own process."""
    for last_try in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            files = [os.path.join(folder, f"{r}.pt") for r in range(world)]
            try:
                mp.spawn(_worker, args=(world, _free_port(), folder, fn, kwargs), nprocs=world)
            except mp.ProcessExitedException as err:
                if last_try or err.signal_name is None or not all(map(os.path.exists, files)):
                    raise
                warnings.warn(f"gloo teardown crashed ({err}); running again", stacklevel=2)
            else:
                return [torch.load(f, weights_only=False) for f in files]
    return []  # not reached: the last try returns or raises

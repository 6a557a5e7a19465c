"""(h) Compressed data-parallel training: final loss against bytes on the wire.

An MLP on Fashion-MNIST trained by W gloo processes on this machine (each rank its own
shard of the training split, the same number of steps and samples for every scheme):
dense all-reduce (DDP), PowerSGD (torch's ``powerSGD_hook``, rank 4, error feedback and
warm start, 10 dense steps first), top-k with error feedback at 10 %, 1 % and 0.1 %
density with float32 or 2-bit values (``softtopk.distributed.ddp_compression_hook``),
and DiLoCo (inner SGD steps without communication, every H steps the pseudo-gradient
averaged, dense or as top-k 1 % with 2-bit values, then an outer Nesterov step,
``softtopk.distributed.OuterStep``). Bytes are what each rank sends under the ring model
of ``softtopk.distributed.Communicator`` (an all-reduce of b bytes: 2 (W - 1) b / W; an
all-gather: (W - 1) b), divided by the dense all-reduce's; losses are divided by the
dense run's of the same seed.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load
from ._common import Split, mlp, pretty
from ._runner import Method, RunResult, Setting, SettingResult

NAME = "distributed"
#: Every scheme runs one fixed configuration (plain SGD, lr 0.1): the comparison is of
#: compressors at equal training settings, so ``--grid`` does not apply here.
FIXED_CONFIGURATION = True
TITLE = "(h) Compressed data-parallel training"


@dataclass(frozen=True)
class Config:
    """Data, model, processes and training budget."""

    dataset: str = "fashion-mnist"
    hidden: tuple[int, ...] = (256,)
    train_size: int | None = None
    test_size: int | None = None
    world: int = 2
    steps: int = 1000
    batch: int = 64  # per rank
    lr: float = 0.1
    # Heavy-ball momentum applied after the exchange turns error feedback's delayed bursts into
    # divergence (measured with 0.9: top-k 1 % 2-bit and DiLoCo reached losses above 1e6; momentum
    # correction as in Deep Gradient Compression would be needed), so plain SGD for every scheme.
    momentum: float = 0.0
    sync_every: int = 10  # DiLoCo's H
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    evals: int = 10
    eval_rows: int = 5000


SIZES: dict[str, list[Config]] = {
    "toy": [Config(dataset="digits", hidden=(32,), steps=60, batch=32, sync_every=5, evals=3, eval_rows=500)],
    "default": [Config()],
}

#: scheme name -> (kind, density, bits); kinds: "dense", "powersgd", "topk", "diloco".
SCHEMES: dict[str, tuple[str, float, int | None]] = {
    "dense all-reduce": ("dense", 1.0, None),
    "PowerSGD rank 4": ("powersgd", 1.0, None),
    "top-k 10% + EF": ("topk", 0.1, None),
    "top-k 1% + EF": ("topk", 0.01, None),
    "top-k 0.1% + EF": ("topk", 0.001, None),
    "top-k 10% + EF, 2-bit": ("topk", 0.1, 2),
    "top-k 1% + EF, 2-bit": ("topk", 0.01, 2),
    "top-k 0.1% + EF, 2-bit": ("topk", 0.001, 2),
    "DiLoCo (dense outer)": ("diloco", 1.0, None),
    "DiLoCo, top-k 1% + EF, 2-bit outer": ("diloco", 0.01, 2),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = torch.cat([model(x[i : i + 4096]) for i in range(0, len(x), 4096)])
    return F.cross_entropy(out, y).item(), (out.argmax(-1) == y).float().mean().item()


def _powersgd(world: int):  # noqa: ANN202
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as P

    state = P.PowerSGDState(
        process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=10, use_error_feedback=True
    )
    counts = {"wire": 0.0}

    def hook(s, bucket):  # noqa: ANN001, ANN202 (DDP reads annotations; this module's are strings)
        if s.iter < s.start_powerSGD_iter:
            size = bucket.buffer().numel() * bucket.buffer().element_size()
        else:
            before = s.total_numel_after_compression
            fut = P.powerSGD_hook(s, bucket)
            size = (s.total_numel_after_compression - before) * bucket.buffer().element_size()
            counts["wire"] += 2.0 * (world - 1) * size / world  # P, Q and small tensors: all-reduces
            return fut
        counts["wire"] += 2.0 * (world - 1) * size / world
        return P.powerSGD_hook(s, bucket)

    return state, hook, counts


def _train(rank: int, cfg: Config, split: dict[str, Tensor], scheme: str, seed: int) -> dict[str, object]:
    from ..distributed import Compressor, DDPCompressionState, OuterStep, ddp_compression_hook

    kind, density, bits = SCHEMES[scheme]
    world = cfg.world
    torch.manual_seed(seed)
    model = mlp([split["x_train"].shape[1], *cfg.hidden, int(split["classes"])])
    n_params = sum(p.numel() for p in model.parameters())
    net: nn.Module = model
    counter = None
    if kind == "diloco":
        outer = torch.optim.SGD(
            model.parameters(), lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=True
        )
        sync = OuterStep(
            model.parameters(), outer, Compressor(density=density, bits=bits), sync_every=cfg.sync_every
        )
    else:
        net = nn.parallel.DistributedDataParallel(model)
        if kind == "powersgd":
            state, hook, counter = _powersgd(world)
            net.register_comm_hook(state, hook)
        else:
            ddp_state = DDPCompressionState(Compressor(density=density, bits=bits))
            net.register_comm_hook(ddp_state, ddp_compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    x, y = split["x_train"][rank::world], split["y_train"][rank::world]
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    order = torch.randperm(len(y), generator=g)
    at, curve, every = 0, [], max(1, cfg.steps // cfg.evals)
    start = time.perf_counter()
    for step in range(cfg.steps):
        if at + cfg.batch > len(order):
            order, at = torch.randperm(len(y), generator=g), 0
        idx = order[at : at + cfg.batch]
        at += cfg.batch
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if kind == "diloco":
            sync.step()
        if rank == 0 and (step + 1) % every == 0:
            curve.append(_evaluate(model, split["x_eval"], split["y_eval"])[0])
    seconds = time.perf_counter() - start
    if kind == "diloco":
        wire = sync.core.traffic.wire_bytes
    elif kind == "powersgd":
        wire = counter["wire"]
    else:
        wire = ddp_state.core.traffic.wire_bytes
    dense_wire = cfg.steps * 2.0 * (world - 1) * 4 * n_params / world
    out: dict[str, object] = {"wire": wire, "bytes": wire / dense_wire, "seconds": seconds, "curve": curve}
    if rank == 0:
        out["train loss"], _ = _evaluate(model, split["x_train"], split["y_train"])
        out["test loss"], out["test accuracy"] = _evaluate(model, split["x_test"], split["y_test"])
        out["val accuracy"] = _evaluate(model, split["x_val"], split["y_val"])[1]
    return out


def _worker(rank: int, cfg: Config, port: int, split: dict[str, Tensor], seed: int, folder: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cfg.world)
    try:
        results = {scheme: _train(rank, cfg, split, scheme, seed) for scheme in SCHEMES}
        if rank == 0:
            torch.save(results, os.path.join(folder, "results.pt"))
        dist.barrier()  # no rank tears gloo down while the other still holds its connections
    finally:
        dist.destroy_process_group()
    # The work is done and saved. Interpreter finalisation can abort a gloo process ("terminate
    # called without an active exception": a worker thread destroyed while joinable; about one
    # run in ten without the barrier), so the rank exits without finalising.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_seed(cfg: Config, split: dict[str, Tensor], seed: int) -> dict[str, dict[str, object]]:
    """Every scheme for one seed, in ``cfg.world`` spawned gloo processes; rank 0's figures."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(cfg, _free_port(), split, seed, folder), nprocs=cfg.world)
        return torch.load(os.path.join(folder, "results.pt"), weights_only=False)


def plot_tradeoff(result: SettingResult, folder: Path, stem: str) -> list[Path]:
    """Loss ratio against bytes ratio (log scale), one point per scheme with its seed spread."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result.rows:
        bx, ly = row.mean["bytes / dense"], row.mean["loss / dense"]
        ax.errorbar(
            bx,
            ly,
            xerr=row.std.get("bytes / dense", 0.0),
            yerr=row.std.get("loss / dense", 0.0),
            fmt="s" if row.group == "baseline" else "o",
            capsize=3,
            label=row.method,
        )
    ax.set_xscale("log")
    ax.axhline(1.0, color="#888888", lw=0.8, ls="--")
    ax.set_xlabel("bytes sent per rank / dense all-reduce (log)")
    ax.set_ylabel(f"final training loss / dense (mean ± std, {result.seeds} seeds)")
    ax.set_title(result.setting.title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = folder / f"{stem}-tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def make_setting(cfg: Config, *, data_dir=None) -> Setting:  # noqa: ANN001
    data = load(cfg.dataset, data_dir)
    s = Split(data, train_size=cfg.train_size, test_size=cfg.test_size)
    g = torch.Generator().manual_seed(4321)
    sub = torch.randperm(len(s.y_train), generator=g)[: cfg.eval_rows]
    split = {
        "x_train": s.x_train,
        "y_train": s.y_train,
        "x_val": s.x_val,
        "y_val": s.y_val,
        "x_test": s.x_test,
        "y_test": s.y_test,
        "x_eval": s.x_train[sub],
        "y_eval": s.y_train[sub],
        "classes": torch.tensor(s.classes),
    }
    cache: dict[int, dict[str, dict[str, object]]] = {}

    def run(scheme: str):  # noqa: ANN202
        def go(temperature: float | None, seed: int) -> RunResult:
            if seed not in cache:
                cache[seed] = run_seed(cfg, split, seed)
            r, dense = cache[seed][scheme], cache[seed]["dense all-reduce"]
            return RunResult(
                test={
                    "loss / dense": float(r["train loss"]) / float(dense["train loss"]),
                    "bytes / dense": float(r["bytes"]),
                    "test accuracy": float(r["test accuracy"]),
                    "train loss": float(r["train loss"]),
                },
                val={"accuracy": float(r["val accuracy"])},
                losses=[float(v) for v in r["curve"]],
                seconds=float(r["seconds"]),
                cpu_seconds=float(r["seconds"]),
                extra={"wire_bytes": r["wire"], "test loss": r["test loss"], "config": asdict(cfg)},
            )

        return go

    sizes = [s.features, *cfg.hidden, s.classes]
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    methods = [
        Method(name, "baseline" if kind in ("dense", "powersgd") else "operator", run(name))
        for name, (kind, _, _) in SCHEMES.items()
    ]
    dense_mb = 2 * (cfg.world - 1) * 4 * n_params / cfg.world / 2**20
    return Setting(
        key=f"{cfg.dataset}-W{cfg.world}",
        title=f"{pretty(cfg.dataset)}, {cfg.world} gloo processes, {cfg.steps} steps",
        methods=methods,
        select="accuracy",
        metrics=["loss / dense", "bytes / dense", "test accuracy", "train loss"],
        description=(
            f"MLP {'-'.join(map(str, sizes))} ({n_params} parameters), SGD lr {cfg.lr:g} momentum "
            f"{cfg.momentum:g}, batch {cfg.batch} per rank, {cfg.steps} steps on {len(s.y_train)} rows split "
            f"across {cfg.world} ranks; DiLoCo: H = {cfg.sync_every}, outer Nesterov SGD lr {cfg.outer_lr:g} "
            f"momentum {cfg.outer_momentum:g}. 'loss / dense': final training loss (whole training split) "
            f"over "
            f"the dense run's of the same seed; 'bytes / dense': bytes each rank sends over those of a dense "
            f"all-reduce ({dense_mb:.2f} MiB per step); test accuracy on {len(s.y_test)} rows. The "
            "temperature columns do not apply (no scheme has one). Time per run is the training loop of one "
            "scheme in its process."
        ),
        lower_is_better=("loss / dense", "bytes / dense", "train loss"),
        plots=plot_tradeoff,
    )


def settings(size: str = "default", *, only=None, grid=None, data_dir=None) -> list[Setting]:  # noqa: ANN001
    """The settings of this experiment at ``size`` (``"toy"`` or ``"default"``).

    ``only`` and ``grid`` do not apply (no scheme is a registered operator or has a temperature).
    """
    return [make_setting(c, data_dir=data_dir) for c in SIZES[size]]

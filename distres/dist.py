"""Ranks, devices and the process group. No other module reads the environment for ranks."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = ""
    """Set when the rendezvous address was derived (srun); torchrun exports its own."""
    master_port: int = 0
    local_world_size: int = 1
    """Ranks on this node (they share its cores)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[003-005,010],cpu1" -> "gpu003"."""
    head = nodelist.split(",", 1)[0] if "[" not in nodelist.split(",", 1)[0] else nodelist
    if "[" not in head:
        return head.strip()
    prefix, rest = head.split("[", 1)
    first = rest.split(",", 1)[0].split("]", 1)[0]
    return prefix + first.split("-", 1)[0]


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank, world size and local rank from torchrun's variables, else from Slurm's (srun with
    one task per GPU), else a single process.

    Under srun the rendezvous is derived: the first node of the job, and a port picked from the
    job id so that two jobs sharing a node do not collide (MASTER_ADDR/MASTER_PORT, when set,
    win).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        port = env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(port),
            # "8" or "8(x2)": tasks on each node
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1),
        )
    return DistEnv()


def pick_device(requested: str, local_rank: int) -> torch.device:
    """This rank's device. On a GPU the local rank indexes the GPUs this process sees; where a
    site binds one GPU per task (`--gpus-per-task=1`, `--gpu-bind`), each process sees only
    its own, as cuda:0."""
    from distres.config import ConfigError

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible")
    if not (requested == "cuda" or (requested == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank < count:
        index = local_rank
    elif count == 1:
        index = 0  # one visible GPU per task
    else:
        raise ConfigError(
            f"local rank {local_rank} but this process sees {count} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start "
            "one process per visible GPU, or bind one GPU per task"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextmanager
def process_group(
    env: DistEnv, device: torch.device, always: bool = False, timeout_s: float = 600
) -> Iterator[None]:
    """Init the default group for a multi-rank run (nccl on GPU, gloo on CPU); always torn
    down, also when training raises. always=True makes a one-rank group for a single process
    too (DeepSpeed needs one)."""
    if (not env.distributed and not always) or dist.is_initialized():
        yield  # one process, or a group the caller made (distres.fit in a script) and keeps
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Derived (srun) rendezvous goes by TCP; torchrun's exported variables by env://.
    init_method = f"tcp://{env.master_addr}:{env.master_port}" if env.master_addr else "env://"
    if not env.distributed:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
        # A clean exit waits for every rank: a rank tearing gloo down while a peer still
        # sends can abort that peer ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def export_ranks(env: DistEnv, device: torch.device) -> None:
    """Export the ranks for a library that reads them from the environment (DeepSpeed):
    under srun or in one process nobody exported them."""
    for key, value in (
        ("LOCAL_RANK", env.local_rank),
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
    ):
        os.environ.setdefault(key, str(value))
    if device.type == "cuda":
        # DeepSpeed picks its GPU by LOCAL_RANK; with one visible GPU per task that index
        # is not this process's device (pick_device chose it).
        os.environ["LOCAL_RANK"] = str(device.index)


def from_main(value: Any, env: DistEnv) -> Any:
    """Rank 0's `value` on every rank (itself where there is one rank)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_run_dir(run_dir: Path, env: DistEnv) -> Path:
    """Rank 0's run directory on every rank (a default name holds rank 0's timestamp)."""
    if not env.distributed:
        return run_dir
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def average_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Average the floating-point buffers (BN running statistics) over all ranks, in one
    all-reduce of their concatenation rather than one per buffer. Frozen parts' buffers
    (model.freeze: the same on every rank) are left as they are."""
    bufs = [
        b
        for m in module.modules()
        if not getattr(m, "frozen_stats", False)
        for b in m.buffers(recurse=False)
        if b.is_floating_point()
    ]
    if not bufs or world_size == 1:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size)
    offset = 0
    for b in bufs:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()

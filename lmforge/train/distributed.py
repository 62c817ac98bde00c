"""Data-parallel training under ``torchrun``: one process per device, DDP gradient averaging.

``torchrun --nproc_per_node=N -m lmforge train ...`` starts N copies of the same command; each
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment. Process ``r`` of ``W``
trains on micro-batches ``r*A .. r*A+A-1`` of every step (``A`` = ``train.grad_accum``), so a run
on W processes takes the optimizer steps of one process with ``grad_accum = W*A``: the same
batches and schedule, the same weights up to float summation order (tests/test_distributed.py).
Process 0 alone writes the run directory (the checkpoint is the plain model, resumable with any
number of processes); the others wait for it at barriers. Time-budget decisions read process 0's
clock, so every process stops at the same step.

NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU, so the same path is tested without a GPU.
Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sync(self, elapsed: float, flag: bool, device: torch.device) -> tuple[float, bool]:
        """(process 0's ``elapsed``, whether ``flag`` is set on any process), the same everywhere.

        Time-based decisions (the time budget, planning the schedule) all read process 0's clock,
        so every process takes them at the same step.
        """
        if not self.active:
            return elapsed, flag
        t = torch.tensor([elapsed if self.main else float("-inf"), 1.0 if flag else 0.0], dtype=torch.float64,
                         device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0].item()), bool(t[1].item())

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over processes."""
        if not self.active:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.size


def world_from_env() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def setup(world: World, device: torch.device) -> torch.device:
    """Join the process group; returns this process's device (``cuda:LOCAL_RANK`` on CUDA)."""
    if not world.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                                device_id=device if device.type == "cuda" else None)
    return device


def teardown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` under DistributedDataParallel when there are several processes."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

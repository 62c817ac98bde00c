"""Data-parallel training under ``torchrun``: one process per device, DDP gradient averaging or
(``train.fsdp``) FSDP sharding.

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


class _Method(torch.nn.Module):
    """Runs one named method of a model (``classify``, say) as its forward, so that DDP sees the
    call and synchronises its gradients."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


def wrap(model: torch.nn.Module, world: World, device: torch.device,
         method: str = "forward") -> tuple[torch.nn.Module, object]:
    """(the module gradients are synchronised through, the callable a loss calls) for running
    ``model.<method>``: DistributedDataParallel when there are several processes, the model itself
    otherwise. A model already sharded by :func:`shard` has the method registered with FSDP."""
    call = model if method == "forward" else getattr(model, method)
    if is_sharded(model):
        if method != "forward":
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(model, method)
        return model, call
    if not world.active:
        return model, call
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model if method == "forward" else _Method(model, method),
                                  device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, ddp


# ------------------------------------------------------------------------------------------ FSDP
# With ``train.fsdp`` each transformer block, then the whole model, is sharded with FSDP2's
# ``fully_shard``: every process keeps 1/W of each parameter, gradient and optimizer moment and
# gathers a block's parameters just for its forward and backward. Checkpoints stay the plain
# single-file format: the full state is gathered (to process 0's CPU) to save, and loaded into
# the unsharded model (weights) and through ``set_optimizer_state_dict`` (moments) to resume.

def shard(model: torch.nn.Module) -> None:
    """Shard ``model`` in place (call before building the optimizer)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks():
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in its numbering (groups in order)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full model state (as ``state_dict_for_save``) and optimizer state dict (parameters
    numbered, as ``optimizer.state_dict()``) of a sharded model, on process 0 (the others get
    empty dicts). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Only the keys the model saves (a GPT's tied head is its token embedding, not stored twice).
    keep = set(model.state_dict_for_save())
    model_state = {k: v for k, v in get_model_state_dict(model, options=options).items() if k in keep}
    osd = get_optimizer_state_dict(model, optimizer, options=options)
    if not osd:  # with cpu_offload the full state lands on process 0 only
        return model_state, osd
    index = {n: i for i, n in enumerate(_names(model, optimizer))}
    state = {index[n]: st for n, st in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {k: v.contiguous() for k, v in model_state.items()}, {"state": state, "param_groups": groups}


def accumulating(trained: torch.nn.Module, world: World, last: bool):
    """The context for one micro-batch's forward and backward: gradients are reduced across
    processes only on the ``last`` micro-batch of a step. ``trained`` is the first of what
    :func:`wrap` returns."""
    from contextlib import nullcontext

    if not world.active or last:
        if is_sharded(trained):
            trained.set_requires_gradient_sync(True)
        return nullcontext()
    if is_sharded(trained):
        trained.set_requires_gradient_sync(False)
        return nullcontext()
    return trained.no_sync()


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a numbered optimizer state dict (a checkpoint's) into the optimizer of a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _names(model, optimizer)
    full = {"state": {names[i]: st for i, st in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))

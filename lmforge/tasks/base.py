"""The task protocol: what a task plugs into the one training loop (``train/trainer.py``).

A task owns its options (an ``Options`` dataclass, the config's ``task`` section), its data and
everything that depends on it: it resolves the parts of the config that the data decides
(vocabulary, labels, schedule length), builds the model, writes its own files into a new run
directory, cuts the batch of every (step, micro-batch) — a pure function of them, so that
``--resume`` is exact —, computes the loss, evaluates on its validation split and writes its
final artifacts. The loop owns everything else: devices, processes, optimizer, schedule, time
budget, logging, checkpoints, early stopping and best-checkpoint selection.

Life of a task in ``train()``::

    task = Task(cfg, run)           read and check the data (bad input: UserError, nothing written)
    cfg = task.resolve(cfg, world)  the config with what the data decides filled in
    model = task.build_model(cfg)   fresh or pretrained weights (on --resume: the checkpoint's)
    task.write_files(run, model)    a new run directory only
    task.to(device)
    loop: task.batch(step, micro) -> phase_loss(call, model, batch, phase) per phase -> evaluate(model, ctx)
          every eval_interval
    task.finish(run, model, ctx)    final reports; extra summary keys
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class Task:
    name = ""
    Options: type = object  # the task section's dataclass (must have a ``name`` field)
    # Config values the task brings, applied after the preset and before files and flags.
    DEFAULTS: dict[str, dict[str, Any]] = {}
    # Validation metrics it reports (as ``val_<name>``): what ``train.early_stop`` may watch.
    METRICS: tuple[str, ...] = ("loss",)
    LOWER_IS_BETTER: tuple[str, ...] = ("loss",)  # of METRICS; the others are better higher
    ARCHS: tuple[str, ...] = ("gpt",)  # the model families it trains; the first is the default
    method = "forward"  # the model method the loss calls (run through DDP/FSDP as the forward)
    unit = "tokens"  # what a step's throughput counts: tokens or examples
    supports_dp = False  # batches can be Poisson samples of examples (train.dp)

    @classmethod
    def validate_options(cls, cfg) -> None:
        """Reject out-of-range task options (called by ``config.validate``)."""

    def __init__(self, cfg, run=None):
        """``run``: the RunDir being resumed (None: a fresh start)."""
        self.cfg, self.run = cfg, run
        self.step_cap: int | None = None  # a schedule planned from a time budget stays within it

    @property
    def resume(self) -> bool:
        return self.run is not None

    def resolve(self, cfg, world):
        return cfg

    def build_model(self, cfg) -> torch.nn.Module:
        raise NotImplementedError

    def write_files(self, run, model) -> None:
        """Files the run needs besides weights and config (tokenizer, labels, chat template)."""

    def to(self, device: torch.device) -> None:
        self.device = device

    def units_per_step(self, cfg, world) -> int:
        raise NotImplementedError

    def eval_cost(self, cfg) -> float:
        """One evaluation's cost in training steps (for planning a schedule to a time budget)."""
        return 0.0

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """The CPU tensors of micro-batch ``micro`` of optimizer step ``step``."""
        raise NotImplementedError

    def loss(self, call: Callable, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        """The batch's mean loss. ``call`` runs ``model.<method>`` (through DDP when wrapped)."""
        raise NotImplementedError

    def phases(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """The parts of the model trained one after the other in each step, each by its own
        optimizer on its own loss (a GAN: the discriminator, then the generator), as (name,
        module); one phase, the whole model, for most tasks. Each gets the task's schedule."""
        return [("", model)]

    def phase_loss(self, call: Callable, model: torch.nn.Module, batch: tuple, phase: str) -> torch.Tensor:
        """The loss of ``phase`` (a name from :meth:`phases`) on the batch; :meth:`loss` by default."""
        return self.loss(call, model, batch)

    def evaluate(self, model: torch.nn.Module, ctx) -> dict[str, float]:
        """``val_<metric>`` figures on the validation split ({} when there is none)."""
        return {}

    def finish(self, run, model: torch.nn.Module, ctx) -> dict[str, Any]:
        """Final artifacts in ``run`` (process 0 only); returns extra keys for the summary."""
        return {}

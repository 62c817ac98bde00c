"""What the tasks that go through a fixed training set in epochs share (text and image
classification): the schedule's length from ``task.epochs`` (or the time budget, capped at those
epochs), one evaluation per epoch by default, and the batch of every (step, micro-batch).

Micro-batch ``g = step * micro_per_step + micro`` is batch ``g mod batches_per_epoch`` of epoch
``g // batches_per_epoch``. Each epoch's order comes from a generator seeded by (seed, epoch)
(:meth:`EpochTask.epoch_order`; a task may sort or oversample it), is cut into batches of
``batch_size`` (a last partial batch is dropped) and the batches are shuffled: a pure function of
the step, as an exact ``--resume`` needs. With ``train.dp`` each batch is a Poisson sample
instead (each example in with probability ``batch_size / N``, from (seed, step)).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmforge import config as cfgmod
from lmforge.tasks.base import Task


class EpochTask(Task):
    unit = "examples"
    supports_dp = True  # with train.dp, batches are Poisson samples (train/privacy.py)

    def plan_epochs(self, cfg, world, n_train: int) -> None:
        """The shapes of the schedule that depend on the data and the number of processes."""
        self.n_train = n_train
        self.B = min(cfg.train.batch_size, n_train)
        self.batches_per_epoch = max(1, n_train // self.B)
        self.micro_per_step = cfg.train.grad_accum * world.size
        if cfg.train.max_steps is None:  # planned from the time budget, within the planned epochs
            self.step_cap = self.epoch_steps(cfg)
        self._epoch, self._batches = None, []
        self.cfg = cfg
        # DP-SGD's accounting assumes Poisson sampling: every example in each batch with this probability.
        self.sample_rate = self.B / n_train if cfg.train.dp.epsilon is not None else None

    def epoch_steps(self, cfg) -> int:
        return max(1, math.ceil(cfg.task.epochs * self.batches_per_epoch / self.micro_per_step))

    def epoch_schedule(self, cfg):
        """``cfg`` with the schedule filled in: ``max_steps`` from the epochs (unless a step count
        or a time budget is given), a warm-up of at most a tenth of it, one evaluation per epoch
        unless ``train.eval_interval`` says otherwise."""
        t = cfg.train
        max_steps = t.max_steps
        if max_steps is None and t.max_seconds is None:
            max_steps = self.epoch_steps(cfg)
        per_epoch = max(1, round(self.batches_per_epoch / self.micro_per_step))
        return cfgmod.replace(cfg, train={
            "max_steps": max_steps,
            "warmup_steps": min(t.warmup_steps, max(1, (max_steps or self.epoch_steps(cfg)) // 10)),
            "eval_interval": per_epoch if t.eval_interval is None else t.eval_interval})

    def units_per_step(self, cfg, world) -> int:
        return self.B * cfg.train.grad_accum * world.size

    def epoch_order(self, gen: torch.Generator) -> torch.Tensor:
        """The training examples' order for one epoch (a permutation, unless a task samples)."""
        return torch.randperm(self.n_train, generator=gen)

    def _epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        seed = int(np.random.default_rng([self.cfg.train.seed, epoch]).integers(2**62))
        gen = torch.Generator().manual_seed(seed)
        order, B = self.epoch_order(gen), self.B
        cut = [order[s:s + B] for s in range(0, len(order) - B + 1, B)]
        return [cut[k] for k in torch.randperm(len(cut), generator=gen).tolist()]

    def batch_indices(self, step: int, micro: int) -> torch.Tensor:
        """The training examples of micro-batch ``micro`` of step ``step``."""
        if self.sample_rate is not None:
            from lmforge.train.privacy import poisson_batch

            return poisson_batch(self.cfg.train.seed, step, micro, self.n_train, self.sample_rate)
        epoch, i = divmod(step * self.micro_per_step + micro, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[i]

    def training_verdict(self, run) -> dict | None:
        """Did training stop while the validation ``train.early_stop`` figure was still improving
        (:func:`~lmforge.evaluate.classify.training_verdict`)? Said on stderr when it did."""
        from lmforge.evaluate.classify import training_verdict, verdict_line
        from lmforge.progress import status

        metric = self.cfg.train.early_stop
        verdict = training_verdict(run.path, metric, metric in self.LOWER_IS_BETTER)
        if verdict is not None and verdict_line(verdict):
            status(verdict_line(verdict))
        return verdict

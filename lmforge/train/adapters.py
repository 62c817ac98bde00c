"""How a LoRA run stores its weights: against its base, not beside a copy of it.

A LoRA fine-tune of a base (``--init`` RUN or Hugging Face directory) changes only its adapters
(and what the base lacks, such as a new classifier head). Its ``model.safetensors`` (and its
checkpoints) hold those tensors alone, PEFT's way, with the base named in the file's metadata:
``{"format": "lmforge-adapter", "base": PATH, "base_fingerprint": ...}``. Whatever loads the
weights (``load_run``, ``--resume``, the best weights at the end) goes through
:func:`full_state`, which reads the base again and lays the stored tensors over it. A base that
is gone, or changed since (its fingerprint), is a one-line error naming it; ``lmforge merge-lora``
writes a self-contained run.

Before: a LoRA run of SmolLM2-135M wrote all 135 M parameters at every checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lmforge.errors import UserError

ADAPTER_FORMAT = "lmforge-adapter"
_EDGE = 1 << 20  # bytes hashed at each end of a weights file


def weights_files(base: str | Path) -> list[Path]:
    """The safetensors files that hold a base's weights (a run's one file, or a Hugging Face directory's)."""
    from lmforge.runs import RunDir

    base = Path(base)
    if RunDir(base).is_run():
        return [RunDir(base).model]
    return sorted(base.glob("*.safetensors"))


def fingerprint(base: str | Path) -> str:
    """Sizes and both ends of the base's weights files: a retrained or replaced base of the same
    shape differs there, and reading two MiB per file keeps every load cheap."""
    h = hashlib.sha256()
    for f in weights_files(base):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_EDGE))
            if size > 2 * _EDGE:
                fh.seek(size - _EDGE)
                h.update(fh.read())
    return h.hexdigest()[:32]


class AdapterStore:
    """What a LoRA run with a base saves (:meth:`state`) and the metadata that names the base."""

    def __init__(self, base: str | Path):
        from lmforge.models import build_model
        from lmforge.tasks.finetune import base_model

        self.base = str(Path(base).resolve())
        arch, model_config = base_model(base)
        with torch.device("meta"):  # names only: no memory, no initialisation
            self.base_keys = set(build_model(arch, model_config).state_dict_for_save())
        self.metadata = {"format": ADAPTER_FORMAT, "base": self.base, "base_fingerprint": fingerprint(base)}

    @classmethod
    def of(cls, cfg) -> "AdapterStore | None":
        """The store of a run config with LoRA adapters on a base; None for any other run."""
        init = getattr(cfg.task, "init", None)
        return cls(init) if cfg.finetune.lora.r and init else None

    def state(self, model, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Of ``full`` (default ``model.state_dict_for_save()``): the adapters, what is trainable,
        and what the base does not hold."""
        full = model.state_dict_for_save() if full is None else full
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if ".lora_" in k or k in trainable or k not in self.base_keys}


def full_state(model, stored: dict[str, torch.Tensor], metadata: dict[str, str], source) -> dict[str, torch.Tensor]:
    """``stored`` as ``model.load_saved_state`` takes it: unchanged for a whole model's file, laid
    over the base's weights (those ``model`` has) for an adapter file."""
    if metadata.get("format") != ADAPTER_FORMAT:
        return stored
    from lmforge.tasks.finetune import load_base

    base = metadata.get("base", "")
    if not Path(base).exists():
        raise UserError(f"{source} holds LoRA adapters for the base {base}, which is gone: put it back there "
                        "(or train again); `lmforge merge-lora` makes a run that needs no base")
    if fingerprint(base) != metadata.get("base_fingerprint"):
        raise UserError(f"{source} holds LoRA adapters for the base {base}, whose weights changed since it was "
                        "trained: restore that base, or train the adapters again")
    base_state = load_base(base)[0].state_dict_for_save()
    wanted = model.state_dict_for_save().keys()
    return {**{k: v for k, v in base_state.items() if k in wanted}, **stored}


def weights_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors' own error type
        raise UserError(f"{path}: damaged or not a safetensors file ({str(e).splitlines()[0]})") from None

"""Checkpoints as plain tensors and JSON: nothing in a run directory needs unpickling.

- ``model.safetensors``: model weights (HF GPT-2 key names, tied head omitted).
- ``trainer_state.safetensors``: optimizer moments and RNG states as tensors.
- ``trainer_state.json``: step, counters, hook state, optimizer hyper-parameters.

Each file is written to a temporary name and renamed. The step is stored in all three so that a
checkpoint torn by a crash between renames is detected on resume rather than silently mixed.

When a finished run keeps its best weights (``train.keep_best``), ``model.safetensors`` holds
those (``state["model_step"]``, the step they are from) and the last step's weights, which a
``--resume`` continues from, travel in ``trainer_state.safetensors`` as ``model.*`` tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import UserError
from lmforge.fsutil import atomic_path, write_json

from lmforge.runs import RunDir

MODEL_FILE, STATE_TENSORS, STATE_JSON = RunDir.MODEL, RunDir.STATE_TENSORS, RunDir.STATE_JSON
LAST = "model."  # prefix of the last weights inside trainer_state.safetensors


def save_model(model, path: str | Path, metadata: dict[str, str] | None = None,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model.state_dict_for_save()`` (or ``state``, already in that form) to safetensors atomically."""
    with atomic_path(path) as tmp:
        save_file(state if state is not None else model.state_dict_for_save(), str(tmp), metadata=metadata or {})


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model weights not found: {path}")
    return load_file(str(path))


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer state dict (parameters numbered) as flat tensors and JSON-able groups."""
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{pid}.{name}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def save_checkpoint(run_dir: str | Path, model, optimizer, state: dict, model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Save model, optimizer, RNG and ``state`` (must hold ``step``) into ``run_dir``.

    ``model_state`` / ``optimizer_state`` replace ``model.state_dict_for_save()`` and
    ``optimizer.state_dict()`` when they were gathered elsewhere (sharded training). With
    ``state["model_step"]`` other than ``state["step"]``, ``model.safetensors`` is left alone (it
    holds the kept best weights) and the weights go into the trainer state instead."""
    run_dir = Path(run_dir)
    step = str(state["step"])
    weights = model_state if model_state is not None else model.state_dict_for_save()
    tensors, groups = _optimizer_tensors(optimizer_state if optimizer_state is not None else optimizer.state_dict())
    separate = state.get("model_step", state["step"]) != state["step"]
    if separate:
        tensors.update({LAST + k: v for k, v in weights.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    with atomic_path(run_dir / STATE_TENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"step": step})
    if not separate:
        save_model(model, run_dir / MODEL_FILE, metadata={"step": step, "format": "lmforge"}, state=weights)
    write_json(run_dir / STATE_JSON, {**state, "param_groups": groups})


def has_checkpoint(run_dir: str | Path) -> bool:
    return RunDir(run_dir).has_checkpoint()


def _step_of(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("step")


def load_checkpoint(run_dir: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from ``run_dir``; returns the JSON state.

    ``optimizer`` may be None (restored later, e.g. after sharding): the returned state then
    holds the optimizer state dict under ``"optimizer_state"``."""
    run_dir = Path(run_dir)
    if not has_checkpoint(run_dir):
        raise UserError(f"no checkpoint to resume in {run_dir} (needs {MODEL_FILE}, {STATE_TENSORS}, {STATE_JSON})")
    state = json.loads((run_dir / STATE_JSON).read_text(encoding="utf-8"))
    step, model_step = str(state["step"]), str(state.get("model_step", state["step"]))
    found = {"trainer_state.json": step, STATE_TENSORS: _step_of(run_dir / STATE_TENSORS),
             MODEL_FILE: _step_of(run_dir / MODEL_FILE)}
    if found[STATE_TENSORS] != step or found[MODEL_FILE] not in (step, model_step):
        raise UserError(f"checkpoint in {run_dir} is torn (files from different steps: {found})")
    tensors = load_file(str(run_dir / STATE_TENSORS))
    if model_step != step:  # the kept best weights are in model.safetensors; the last ones here
        model.load_saved_state({k[len(LAST):]: v for k, v in tensors.items() if k.startswith(LAST)})
    else:
        model.load_saved_state(load_model_state(run_dir / MODEL_FILE))
    opt_state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = t
    optimizer_state = {"state": opt_state, "param_groups": state.pop("param_groups")}
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    else:
        state["optimizer_state"] = optimizer_state
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    return state

"""Checkpoints as plain tensors and JSON: nothing in a run directory needs unpickling.

- ``model.safetensors``: model weights (HF GPT-2 key names, tied head omitted).
- ``trainer_state.safetensors``: optimizer moments and RNG states as tensors.
- ``trainer_state.json``: step, counters, hook state, optimizer hyper-parameters.

A checkpoint switches atomically: its files are written and fsynced in a staging directory
``.checkpoint-<step>.tmp/``, which is then renamed to ``.checkpoint-<step>/`` — the commit — and
only then are its files moved over the previous checkpoint's, one rename each, and the directory
removed. A kill before the commit leaves the previous checkpoint whole (the staging directory is
removed at the next start); a kill after it leaves a committed directory that
:func:`recover_checkpoint` (run before every resume) finishes moving. The step is also stored in
all three files, so that a checkpoint mixed any other way is refused rather than loaded.

When a finished run keeps its best weights (``train.keep_best``), ``model.safetensors`` holds
those (``state["model_step"]``, the step they are from) and the last step's weights, which a
``--resume`` continues from, travel in ``trainer_state.safetensors`` as ``model.*`` tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import UserError
from lmforge.fsutil import atomic_path

from lmforge.runs import RunDir
from lmforge.train.adapters import full_state, weights_metadata

MODEL_FILE, STATE_TENSORS, STATE_JSON = RunDir.MODEL, RunDir.STATE_TENSORS, RunDir.STATE_JSON
LAST = "model."  # prefix of the last weights inside trainer_state.safetensors


def save_model(model, path: str | Path, metadata: dict[str, str] | None = None,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model.state_dict_for_save()`` (or ``state``, already in that form) to safetensors atomically."""
    with atomic_path(path) as tmp:
        save_file(state if state is not None else model.state_dict_for_save(), str(tmp), metadata=metadata or {})


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or damaged file is a one-line error."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error type (header, length, dtype)
        raise UserError(f"{path}: damaged or not a safetensors file ({str(e).splitlines()[0]})") from None


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model weights not found: {path}")
    return read_tensors(path)


def load_into(model, state: dict[str, torch.Tensor], source: str | Path, load=None) -> None:
    """``model.load_saved_state(state)`` (or ``load(state)``); weights of another shape or naming
    are a one-line error."""
    try:
        (load or model.load_saved_state)(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{source}: the weights do not fit the model its config.yaml describes "
                        f"({str(e).splitlines()[0][:200]})") from None


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer state dict (parameters numbered) as flat tensors and JSON-able groups."""
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{pid}.{name}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


STAGING, COMMITTED = ".checkpoint-{}.tmp", ".checkpoint-{}"


def _fault(point: str, step: str) -> None:
    """Fault injection for the crash tests: ``LMFORGE_FAULT=<point>:<step>`` ends the process
    there at once, as a kill -9 would (no cleanup, no flush)."""
    if os.environ.get("LMFORGE_FAULT") == f"{point}:{step}":
        os._exit(137)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, model, optimizer, state: dict, model_state: dict | None = None,
                    optimizer_state: dict | None = None, model_file: str | Path | None = None,
                    model_metadata: dict[str, str] | None = None) -> None:
    """Save model, optimizer, RNG and ``state`` (must hold ``step``) into ``run_dir``, atomically.

    ``model_state`` / ``optimizer_state`` replace ``model.state_dict_for_save()`` and
    ``optimizer.state_dict()`` when they were gathered elsewhere (sharded training). With
    ``state["model_step"]`` other than ``state["step"]``, the weights go into the trainer state and
    ``model.safetensors`` keeps the kept best weights — or becomes ``model_file`` (the best weights
    file, moved in as part of the same checkpoint). ``model_metadata`` goes into the weights file's
    metadata (an adapter file names its base: :mod:`lmforge.train.adapters`)."""
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
    staging, committed = run_dir / STAGING.format(step), run_dir / COMMITTED.format(step)
    for old in (staging, committed):
        shutil.rmtree(old, ignore_errors=True)
    staging.mkdir()
    save_file(tensors, str(staging / STATE_TENSORS), metadata={"step": step})
    if not separate:
        save_file(weights, str(staging / MODEL_FILE), metadata={"step": step, "format": "lmforge",
                                                                **(model_metadata or {})})
    elif model_file is not None:
        try:  # a second name for the same bytes; a copy where links are not allowed
            os.link(model_file, staging / MODEL_FILE)
        except OSError:
            shutil.copyfile(model_file, staging / MODEL_FILE)
    (staging / STATE_JSON).write_text(json.dumps({**state, "param_groups": groups}, indent=2) + "\n", encoding="utf-8")
    for f in staging.iterdir():
        _fsync(f)
    _fsync(staging)
    _fault("checkpoint-staged", step)
    os.replace(staging, committed)  # the commit: from here on this checkpoint is the run's
    _fsync(run_dir)
    _fault("checkpoint-committed", step)
    _finish(committed, run_dir, step)
    if model_file is not None and separate:
        Path(model_file).unlink(missing_ok=True)


def _finish(committed: Path, run_dir: Path, step: str) -> None:
    """Move a committed checkpoint's files over the previous ones (the state JSON last), then
    drop its directory."""
    for name in (STATE_TENSORS, MODEL_FILE, STATE_JSON):
        if (committed / name).is_file():
            os.replace(committed / name, run_dir / name)
            _fault(f"checkpoint-moved-{name}", step)
    committed.rmdir()
    _fsync(run_dir)


def recover_checkpoint(run_dir: str | Path) -> None:
    """Before a run directory is trained again: finish moving a checkpoint that was committed when
    a kill stopped the writer, and remove what a kill left half-written (staging directories,
    atomic writes' temporary files)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    committed = sorted((p for p in run_dir.glob(COMMITTED.format("*")) if p.is_dir() and p.name[12:].isdigit()),
                       key=lambda p: int(p.name[12:]))
    for stale in committed[:-1]:  # older commits were superseded (cannot happen but by hand)
        shutil.rmtree(stale, ignore_errors=True)
    if committed:
        _finish(committed[-1], run_dir, committed[-1].name[12:])
    for leftover in run_dir.glob(".*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    return RunDir(run_dir).has_checkpoint()


def _step_of(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("step")
    except Exception as e:  # safetensors' own error type
        raise UserError(f"{path}: damaged or not a safetensors file ({str(e).splitlines()[0]}); the checkpoint "
                        "cannot be resumed") from None


def load_checkpoint(run_dir: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from ``run_dir``; returns the JSON state.

    ``optimizer`` may be None (restored later, e.g. after sharding): the returned state then
    holds the optimizer state dict under ``"optimizer_state"``."""
    run_dir = Path(run_dir)
    if not has_checkpoint(run_dir):
        raise UserError(f"no checkpoint to resume in {run_dir} (needs {MODEL_FILE}, {STATE_TENSORS}, {STATE_JSON})")
    try:
        state = json.loads((run_dir / STATE_JSON).read_text(encoding="utf-8"))
        step, model_step = str(state["step"]), str(state.get("model_step", state["step"]))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{run_dir / STATE_JSON}: damaged; the checkpoint cannot be resumed") from None
    step, model_step = str(state["step"]), str(state.get("model_step", state["step"]))
    found = {"trainer_state.json": step, STATE_TENSORS: _step_of(run_dir / STATE_TENSORS),
             MODEL_FILE: _step_of(run_dir / MODEL_FILE)}
    if found[STATE_TENSORS] != step or found[MODEL_FILE] not in (step, model_step):
        raise UserError(f"checkpoint in {run_dir} is torn (files from different steps: {found})")
    tensors = read_tensors(run_dir / STATE_TENSORS)
    stored = weights_metadata(run_dir / MODEL_FILE)  # the last weights are stored the same way
    if model_step != step:  # the kept best weights are in model.safetensors; the last ones here
        last = {k[len(LAST):]: v for k, v in tensors.items() if k.startswith(LAST)}
        load_into(model, full_state(model, last, stored, run_dir), run_dir / STATE_TENSORS)
    else:
        load_into(model, full_state(model, load_model_state(run_dir / MODEL_FILE), stored, run_dir),
                  run_dir / MODEL_FILE)
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

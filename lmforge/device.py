"""Devices: resolving ``auto``, the autocast context, compiling, and accelerators' peak FLOPs (for MFU)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lmforge.errors import UserError

# Dense bf16 peak of known accelerators, for MFU (per device, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless asked."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def compile_fn(fn, **kwargs):
    """``torch.compile(fn, **kwargs)``, with what every lmforge graph needs set first. Dynamo is
    imported here, not at module level: importing it costs ~1.4 s, paid by every command otherwise.
    It refuses to look inside an ``nn.LSTM`` unless told to (the LSTM decode step only reads the
    layers' weights; a compiled training step traces their forward as any op)."""
    import torch._dynamo

    torch._dynamo.config.allow_rnn = True
    return torch.compile(fn, **kwargs)

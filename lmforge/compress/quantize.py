"""Dynamic int8 quantisation of a model's Linear layers, and its safetensors form.

Each ``nn.Linear`` (but a head tied to the token embedding, which stays one shared float matrix)
becomes ``torch.ao.nn.quantized.dynamic.Linear``: weights int8 with one scale per output channel,
activations quantised per batch at run time (one scale per tensor), fbgemm kernels on x86 CPUs.
A layer whose inputs carry outlier features (an LLM's MLP down-projections: one channel 100x
the median) loses most of its precision that way; :func:`int8_errors` measures each layer's
output error on calibration inputs, and the layers above a tolerance stay float (``keep_float``,
recorded in the run's config so loading rebuilds the same mix). In ``model.safetensors``
a quantised layer ``name`` is three plain tensors — ``name.weight_int8`` (int8, (out, in)),
``name.weight_scale`` (float32, (out,)) and ``name.bias`` — beside the float tensors of every other
module, so loading never unpickles anything.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from lmforge.errors import UserError

INT8, SCALE = ".weight_int8", ".weight_scale"


def _dynamic():
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, not yet removed
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized.dynamic as nnqd
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    return nnqd, per_channel_dynamic_qconfig, quantize_dynamic


def quantizable(model: nn.Module) -> list[str]:
    """Names of the Linear layers int8 applies to (a head tied to the embedding excluded)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and id(m.weight) not in tied]


@torch.no_grad()
def int8_errors(model: nn.Module, calibrate) -> dict[str, float]:
    """Per quantisable layer, the relative error ||int8(x) - fp32(x)|| / ||fp32(x)|| of its output
    on the inputs ``calibrate(model)`` runs through it (each layer quantised alone, on its real inputs)."""
    nnqd, qconfig, _ = _dynamic()
    modules = dict(model.named_modules())
    sums: dict[str, list[float]] = {}

    def hook(name):
        def measure(module, args):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name not in quantized:
                    module.qconfig = qconfig
                    quantized[name] = nnqd.Linear.from_float(module)
                    del module.qconfig
            x = args[0].detach().float()
            ref = torch.nn.functional.linear(x, module.weight, module.bias)  # not module(x): this hook again
            err = sums.setdefault(name, [0.0, 0.0])
            err[0] += float((quantized[name](x) - ref).pow(2).sum())
            err[1] += float(ref.pow(2).sum())
        return measure

    quantized: dict[str, nn.Module] = {}
    names = quantizable(model)
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        calibrate(model)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n][0] / max(sums[n][1], 1e-30)) ** 0.5 for n in names if n in sums}


def quantize_int8(model: nn.Module, keep_float: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Replace ``model``'s Linear layers (but those named in ``keep_float``) by dynamic int8 ones,
    in place (CPU, eval mode)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines and \
            "qnnpack" not in torch.backends.quantized.supported_engines:
        raise UserError("this PyTorch build has no int8 CPU kernels (fbgemm or qnnpack)")
    _, qconfig, quantize_dynamic = _dynamic()
    names = [n for n in quantizable(model) if n not in set(keep_float)]
    if not names:
        raise UserError(f"{type(model).__name__} has no Linear layers to quantise to int8")
    model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {n: qconfig for n in names}, inplace=True)
    return model


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    nnqd, _, _ = _dynamic()
    return {n: m for n, m in model.named_modules() if isinstance(m, nnqd.Linear)}


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors of a quantised model (see the module docstring)."""
    quantized = _quantized_modules(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if torch.is_tensor(v) and not any(k.startswith(n + ".") for n in quantized)}
    tied = getattr(model, "_is_tied", lambda: False)()
    if tied:
        state.pop("lm_head.weight", None)
    for n, m in quantized.items():
        w = m.weight()
        state[n + INT8] = w.int_repr().contiguous()
        state[n + SCALE] = w.q_per_channel_scales().float().contiguous()
        b = m.bias()
        if b is not None:
            state[n + ".bias"] = b.detach().contiguous()
    return state


def load_int8_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`int8_state` into a model already passed through :func:`quantize_int8`."""
    state = dict(state)
    for n, m in _quantized_modules(model).items():
        try:
            q, scale = state.pop(n + INT8), state.pop(n + SCALE)
        except KeyError:
            raise ValueError(f"checkpoint lacks the int8 weights of {n}") from None
        bias = state.pop(n + ".bias", None)
        if tuple(q.shape) != (m.out_features, m.in_features) or q.dtype != torch.int8:
            raise ValueError(f"{n}: int8 weights of shape {tuple(q.shape)} do not fit {m.out_features}x{m.in_features}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        m.set_weight_bias(weight, bias)
    # The float modules' tensors, copied one by one (a quantised module's own state-dict loading
    # expects its packed form, which the file does not hold).
    quantized = tuple(n + "." for n in _quantized_modules(model))
    own = {k: v for k, v in model.state_dict(keep_vars=True).items()
           if torch.is_tensor(v) and not k.startswith(quantized)}
    tied = getattr(model, "_is_tied", lambda: False)()
    missing = [k for k in own if k not in state and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model")
            own[k].copy_(v)


def weights_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory (int8 layers at their int8 size)."""
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for m in _quantized_modules(model).values():
        w = m.weight()
        total += w.numel() + 4 * w.size(0) + (m.out_features * 4 if m.bias() is not None else 0)
    return total

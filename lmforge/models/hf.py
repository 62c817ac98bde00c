"""Hugging Face interoperability: one converter per model family.

GPT-2: our parameter names are HF's ``GPT2LMHeadModel`` names; the only difference is that HF
keeps its projections in ``Conv1D`` modules whose weight is the transpose of ``nn.Linear``'s.
``transformers`` is imported only inside the functions that build HF objects.
"""

from __future__ import annotations

import torch

from lmforge.models.gpt import GPT, GPTConfig

# Weights stored as Conv1D (in, out) by HF and as nn.Linear (out, in) by us.
_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our GPT state dict -> ``GPT2LMHeadModel`` state dict (tied head included, as HF expects)."""
    out = {k: (v.t() if k.endswith(_GPT2_TRANSPOSED) else v).contiguous() for k, v in state.items()}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_state_to_gpt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or ``GPT2Model``, keys without ``transformer.``) state -> ours."""
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias") or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the head is tied to wte
        if not k.startswith("transformer."):
            k = "transformer." + k
        out[k] = (v.t() if k.endswith(_GPT2_TRANSPOSED) else v).contiguous()
    return out


def gpt_config_to_hf(config: GPTConfig, **overrides):
    """The ``transformers.GPT2Config`` of the same shape."""
    from transformers import GPT2Config

    if not config.bias:
        raise ValueError("Hugging Face GPT-2 has biases; a model with bias=False has no GPT-2 equivalent")
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, n_inner=4 * config.n_embd,
                      activation_function="gelu_new", layer_norm_epsilon=config.layer_norm_eps,
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                      tie_word_embeddings=True, **{"bos_token_id": None, "eos_token_id": None, **overrides})


def gpt_config_from_hf(hf_config) -> GPTConfig:
    """Our :class:`GPTConfig` from a ``transformers.GPT2Config`` (or its ``config.json`` dict)."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    n_embd = get("n_embd")
    act = get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {act!r} is not supported (gelu_new only)")
    if get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"GPT-2 n_inner {get('n_inner')} is not 4 * n_embd")
    return GPTConfig(vocab_size=get("vocab_size"), block_size=get("n_positions"), n_layer=get("n_layer"),
                     n_head=get("n_head"), n_embd=n_embd, dropout=get("resid_pdrop", 0.0) or 0.0,
                     layer_norm_eps=get("layer_norm_epsilon", 1e-5))


def to_hf_gpt2(model: GPT, attn_implementation: str = "sdpa"):
    """A ``GPT2LMHeadModel`` holding the same weights as ``model`` (same device and dtype)."""
    from transformers import GPT2LMHeadModel

    p = model.transformer.wte.weight
    hf = GPT2LMHeadModel(gpt_config_to_hf(model.config, attn_implementation=attn_implementation))
    missing, unexpected = hf.load_state_dict(gpt_state_to_hf(model.state_dict_for_save()), strict=False)
    if unexpected or [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]:
        raise ValueError(f"GPT-2 conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf.to(device=p.device, dtype=p.dtype).eval()


def from_hf_gpt2(hf_model) -> GPT:
    """Our :class:`GPT` with the weights of a ``GPT2LMHeadModel``."""
    model = GPT(gpt_config_from_hf(hf_model.config))
    model.load_saved_state(hf_state_to_gpt(hf_model.state_dict()))
    p = next(hf_model.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()

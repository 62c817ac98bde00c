"""lmforge import-hf / export-hf / import-gguf / export-gguf: Hugging Face directories and GGUF
files to run directories and back."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import emit
from lmforge.cli.options import flag


@dataclass
class ImportOptions:
    hf_dir: str = flag(positional=True, help="config.json + model.safetensors (or pytorch_model.bin) + "
                       "tokenizer.json (or vocab.json + merges.txt, or vocab.txt); or, with --base, a PEFT "
                       "LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    out: str = flag(None, required=True, help="run directory to write")
    base: str = flag(None, help="the run or Hugging Face directory a PEFT adapter was trained on: the "
                     "result is a LoRA run over it")
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


@dataclass
class GGUFExportOptions:
    run_dir: str = flag(positional=True)
    out: str = flag(None, required=True, help="the .gguf file to write (new)")
    type: str = flag("f16", choices=("f32", "f16", "q8_0"), help="the 2-D weights' type (norms stay F32)")
    json: bool = flag(False)


def run_import(o: ImportOptions) -> int:
    """Turn a Hugging Face GPT-2 or BERT directory (config.json, weights, tokenizer) into a run directory."""
    from lmforge.interop.hf_dir import import_hf, import_peft

    if o.base is not None:
        return emit(o.json, import_peft(o.hf_dir, o.base, o.out), lambda info: (
            f"imported the LoRA adapters {o.hf_dir} -> {info['run_dir']}: r={info['lora_r']} on "
            f"{', '.join(info['targets'])}, {info['adapter_params']:,} params, over {info['base']}"))
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


def run_export_gguf(o: GGUFExportOptions, directory=None) -> int:
    """Write a Llama-family run as a GGUF file (llama.cpp's format; the tokenizer and chat template
    in its metadata), checked before it is kept: read back as import-gguf reads it, its logits
    within the type's tolerance of the run's, and whether greedy decoding is unchanged. With
    ``directory`` (``export --format gguf``): the file and export_report.json in that new directory."""
    from pathlib import Path

    from lmforge.errors import UserError
    from lmforge.fsutil import atomic_dir, write_json
    from lmforge.interop.gguf import check_gguf, export_gguf
    from lmforge.runs import RunDir, load_run

    RunDir(o.run_dir).require()
    out = Path(o.out)
    if directory is None and (out.exists() or out.suffix != ".gguf"):
        raise UserError(f"--out must be a new .gguf file ({out} {'exists' if out.exists() else 'is not one'})")

    run = load_run(o.run_dir, device="cpu")

    def write(target: Path) -> dict:
        info = export_gguf(run, target, o.type)
        info["check"] = check_gguf(run, target, o.type)
        if not info["check"]["within_tolerance"]:
            target.unlink()
            raise UserError(f"the GGUF file does not reproduce the model (max |logit diff| "
                            f"{info['check']['max_abs_diff']:.2e}, over {o.type}'s tolerance); nothing was written")
        return info
    if directory is None:
        info = write(out)
    else:
        with atomic_dir(directory) as tmp:
            info = write(Path(tmp) / out.name)
            info["file"] = str(out)
            write_json(Path(tmp) / "export_report.json", info)
    c = info["check"]
    return emit(o.json, info, lambda info: (
        f"exported {o.run_dir} -> {info['file']} ({info['architecture']}, {o.type}, {info['size_mb']:.1f} MiB); "
        f"read back: max |logit diff| {c['max_abs_diff']:.2e}, greedy {c['greedy_tokens']} tokens "
        f"{'identical' if c['greedy_tokens_equal'] else 'differ'}"))


VERB_SPECS = {"import-hf": (ImportOptions, run_import, "Hugging Face GPT-2 or BERT directory -> run directory"),
              "export-hf": (ExportOptions, run_export, "run directory -> Hugging Face directory (from_pretrained)"),
              "import-gguf": (GGUFImportOptions, run_import_gguf, "GGUF file (Llama, Qwen2) -> run directory"),
              "export-gguf": (GGUFExportOptions, run_export_gguf, "Llama-family run -> GGUF file (llama.cpp)")}

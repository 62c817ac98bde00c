"""lmforge export: a run in a format other tools load (ONNX for onnxruntime, a Hugging Face directory,
GGUF for llama.cpp, a container build context)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import print_json
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = ("write a run as an ONNX graph (verified with onnxruntime), a Hugging Face directory, a GGUF file or a "
        "container context")
FORMATS = ("onnx", "hf", "container", "gguf")
GREEDY_TOKENS = 16
PARITY = 1e-4  # the largest |onnxruntime - PyTorch| of the fp32 graph an export accepts, relative to the
# outputs' largest magnitude (at least 1): fp32 kernels that sum in another order differ by about 1e-6 of it


@dataclass
class Options:
    run_dir: str = flag(positional=True)
    format: str = flag(required=True, choices=FORMATS, help="onnx: model.onnx for onnxruntime (classifiers; decoders "
                       "with past keys/values); hf: a transformers directory (as export-hf); container: a "
                       "Dockerfile build context that serves the run; gguf: model.gguf for llama.cpp (Llama-family "
                       "decoders, as export-gguf)")
    out: str = flag(required=True, help="the directory to write (new or empty)")
    quantize: str | None = flag(choices=("int8",), help="onnx: also model.int8.onnx, onnxruntime's dynamic int8 "
                                "quantisation, checked the same way")
    type: str | None = flag(choices=("f32", "f16", "q8_0"), help="gguf: the 2-D weights' type (default f16; "
                            "norms stay F32)")
    json: bool = flag(False)


def _check(run, path: Path, kind: str, workload=None) -> dict:
    """Parity, greedy decoding and speed of the graph at ``path`` against PyTorch; for a
    classifier with validation data (``workload``), the graph's accuracy and macro F1 on it."""
    from lmforge.generate import generate_ids
    from lmforge.interop import onnx as ox

    import torch

    sess = ox.session(path)
    diff, scale = ox.max_difference(run, sess, kind)
    out = {"file": path.name, "size_mb": path.stat().st_size / 2**20, "max_abs_diff": diff, "output_scale": scale}
    if workload is not None:
        out["quality"] = workload.quality(ox.SessionClassifier(sess, run.model))
    if kind == "decoder":
        prompt = run.tokenizer.encode("The", add_special_tokens=False).ids[:4] or [0]
        ours = [int(t[0]) for t in generate_ids(run.model, torch.tensor([prompt]), GREEDY_TOKENS, temperature=0.0)]
        theirs = ox.greedy_onnx(sess, run.model, prompt, GREEDY_TOKENS)
        out["greedy_tokens_equal"] = ours == theirs
        out["greedy_tokens"] = GREEDY_TOKENS
    out |= ox.speed(run, sess, kind)
    return out


def _quality_workload(run, kind: str):
    """The classifier's validation evaluation (``compress.report``'s), or None where there is
    none to run: a decoder (parity and greedy decoding say it), a run trained without validation."""
    from lmforge.compress import report

    if kind == "decoder":
        return None
    try:
        return report.workload_for(run, None)
    except UserError:
        return None


def export_onnx(o: Options, tmp: Path) -> dict:
    from lmforge.fsutil import write_json
    from lmforge.interop import onnx as ox
    from lmforge.runs import RunDir, load_run

    run = load_run(o.run_dir, device="cpu")
    if run.config.compress.quantize:
        raise UserError(f"{o.run_dir} holds int8 PyTorch weights; export its source run and add --quantize int8")
    kind = ox.kind_of(run)
    graph = ox.export_onnx(run, tmp / "model.onnx")
    for name in (RunDir.TOKENIZER, RunDir.LABELS, RunDir.CHAT_TEMPLATE, RunDir.CONFIG):
        if (run.path / name).is_file():
            shutil.copy2(run.path / name, tmp / name)
    workload = _quality_workload(run, kind)
    result = {"run": str(o.run_dir), "format": "onnx", "out": str(o.out), **graph,
              "checks": [_check(run, tmp / "model.onnx", kind, workload)]}
    if workload is not None:
        result["pytorch_quality"] = workload.quality(run.model)
    if o.quantize:
        ox.quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx")
        result["checks"].append(_check(run, tmp / "model.int8.onnx", kind, workload))
    fp32 = result["checks"][0]
    if fp32["max_abs_diff"] > PARITY * max(1.0, fp32["output_scale"]) or not fp32.get("greedy_tokens_equal", True):
        raise UserError(f"the ONNX graph does not reproduce the model (max |diff| {fp32['max_abs_diff']:.2e}, "
                        f"greedy tokens equal: {fp32.get('greedy_tokens_equal')}); nothing was written")
    write_json(tmp / "export_report.json", result)
    return result


def run(o: Options) -> int:
    """Write RUN_DIR as an ONNX graph (model.onnx with the run's tokenizer and labels; checked
    against PyTorch with onnxruntime: outputs, greedy decoding for decoders, and the speed of
    each, in export_report.json), as a Hugging Face directory, as a GGUF file (read back and
    checked), or as a container build context (Dockerfile, pinned requirements, serve.sh, the
    source and the run)."""
    from lmforge.fsutil import atomic_dir
    from lmforge.runs import RunDir

    RunDir(o.run_dir).require()
    out = Path(o.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose a new directory")
    if o.format != "onnx" and o.quantize:
        raise UserError("--quantize applies to --format onnx")
    if o.format != "gguf" and o.type:
        raise UserError("--type applies to --format gguf")
    if o.format == "gguf":
        from lmforge.cli.hf import GGUFExportOptions, run_export_gguf

        return run_export_gguf(GGUFExportOptions(o.run_dir, str(out / "model.gguf"), o.type or "f16", o.json),
                               directory=out)
    if o.format == "hf":
        from lmforge.cli.hf import ExportOptions, run_export

        return run_export(ExportOptions(o.run_dir, o.out, o.json))
    if o.format == "container":
        from lmforge.interop.container import write_context

        with atomic_dir(out) as tmp:
            result = {"run": str(o.run_dir), "out": str(out), **write_context(o.run_dir, tmp)}
        if o.json:
            print_json(result)
        else:
            print(f"wrote {out}: Dockerfile (torch {result['torch']} CPU, {len(result['requirements'])} pinned "
                  f"packages, a health check), serve.sh, src/lmforge, run/ ({', '.join(result['run_files'])})\n"
                  f"  docker build -t lmforge-run {out} && docker run -e LMFORGE_API_KEY=KEY -p "
                  f"{result['port']}:{result['port']} lmforge-run")
        return 0
    with atomic_dir(out) as tmp:
        result = export_onnx(o, tmp)
    if o.json:
        print_json(result)
        return 0
    print(f"exported {o.run_dir} -> {out / 'model.onnx'} ({result['kind']}; inputs {', '.join(result['inputs'][:3])}"
          f"{', ...' if len(result['inputs']) > 3 else ''})")
    for c in result["checks"]:
        greedy = (f", greedy {c['greedy_tokens']} tokens {'identical' if c['greedy_tokens_equal'] else 'DIFFER'}"
                  if "greedy_tokens" in c else "")
        quality = (f"; validation accuracy {c['quality']['accuracy']:.4f} (PyTorch "
                   f"{result['pytorch_quality']['accuracy']:.4f})" if "quality" in c else "")
        print(f"{c['file']}: {c['size_mb']:.2f} MiB, max |onnxruntime - PyTorch| {c['max_abs_diff']:.2e}{greedy}; "
              f"batch 1: onnxruntime {c['onnxruntime_ms']:.2f} ms, PyTorch {c['pytorch_ms']:.2f} ms "
              f"({c['speedup']:.2f}x){quality}")
    return 0

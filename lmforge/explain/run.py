"""``lmforge explain``: attributions of each input by each method, their faithfulness, and the
files of an explanation directory (default ``<run>/explain/``)::

    explanation.json      every input: what is explained, its features, each method's attributions,
                          faithfulness figures; the mean figures and the verdict
    explanation.html      text runs: each input's tokens coloured by each method
    plots/heatmaps.png    image runs: each image and each method's map over it
    plots/faithfulness.png  mean deletion and insertion curves per method, random order dashed
    attention/layer_NN.png  decoders with --attention: each layer's heads
    report.md             the faithfulness table and the verdict
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lmforge.evaluate import faithfulness
from lmforge.explain import render
from lmforge.explain.attribution import attribute
from lmforge.fsutil import check_output_dir, replace_dir, write_json, write_text
from lmforge.progress import progress

FILES = {"explanation.json", "explanation.html", "report.md", "plots", "attention"}


def explain_subjects(subjects: list, methods: list[str], kind: str, run_name: str, features: str) -> dict:
    """Each subject's attributions by each method and their faithfulness, as one result object."""
    items, curves, deltas = [], [], []
    with progress(total=len(subjects) * (len(methods) + 1), desc="explaining", unit="step") as bar:
        for s in subjects:
            attrs = {}
            for m in methods:
                attrs[m] = attribute(m, s)
                if attrs[m].delta is not None:
                    deltas.append(attrs[m].delta)
                bar.update(1)
            f = faithfulness.evaluate(s, {m: a.per_feature for m, a in attrs.items()})
            bar.update(1)
            curves.append(f)
            meta = {k: v for k, v in s.meta.items() if k != "pixels"}
            item = {**meta, "tokens": s.names, "attributions": {m: a.per_feature.tolist() for m, a in attrs.items()},
                    "faithfulness": f}
            if s.spans:
                item["spans"] = [list(sp) for sp in s.spans]
            if s.inputs.dim() == 4:  # per-pixel maps for the heat maps
                item["maps"] = {m: a.element_map.tolist() for m, a in attrs.items()}
            if attrs.get("ig") is not None:
                item["ig_delta"] = attrs["ig"].delta
            items.append(item)
    summary = faithfulness.summarize(curves)
    return {"run": run_name, "kind": kind, "methods": methods, "features": features, "items": items,
            "faithfulness": summary, "verdict": faithfulness.verdict(summary),
            "ig_max_delta": max(deltas) if deltas else None}


def check_out(out: Path) -> None:
    """Refuse an --out that holds anything explain did not write (replacing an earlier explanation is fine)."""
    check_output_dir(out, FILES, overwrite=True)


def write_explanation(result: dict, out: Path, subjects: list, attention: list | None = None) -> dict:
    """All files of the explanation, written to a temporary sibling and moved onto ``out`` at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "plots").mkdir()
        files = ["explanation.json", "report.md", "plots/faithfulness.png"]
        render.curves_plot(result["faithfulness"], tmp / "plots" / "faithfulness.png")
        if subjects[0].inputs.dim() == 4:
            render.image_heatmaps(result["items"], [s.meta["pixels"] for s in subjects], result["methods"],
                                  tmp / "plots" / "heatmaps.png")
            files.append("plots/heatmaps.png")
        else:
            write_text(tmp / "explanation.html", render.text_page(result))
            files.append("explanation.html")
        if attention:
            (tmp / "attention").mkdir()
            for i, (weights, tokens) in enumerate(attention):
                names = render.attention_maps(weights, tokens,
                                              lambda layer: tmp / "attention" / f"input{i}_layer{layer:02d}.png")
                files += [f"attention/{n}" for n in names]
        result = {**result, "out": str(out), "files": files}
        write_text(tmp / "report.md", render.report(result))
        write_json(tmp / "explanation.json", result)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return result

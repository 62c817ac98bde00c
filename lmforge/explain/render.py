"""What ``lmforge explain`` writes: the HTML page of coloured tokens, heat maps over images,
attention maps, the faithfulness curves and the report."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

METHOD_NAMES = {"ig": "Integrated Gradients", "occlusion": "occlusion", "shap": "KernelSHAP", "random": "random order"}


def _colour(a: float, scale: float) -> str:
    """Red for support of the explained score, blue against; alpha by size."""
    alpha = min(1.0, abs(a) / scale) if scale > 0 else 0.0
    rgb = "214,39,40" if a > 0 else "31,119,180"
    return f"rgba({rgb},{alpha * 0.85:.3f})"


def coloured_text(text: str, spans: list[tuple[int, int]], values: list[float], names: list[str]) -> str:
    """``text`` as HTML with each token's span coloured by its value (tokens without a span in the
    text — a byte-level piece of a character — are shown as their token)."""
    scale = max((abs(v) for v in values), default=0.0)
    out, at = [], 0
    for (start, end), v, name in sorted(zip(spans, values, names), key=lambda t: t[0][0]):
        if start < at:  # pieces of one character share its span: show the first only
            continue
        out.append(html.escape(text[at:start]))
        piece = text[start:end] if end > start else name
        out.append(f'<span style="background:{_colour(v, scale)}" title="{html.escape(name)}: {v:+.4f}">'
                   f'{html.escape(piece)}</span>')
        at = max(at, end)
    out.append(html.escape(text[at:]))
    return "".join(out)


def text_page(result: dict) -> str:
    rows = []
    for item in result["items"]:
        rows.append(f"<h2>{html.escape(item['explained'])} = {item['score']:.4f}</h2>")
        if item.get("answer") is not None:
            rows.append(f"<p class=answer>answer: {html.escape(item['answer'])}</p>")
        for method, values in item["attributions"].items():
            f = item["faithfulness"][method]
            rows.append(f"<p><b>{METHOD_NAMES[method]}</b> <small>(comprehensiveness {f['comprehensiveness']:.3f}, "
                        f"sufficiency {f['sufficiency']:.3f})</small><br>"
                        f"{coloured_text(item['input'], item['spans'], values, item['tokens'])}</p>")
    return ("<!doctype html><meta charset=utf-8><title>lmforge explain</title>"
            "<style>body{font:15px/1.7 system-ui,sans-serif;max-width:60em;margin:2em auto}"
            "span{border-radius:3px;padding:0 1px}h2{font-size:1.05em;margin-top:2em}</style>"
            f"<h1>Why {html.escape(result['run'])} answers as it does</h1>"
            "<p>Red: the token raises the explained score; blue: it lowers it. Hover for the value.</p>"
            + "\n".join(rows) + f"<p><b>{html.escape(result['verdict'])}</b></p>")


def image_heatmaps(items: list[dict], pixels: list[np.ndarray], methods: list[str], path: Path) -> None:
    """One row per image: the image, then each method's attribution map over it (red: supports
    the class, blue: against)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(methods)
    fig, axes = plt.subplots(len(items), cols, figsize=(2.2 * cols, 2.3 * len(items)), squeeze=False)
    for row, (item, px) in enumerate(zip(items, pixels)):
        gray = px[..., 0] if px.shape[-1] == 1 else px.mean(-1)
        axes[row, 0].imshow(px[..., 0] if px.shape[-1] == 1 else px, cmap="gray" if px.shape[-1] == 1 else None)
        axes[row, 0].set_title(f"{item['label']} {item['score']:.2f}", fontsize=8)
        for col, m in enumerate(methods, 1):
            a = np.asarray(item["maps"][m])
            lim = float(np.abs(a).max()) or 1.0
            axes[row, col].imshow(gray, cmap="gray", alpha=0.5)
            axes[row, col].imshow(a, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.7)
            if row == 0:
                axes[row, col].set_title(METHOD_NAMES[m], fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_plot(summary: dict, path: Path) -> None:
    """Mean deletion and insertion curves per method, random order dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key in zip(axes, ("deletion", "insertion")):
        for m, v in summary.items():
            ax.plot(v["fraction"], v[key], "--" if m == "random" else "-", label=METHOD_NAMES[m])
        ax.set_xlabel(f"fraction of features {'removed' if key == 'deletion' else 'inserted'}, most supporting first")
        ax.set_ylabel("explained score")
        ax.set_title(f"{key} (AOPC: {'comprehensiveness' if key == 'deletion' else 'sufficiency'})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_maps(weights: list, tokens: list[str], path_of_layer, max_heads: int = 16) -> list[str]:
    """One PNG per layer: a grid of its heads' attention (query rows over key columns), written to
    ``path_of_layer(layer)``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    labels = [t if len(t) <= 8 else t[:7] + "…" for t in tokens]
    for layer, w in enumerate(weights):
        heads = min(w.shape[0], max_heads)
        cols = min(4, heads)
        rows = -(-heads // cols)
        side = max(2.5, 0.25 * len(tokens))
        fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
        for h in range(rows * cols):
            ax = axes[h // cols, h % cols]
            ax.axis("off")
            if h >= heads:
                continue
            ax.imshow(w[h], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {h}", fontsize=8)
            if len(tokens) <= 40:
                ax.axis("on")
                ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(len(tokens)), labels, fontsize=6)
        fig.tight_layout()
        path = path_of_layer(layer)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        names.append(path.name)
    return names


def report(result: dict) -> str:
    s = result["faithfulness"]
    lines = [f"# Explanations of {result['run']}", "",
             f"{result['kind']}: {len(result['items'])} input(s), explained: {result['items'][0]['explained'].split('(')[0]}, "
             f"features: {result['features']}.", "",
             "## Faithfulness (mean over the inputs)", "",
             "Deletion removes the features a method ranks first and watches the explained score fall "
             "(comprehensiveness, higher is better); insertion puts only them back into the baseline "
             "(sufficiency, lower is better). Random order is the bar to clear.", "",
             "| method | comprehensiveness | sufficiency | comp. - suff. |", "|---|---:|---:|---:|"]
    for m, v in s.items():
        lines.append(f"| {METHOD_NAMES[m]} | {v['comprehensiveness']:.4f} | {v['sufficiency']:.4f} | "
                     f"{v['comprehensiveness'] - v['sufficiency']:+.4f} |")
    lines += ["", f"**{result['verdict']}**", ""]
    if result.get("ig_max_delta") is not None:
        lines += [f"Integrated Gradients: the largest completeness error (|sum of attributions - (score(input) - "
                  f"score(baseline))|) is {result['ig_max_delta']:.2e}.", ""]
    lines += ["![deletion and insertion curves](plots/faithfulness.png)", ""]
    for f in result["files"]:
        lines.append(f"- `{f}`")
    return "\n".join(lines) + "\n"

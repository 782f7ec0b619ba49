"""The gradient-flow picture: ``report.plot("flow.png")`` (needs the ``plot`` extra).

Left: a heatmap of log10 gradient norm, layer (first at the top) by step, over the
whole run. Right: the typical and the largest norm of each layer as bars on a log
scale, in the spirit of the well-known ``plot_grad_flow`` snippet but over time.
Layers with findings have red labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gradwatch.report import Report


def plot_report(report: Report, path: str | Path) -> Path:
    """Write the flow picture of ``report`` to ``path`` as a PNG and return the path."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("report.plot needs matplotlib: pip install 'gradwatch[plot]'") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    layers = [ls.name for ls in report.layers]
    if not layers:
        raise ValueError("the report has no layers to plot")
    flagged = {layer for f in report.findings for layer in f.layers}
    col = {name: i for i, name in enumerate(report.flow.layers)}
    n_bins = len(report.flow.bin_steps)
    heat = np.full((len(layers), max(n_bins, 1)), np.nan)
    for r, name in enumerate(layers):
        c = col.get(name)
        if c is not None:
            heat[r, :n_bins] = [row[c] for row in report.flow.log10_norm]

    height = min(2.0 + 0.28 * len(layers), 14.0)
    fig, (ax_heat, ax_bar) = plt.subplots(
        1, 2, figsize=(11, height), gridspec_kw={"width_ratios": [3, 1.3]}, sharey=True
    )
    steps = report.flow.bin_steps or (0,)
    last = report.last_step if report.last_step >= steps[-1] else steps[-1]
    image = ax_heat.imshow(
        np.ma.masked_invalid(heat),
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
        extent=(steps[0], last + 1, len(layers) - 0.5, -0.5),
    )
    fig.colorbar(image, ax=ax_heat, label="log10 |g|", pad=0.01)
    ax_heat.set_xlabel("step")
    ax_heat.set_title("gradient norm per layer over the run")
    ax_heat.set_yticks(range(len(layers)))
    ax_heat.set_yticklabels(layers, fontsize=8)
    for label in ax_heat.get_yticklabels():
        if label.get_text() in flagged:
            label.set_color("red")

    typical = [ls.typical_norm for ls in report.layers]
    largest = [ls.max_norm for ls in report.layers]
    ys = np.arange(len(layers))
    ax_bar.barh(
        ys,
        [v if v > 0 and math.isfinite(v) else np.nan for v in largest],
        color="lightgray",
        label="max",
    )
    ax_bar.barh(
        ys,
        [v if v > 0 and math.isfinite(v) else np.nan for v in typical],
        color="tab:blue",
        label="typical",
    )
    ax_bar.set_xscale("log")
    ax_bar.set_xlabel("|g|")
    ax_bar.set_title("typical and max")
    ax_bar.legend(loc="lower right", fontsize=8)

    verdict = "healthy" if report.healthy else ", ".join(f.rule for f in report.findings)
    fig.suptitle(f"gradwatch: {verdict}", color="black" if report.healthy else "darkred")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

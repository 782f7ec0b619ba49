"""The gradient-flow picture: ``report.plot("flow.png")`` (needs the ``plot`` extra).

Left: a heatmap of log10 gradient norm, layer (first at the top) by step, over the
whole run. Right: per layer, the largest |g| of any entry over the run (light bars) and
the typical root-mean-square |g| (``typical_norm / sqrt(numel)``, dark bars) on a log
scale, in the style of the well-known ``plot_grad_flow`` snippet (its max and mean |g|
bars) but over the whole run. Layers with findings have red labels.

Readable from a handful of layers to hundreds: the figure grows with the layer count up
to a bounded height, and beyond :data:`MAX_LABELS` layers only every k-th layer (and
every flagged one) is labelled.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gradwatch.render import elide_names
from gradwatch.report import Report

_LABEL_WIDTH = 40  # characters of a layer label; longer names are cut in the middle

# At most this many layer labels on the y axis: at 7 pt in a 14-inch figure that is
# about 20 pt per label, so they never overlap.
MAX_LABELS = 48
MAX_HEIGHT = 14.0


def label_every(n_layers: int) -> int:
    """Label one row in this many: 1 up to :data:`MAX_LABELS` layers."""
    return max(1, -(-n_layers // MAX_LABELS))


def label_rows(n_layers: int, flagged_rows: set[int]) -> list[int]:
    """The rows that get a label: all of them up to :data:`MAX_LABELS`, else every k-th
    row and the last one; flagged rows replace their nearest neighbour while they are
    few enough (a quarter of the labels) not to crowd the axis."""
    every = label_every(n_layers)
    if every == 1:
        return list(range(n_layers))
    rows = set(range(0, n_layers, every)) | {n_layers - 1}
    if len(flagged_rows) <= MAX_LABELS // 4:
        for flagged in flagged_rows:
            nearest = min(rows, key=lambda r: abs(r - flagged))
            rows.discard(nearest)
            rows.add(flagged)
    return sorted(rows)


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

    height = min(2.0 + 0.28 * len(layers), MAX_HEIGHT)
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
    flagged_rows = {i for i, name in enumerate(layers) if name in flagged}
    shown = label_rows(len(layers), flagged_rows)
    ax_heat.set_yticks(shown)
    labels, _ = elide_names([layers[i] for i in shown], _LABEL_WIDTH)
    ax_heat.set_yticklabels(labels, fontsize=8 if len(shown) <= 24 else 7)
    for row, label in zip(shown, ax_heat.get_yticklabels(), strict=True):
        if row in flagged_rows:
            label.set_color("red")
    if len(shown) < len(layers):
        ax_heat.set_ylabel(f"layer (1 in {label_every(len(layers))} of {len(layers)} labelled)")

    largest = [_positive(ls.max_abs) for ls in report.layers]
    rms = [
        _positive(ls.typical_norm / math.sqrt(ls.numel)) if ls.numel > 0 else math.nan
        for ls in report.layers
    ]
    ys = np.arange(len(layers))
    thick = 0.8 if len(layers) <= 60 else 1.0  # hundreds of bars: no gaps, no moire
    ax_bar.barh(ys, largest, height=thick, color="lightsteelblue", label="max |g|")
    ax_bar.barh(ys, rms, height=thick * 0.6, color="tab:blue", label="typical rms |g|")
    if any(math.isfinite(v) for v in (*largest, *rms)):
        ax_bar.set_xscale("log")
    ax_bar.set_xlabel("|g|")
    ax_bar.set_title("max and typical |g|")
    ax_bar.legend(loc="lower right", fontsize=8)

    verdict = "healthy" if report.healthy else ", ".join(f.rule for f in report.findings)
    fig.suptitle(f"gradwatch: {verdict}", color="black" if report.healthy else "darkred")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _positive(value: float) -> float:
    return value if value > 0 and math.isfinite(value) else math.nan

"""Rich rendering of a :class:`~gradwatch.report.Report`. Imported only when a report renders.

The layout reads in an 80-column terminal and in a log file with no colour: a summary
line, one panel per finding, a per-layer table with a gradient-flow bar (log scale,
first layer to last) and a sparkline of each layer's norm over the run, then the step
range and coverage notes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradwatch.findings import Finding
from gradwatch.report import LayerSummary, Report

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_SPARK = "▁▂▃▄▅▆▇█"
_BAR_WIDTH = 14
_SPARK_WIDTH = 12
# Beyond this many layers the table shows the first and last halves only.
_MAX_TABLE_ROWS = 40


def fmt(value: float) -> str:
    """A number in at most 7 characters: ``1.2e-05``, ``0.031``, ``nan``."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.1e}"


def _summary(report: Report) -> Text:
    span = (
        f"steps {report.first_step}-{report.last_step} ({report.steps_observed} observed)"
        if report.steps_observed
        else "no steps observed"
    )
    problems = report.problems
    stopped = report.stopped_at is not None
    if problems:
        counts = {s: sum(f.severity == s for f in problems) for s in ("error", "warning")}
        parts = [f"{n} {s}{'s' if n > 1 else ''}" for s, n in counts.items() if n]
        noun = "problem" if len(problems) == 1 else "problems"
        text = Text(f"gradwatch: {len(problems)} {noun} ({', '.join(parts)})", style="bold red")
    elif report.steps_observed == 0:
        # Never "healthy" over what was not seen.
        text = Text(
            "gradwatch: nothing was judged, no training step reached it", style="bold yellow"
        )
    elif stopped:
        text = Text("gradwatch: no problem found before monitoring stopped", style="bold yellow")
    else:
        text = Text("gradwatch: gradients look healthy", style="bold green")
    text.append(f" - {span}", style="default")
    if stopped:
        text.append(
            f"; monitoring stopped at step {report.stopped_at} after an internal error (see notes)",
            style="bold yellow",
        )
    return text


def _finding_panel(index: int, f: Finding) -> Panel:
    body = Text()
    body.append(f.message + "\n")
    body.append("where: ", style="bold")
    body.append(", ".join(f.layers) if f.layers else "(whole model)")
    body.append("\nsteps: ", style="bold")
    body.append(f"{f.first_step}-{f.last_step}")
    if f.evidence:
        body.append("\nevidence: ", style="bold")
        body.append(", ".join(f"{k}={fmt(v)}" for k, v in f.evidence.items()))
    parts: list[RenderableType] = [body]
    if f.fixes:
        parts.append(Text("fixes, best first:", style="bold"))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column()
        for rank, fix in enumerate(f.fixes, 1):
            grid.add_row(f"{rank}.", Text.assemble((fix.id, "bold"), f": {fix.text}"))
        parts.append(grid)
    style = _SEVERITY_STYLE.get(f.severity, "default")
    title = Text(f"{index}. {f.rule} ({f.severity})", style=style)
    return Panel(Group(*parts), title=title, title_align="left", border_style=style, box=box.ASCII)


def _bar(log_norm: float, lo: float, hi: float) -> str:
    if math.isnan(log_norm):
        return ""
    frac = 1.0 if hi <= lo else (log_norm - lo) / (hi - lo)
    cells = frac * _BAR_WIDTH
    full = int(cells)
    return "█" * full + ("▌" if cells - full >= 0.5 else "") or "▏"


def _sparkline(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return ""
    if len(values) > _SPARK_WIDTH:  # average neighbouring bins down to the width
        step = len(values) / _SPARK_WIDTH
        chunks = [values[int(i * step) : int((i + 1) * step)] for i in range(_SPARK_WIDTH)]
        values = [
            sum(c) / len(c) if (c := [v for v in chunk if not math.isnan(v)]) else math.nan
            for chunk in chunks
        ]
    # At least one decade of range, so step-to-step noise does not look like a trend.
    mid = (min(finite) + max(finite)) / 2
    half = max((max(finite) - min(finite)) / 2, 0.5)
    lo, hi = mid - half, mid + half
    out = []
    for v in values:
        if math.isnan(v):
            out.append(" ")
        else:
            level = round((v - lo) / (hi - lo) * (len(_SPARK) - 1))
            out.append(_SPARK[level])
    return "".join(out)


def _layer_table(report: Report) -> Table:
    flagged: dict[str, str] = {}
    for f in report.findings:
        for layer in f.layers:
            flagged.setdefault(layer, "!" if f.severity == "error" else "*")
    logs = [
        math.log10(ls.typical_norm) if ls.typical_norm > 0 else math.nan for ls in report.layers
    ]
    finite = [v for v in logs if not math.isnan(v)]
    lo, hi = (min(finite) - 0.5, max(finite)) if finite else (0.0, 0.0)
    col = {name: i for i, name in enumerate(report.flow.layers)}
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False, show_edge=False)
    table.add_column("layer", overflow="ellipsis", no_wrap=True, max_width=24)
    table.add_column("|g| typ", justify="right", no_wrap=True)
    table.add_column("flow (log)", no_wrap=True, min_width=_BAR_WIDTH)
    table.add_column("over run", no_wrap=True, min_width=_SPARK_WIDTH)
    table.add_column("zeros", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    pairs = list(zip(report.layers, logs, strict=True))
    hidden = max(0, len(pairs) - _MAX_TABLE_ROWS)
    rows: list[tuple[LayerSummary, float] | None] = list(pairs)
    if hidden:
        half = _MAX_TABLE_ROWS // 2
        rows = [*pairs[:half], None, *pairs[-half:]]
    for row in rows:
        if row is None:
            table.add_row(f"... {hidden} more", "", "", "", "", "")
            continue
        ls, log_norm = row
        c = col.get(ls.name)
        history = [r[c] for r in report.flow.log10_norm] if c is not None else []
        table.add_row(
            ls.name,
            fmt(ls.typical_norm),
            _bar(log_norm, lo, hi),
            _sparkline(history),
            f"{ls.zero_frac:.0%}",
            flagged.get(ls.name, ""),
        )
    return table


def render_report(report: Report) -> Iterator[RenderableType]:
    """The renderables of a report, in order."""
    yield _summary(report)
    for i, finding in enumerate(report.findings, 1):
        yield _finding_panel(i, finding)
    if report.layers:
        yield Group(
            Text("Gradient norm per layer, first to last (* warning, ! error):", style="bold"),
            _layer_table(report),
        )
    for note in report.notes:
        yield Text(f"note: {note}", style="dim")


def render_to_text(report: Report, width: int = 80, color: bool = False) -> str:
    """Render to a string, as a terminal of ``width`` columns would show it."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        color_system="standard" if color else None,
        force_terminal=color,
        no_color=not color,
        legacy_windows=False,
        highlight=False,
    )
    for renderable in render_report(report):
        console.print(renderable)
    return buffer.getvalue()

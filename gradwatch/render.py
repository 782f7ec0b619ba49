"""Rich rendering of a :class:`~gradwatch.report.Report`. Imported only when a report renders.

The layout reads in an 80-column terminal and in a log file with no colour: a summary
line, one panel per finding, a per-layer table with a gradient-flow bar (log scale,
first layer to last) and a sparkline of each layer's norm over the run, then the step
range and coverage notes.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradwatch.findings import Finding
from gradwatch.report import Coverage, Report

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_SPARK = "▁▂▃▄▅▆▇█"
_BAR_WIDTH = 14
_SPARK_WIDTH = 12
# Beyond this many layers the table shows the first and last halves only.
_MAX_TABLE_ROWS = 40
# The columns next to the layer name: |g| typ, flow, over run, zeros, flag; each column
# after the first costs 3 more cells (padding and the divider).
_FIXED_COLUMNS = 7 + 5 + 1 + 5 * 3
_MIN_NAME_WIDTH = 12
_MAX_NAME_WIDTH = 40
# When the names cannot all stay distinct, the flow bar and the sparkline shrink to this.
_COMPACT_WIDTH = 8
ELLIPSIS = "…"
_SEPARATOR = re.compile(r"(?<=[./])")


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
    elif report.coverage is not None and report.coverage.layers_not_observed:
        # Never "healthy" over layers nobody saw.
        missing = len(report.coverage.layers_not_observed)
        text = Text(
            f"gradwatch: healthy where observed; {missing} layer{'s' if missing > 1 else ''} "
            "not observed",
            style="bold yellow",
        )
    else:
        text = Text("gradwatch: gradients look healthy", style="bold green")
    text.append(f" - {span}", style="default")
    if stopped:
        text.append(
            f"; monitoring stopped at step {report.stopped_at} after an internal error (see notes)",
            style="bold yellow",
        )
    return text


def coverage_line(coverage: Coverage) -> str:
    """What was judged, in one line: parameters observed and activation sites by kind.

    >>> coverage_line(Coverage(4, 3, ("fc3",), {"relu": 2}, 2, ()))
    'judged: 3 of 4 trainable parameters (not observed: fc3); activations: 2 relu sites'
    """
    text = (
        f"judged: {coverage.parameters_observed} of {coverage.parameters_trainable} "
        "trainable parameters"
    )
    missing = coverage.layers_not_observed
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        text += f" (not observed: {shown})"
    sites = coverage.activation_sites
    if sites:
        kinds = ", ".join(f"{n} {kind} site{'s' if n > 1 else ''}" for kind, n in sites.items())
        text += f"; activations: {kinds}"
    else:
        text += "; no activation observed"
    unseen = coverage.activation_modules_not_observed
    if unseen:
        text += (
            f"; {len(unseen)} of {coverage.activation_modules} activation modules not "
            f"observed ({', '.join(unseen[:3])}{' ...' if len(unseen) > 3 else ''})"
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


def _bar(log_norm: float, lo: float, hi: float, width: int = _BAR_WIDTH) -> str:
    if math.isnan(log_norm):
        return ""
    frac = 1.0 if hi <= lo or math.isinf(log_norm) else (log_norm - lo) / (hi - lo)
    frac = frac if math.isfinite(frac) else 1.0
    cells = frac * width
    full = int(cells)
    return "█" * full + ("▌" if cells - full >= 0.5 else "") or "▏"


def _sparkline(values: list[float], width: int = _SPARK_WIDTH) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return ""
    if len(values) > width:  # average neighbouring bins down to the width
        step = len(values) / width
        chunks = [values[int(i * step) : int((i + 1) * step)] for i in range(width)]
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


def _candidates(name: str, width: int) -> list[str]:
    """Shortenings of ``name`` to at most ``width`` cells, most readable first: whole
    segments at both ends (``transformer.h.0.…c_attn``), then the longest head of whole
    segments with as much tail as fits, then any cut of the characters."""
    parts = [p for p in _SEPARATOR.split(name) if p]
    out: list[str] = []
    for m in range(1, len(parts)):
        tail = "".join(parts[-m:])
        room = width - 1 - len(tail)
        head = ""
        for part in parts[:-m]:
            if len(head) + len(part) > room:
                break
            head += part
        if head:
            out.append(head + ELLIPSIS + tail)
    heads = [len("".join(parts[:k])) for k in range(len(parts) - 1, 0, -1)]
    out.extend(name[:h] + ELLIPSIS + name[-(width - 1 - h) :] for h in heads if 1 <= h <= width - 5)
    out.extend(name[:h] + ELLIPSIS + name[-(width - 1 - h) :] for h in range(width - 2, 0, -1))
    return list(dict.fromkeys(out))


def _collisions(shown: Sequence[str], names: Sequence[str]) -> list[list[int]]:
    by_text: dict[str, list[int]] = {}
    for i, text in enumerate(shown):
        by_text.setdefault(text, []).append(i)
    return [rows for rows in by_text.values() if len({names[i] for i in rows}) > 1]


def elide_names(names: Sequence[str], width: int) -> tuple[list[str], bool]:
    """``names`` cut in the middle to at most ``width`` cells each, every different name
    still shown differently where a single cut allows it.

    Returns:
        the shown names, and whether they are all distinct.

    Example:
        >>> elide_names(["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"], 24)
        (['transformer.h.0.…c_attn', 'transformer.h.0.…c_proj'], True)
    """
    options = [_candidates(n, width) if len(n) > width else [n] for n in names]
    choice = [0] * len(names)
    while True:
        shown = [opts[c] for opts, c in zip(options, choice, strict=True)]
        clashes = _collisions(shown, names)
        if not clashes:
            return shown, True
        moved = False
        for rows in clashes:
            for i in rows:
                if choice[i] + 1 < len(options[i]):
                    choice[i] += 1
                    moved = True
        if not moved:
            return shown, False


class _LayerTable:
    """The per-layer table, laid out for the width it is rendered at: names get the
    room the other columns leave and are cut in the middle so rows stay distinct."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield _layer_table(self.report, options.max_width)


def _shown_rows(report: Report) -> list[int | None]:
    """Indices of the layers the table shows (``None``: the "... more" row)."""
    n = len(report.layers)
    if n <= _MAX_TABLE_ROWS:
        return list(range(n))
    half = _MAX_TABLE_ROWS // 2
    return [*range(half), None, *range(n - half, n)]


def _layout(names: list[str], total_width: int) -> tuple[list[str], int, int]:
    """The shown names and the widths of the flow bar and the sparkline."""
    for bar, spark in ((_BAR_WIDTH, _SPARK_WIDTH), (_COMPACT_WIDTH, _COMPACT_WIDTH)):
        room = total_width - _FIXED_COLUMNS - bar - spark
        width = max(_MIN_NAME_WIDTH, min(_MAX_NAME_WIDTH, room))
        shown, distinct = elide_names(names, width)
        if distinct:
            return shown, bar, spark
    return shown, _COMPACT_WIDTH, _COMPACT_WIDTH


def _layer_table(report: Report, total_width: int = 80) -> Table:
    flagged: dict[str, str] = {}
    for f in report.findings:
        for layer in f.layers:
            flagged.setdefault(layer, "!" if f.severity == "error" else "*")
    logs = [
        math.log10(ls.typical_norm) if ls.typical_norm > 0 else math.nan for ls in report.layers
    ]
    finite = [v for v in logs if math.isfinite(v)]
    lo, hi = (min(finite) - 0.5, max(finite)) if finite else (0.0, 0.0)
    col = {name: i for i, name in enumerate(report.flow.layers)}
    rows = _shown_rows(report)
    hidden = len(report.layers) - sum(r is not None for r in rows)
    shown, bar_width, spark_width = _layout(
        [report.layers[r].name for r in rows if r is not None], total_width
    )
    labels = iter(shown)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False, show_edge=False)
    table.add_column("layer", overflow="ellipsis", no_wrap=True)
    table.add_column("|g| typ", justify="right", no_wrap=True)
    table.add_column("flow (log)", no_wrap=True, min_width=bar_width)
    table.add_column("over run", no_wrap=True, min_width=spark_width)
    table.add_column("zeros", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for r in rows:
        if r is None:
            table.add_row(f"... {hidden} more", "", "", "", "", "")
            continue
        ls = report.layers[r]
        c = col.get(ls.name)
        history = [row[c] for row in report.flow.log10_norm] if c is not None else []
        table.add_row(
            next(labels),
            fmt(ls.typical_norm),
            _bar(logs[r], lo, hi, bar_width),
            _sparkline(history, spark_width),
            f"{ls.zero_frac:.0%}",
            flagged.get(ls.name, ""),
        )
    return table


def render_report(report: Report) -> Iterator[RenderableType]:
    """The renderables of a report, in order."""
    yield _summary(report)
    if report.coverage is not None:
        yield Text(coverage_line(report.coverage))
    for i, finding in enumerate(report.findings, 1):
        yield _finding_panel(i, finding)
    if report.layers:
        yield Group(
            Text("Gradient norm per layer, first to last (* warning, ! error):", style="bold"),
            _LayerTable(report),
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

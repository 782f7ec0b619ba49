"""The end-of-run :class:`Report`: findings, per-layer summaries and the flow history.

A report renders with rich (``print(report)`` or ``rich.print(report)``), saves to
JSON and reads back exactly::

    report.to_json("run.json")
    same = gradwatch.Report.from_json("run.json")
    assert same == report

rich is imported only when a report is rendered.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradwatch.findings import SEVERITY_RANK, Finding
from gradwatch.fixes import Fix

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console, ConsoleOptions, RenderResult

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class LayerSummary:
    """Whole-run gradient statistics of one layer group (a module).

    ``typical_norm`` is the geometric mean of the positive finite per-step norms; ``0``
    when the layer's gradient was never positive and finite.
    """

    name: str
    steps: int
    typical_norm: float
    min_norm: float
    max_norm: float
    last_norm: float
    max_abs: float
    zero_frac: float
    nonfinite: int
    numel: int


@dataclass(frozen=True, slots=True)
class FlowHistory:
    """Downsampled per-layer gradient norms: ``log10_norm[b][c]`` for bin ``b`` starting
    at ``bin_steps[b]`` and layer ``layers[c]``; ``NaN`` where a layer had no gradient."""

    bin_steps: tuple[int, ...] = ()
    layers: tuple[str, ...] = ()
    log10_norm: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class Coverage:
    """What a run's report judged, against what the model holds.

    Attributes:
        parameters_trainable: trainable parameter tensors of the model.
        parameters_observed: those whose gradient was observed at least once.
        layers_not_observed: the layer groups of the trainable parameters never
            observed (no gradient reached them on a sampled step), model order.
        activation_sites: activation sites observed, counted by kind
            (``{"relu": 3, "gelu": 2}``), from modules and functional calls alike.
        activation_modules: activation-like modules in the model (a known activation
            class, or a class named ``...Activation``).
        activation_modules_not_observed: those never observed (unknown kinds, or not
            called in a sampled training forward).
    """

    parameters_trainable: int = 0
    parameters_observed: int = 0
    layers_not_observed: tuple[str, ...] = ()
    activation_sites: dict[str, int] = field(default_factory=dict)
    activation_modules: int = 0
    activation_modules_not_observed: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Coverage:
        """Inverse of the ``coverage`` entry of :meth:`Report.to_dict`."""
        _known_keys(raw, _COVERAGE_KEYS, "coverage")
        sites = raw["activation_sites"]
        if not isinstance(sites, dict):
            raise ValueError(f"not a gradwatch report: {sites!r} where an object belongs")
        return cls(
            parameters_trainable=_int(raw["parameters_trainable"]),
            parameters_observed=_int(raw["parameters_observed"]),
            layers_not_observed=_strs(raw["layers_not_observed"]),
            activation_sites={_str(k): _int(v) for k, v in sites.items()},
            activation_modules=_int(raw["activation_modules"]),
            activation_modules_not_observed=_strs(raw["activation_modules_not_observed"]),
        )


@dataclass(frozen=True, slots=True)
class Report:
    """Everything gradwatch concluded about one run.

    Attributes:
        findings: most severe first.
        layers: one summary per layer group, first layer to last.
        first_step, last_step: the step range observed (``-1`` when nothing was).
        steps_observed: how many steps were analysed.
        flow: the downsampled gradient-flow history for plots.
        notes: what was not covered (e.g. activations gradwatch could not hook), or
            why monitoring stopped.
        stopped_at: the step at which an internal error switched monitoring off, or
            ``None`` when it watched to the end. Nothing after it was judged.
        framework: ``"torch"`` or ``"keras"``, the framework of the run, whose spelling
            the fixes use; ``None`` for a framework-free run (fixes show both).
        coverage: what was judged against what the model holds (:class:`Coverage`);
            ``None`` when the adapter did not say (the core :class:`~gradwatch.Analyzer`
            alone knows only what it was given).
    """

    findings: tuple[Finding, ...] = ()
    layers: tuple[LayerSummary, ...] = ()
    first_step: int = -1
    last_step: int = -1
    steps_observed: int = 0
    flow: FlowHistory = field(default_factory=FlowHistory)
    notes: tuple[str, ...] = ()
    stopped_at: int | None = None
    schema_version: int = SCHEMA_VERSION
    framework: str | None = None
    coverage: Coverage | None = None

    def __eq__(self, other: object) -> bool:
        # Field by field, except that NaN equals NaN: a report holding a NaN (a layer
        # that appeared late, a norm never positive) must equal its JSON round trip.
        if not isinstance(other, Report):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    @property
    def healthy(self) -> bool:
        """No finding of severity warning or error, over a run that was watched: at least
        one step observed and no internal error cutting monitoring short. A report never
        calls healthy what it did not see."""
        if self.steps_observed == 0 or self.stopped_at is not None:
            return False
        return not self.problems

    @property
    def problems(self) -> tuple[Finding, ...]:
        """The findings of severity warning or error."""
        return tuple(
            f for f in self.findings if SEVERITY_RANK[f.severity] >= SEVERITY_RANK["warning"]
        )

    def by_rule(self, rule_id: str) -> Finding | None:
        """The finding of ``rule_id``, or ``None``."""
        return next((f for f in self.findings if f.rule == rule_id), None)

    # --- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite floats become the strings ``"NaN"``, ``"Infinity"``,
        ``"-Infinity"``), with ``schema_version``."""
        raw = asdict(self)
        # A fix is saved as the text it shows: its per-framework spellings stay behind.
        raw["findings"] = [
            {**asdict(f), "fixes": [{"id": x.id, "text": x.text} for x in f.fixes]}
            for f in self.findings
        ]
        encoded: dict[str, Any] = _encode(raw)
        return encoded

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: for anything that is not a report of this schema, in one line.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"a report is a JSON object, got {type(raw).__name__}")
        try:
            return cls._from_checked_dict(raw)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"not a gradwatch report: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_checked_dict(cls, raw: dict[str, Any]) -> Report:
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"unsupported report schema_version {version!r}; expected {SCHEMA_VERSION}"
            )
        d = raw
        _known_keys(d, _REPORT_KEYS, "report")
        for f in d["findings"]:
            _known_keys(f, _FINDING_KEYS, "finding")
        _known_keys(d["flow"], _FLOW_KEYS, "flow")
        findings = tuple(
            Finding(
                rule=_str(f["rule"]),
                severity=_str(f["severity"]),
                layers=_strs(f["layers"]),
                first_step=_int(f["first_step"]),
                last_step=_int(f["last_step"]),
                message=_str(f["message"]),
                evidence={str(k): _num(v) for k, v in f["evidence"].items()},
                fixes=tuple(Fix(_str(x["id"]), _str(x["text"])) for x in f["fixes"]),
            )
            for f in d["findings"]
        )
        layers = tuple(
            LayerSummary(**{k: _str(v) if k == "name" else _num(v) for k, v in ls.items()})  # type: ignore[arg-type]
            for ls in d["layers"]
        )
        fl = d["flow"]
        n_cols = len(fl["layers"])
        if len(fl["log10_norm"]) != len(fl["bin_steps"]) or any(
            len(row) != n_cols for row in fl["log10_norm"]
        ):
            raise ValueError("not a gradwatch report: flow rows do not match bins and layers")
        flow = FlowHistory(
            bin_steps=tuple(_int(s) for s in fl["bin_steps"]),
            layers=_strs(fl["layers"]),
            log10_norm=tuple(tuple(_num(v) for v in row) for row in fl["log10_norm"]),
        )
        return cls(
            findings=findings,
            layers=layers,
            first_step=_int(d["first_step"]),
            last_step=_int(d["last_step"]),
            steps_observed=_int(d["steps_observed"]),
            flow=flow,
            notes=_strs(d["notes"]),
            stopped_at=None if d.get("stopped_at") is None else _int(d["stopped_at"]),
            schema_version=int(d["schema_version"]),
            framework=None if d.get("framework") is None else _str(d["framework"]),
            coverage=None if d.get("coverage") is None else Coverage.from_dict(d["coverage"]),
        )

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Report:
        """Read a report written by :meth:`to_json`, from a path or from JSON text."""
        text = str(path_or_text)
        if not text.lstrip().startswith(("{", "[")):
            text = Path(path_or_text).read_text(encoding="utf-8")
        try:
            raw = json.loads(text)
        except RecursionError:
            raise ValueError("not a gradwatch report: JSON nested too deeply") from None
        return cls.from_dict(raw)

    # --- rendering -------------------------------------------------------------------

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from gradwatch.render import render_report

        yield from render_report(self)

    def render(self, width: int = 80, color: bool = False) -> str:
        """The console report as text."""
        from gradwatch.render import render_to_text

        return render_to_text(self, width=width, color=color)

    def __str__(self) -> str:
        return self.render()

    def plot(self, path: str | Path) -> Path:
        """Write the gradient-flow picture as a PNG (needs the ``plot`` extra: matplotlib)."""
        from gradwatch.plot import plot_report

        return plot_report(self, path)


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


_REPORT_KEYS = frozenset(
    ("findings", "layers", "first_step", "last_step", "steps_observed", "flow", "notes")
) | {"stopped_at", "schema_version", "framework", "coverage"}
_FINDING_KEYS = frozenset(
    ("rule", "severity", "layers", "first_step", "last_step", "message", "evidence", "fixes")
)
_FLOW_KEYS = frozenset(("bin_steps", "layers", "log10_norm"))
_COVERAGE_KEYS = frozenset(
    (
        "parameters_trainable",
        "parameters_observed",
        "layers_not_observed",
        "activation_sites",
        "activation_modules",
        "activation_modules_not_observed",
    )
)


def _known_keys(value: Any, known: frozenset[str], what: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"not a gradwatch report: a {what} is an object, got {value!r}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"not a gradwatch report: unknown {what} keys {unknown}")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a gradwatch report: {value!r} where a string belongs")
    return value


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"not a gradwatch report: {value!r} where a list of strings belongs")
    return tuple(_str(v) for v in value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not a gradwatch report: {value!r} where an integer belongs")
    return value


def _num(value: Any) -> Any:
    """A number from :meth:`Report.to_dict`: ints stay ints, the non-finite strings
    become floats."""
    if isinstance(value, str):
        if value not in _NONFINITE:
            raise ValueError(f"not a gradwatch report: {value!r} where a number belongs")
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a gradwatch report: {value!r} where a number belongs")
    return value

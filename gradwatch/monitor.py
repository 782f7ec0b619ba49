"""One training run as gradwatch sees it, whatever the framework: :class:`Monitor`.

Every adapter composes one ``Monitor``. It owns what is the same everywhere:

* the :class:`~gradwatch.Analyzer` and the :class:`~gradwatch.guard.Guard` that turns
  an internal error into one warning and switches monitoring off;
* the ``on_finding`` policy: warn once per rule, raise, stop, ignore or a callable;
* the end-of-run report: printed once, on rank zero only, or at interpreter exit
  when the run never asked for it;
* the logging sinks (``log_to=``, :meth:`Monitor.add_sink`): each observed batch goes to
  them in one write per flush (:mod:`gradwatch.sinks`);
* the framework the report speaks: its fixes are spelled for ``framework``.

An adapter only says when a step happens, turns its tensors into
:class:`~gradwatch.StepStats` (see :mod:`gradwatch.rows`) and calls :meth:`observe`.

Example:
    >>> from gradwatch import StepStats
    >>> m = Monitor(where="demo loop", show=False)
    >>> m.observe([StepStats(step=0, grad_total_norm=1.0)])
    >>> m.report().steps_observed
    1
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import shutil
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradwatch.analyzer import Analyzer
from gradwatch.config import check_bool, check_on_finding
from gradwatch.coverage import ModelContents, merge_coverage
from gradwatch.findings import SEVERITY_RANK, Finding
from gradwatch.guard import FindingError, Guard, warn
from gradwatch.layer_info import LayerInfo
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.sink_set import SinkSet
from gradwatch.sinks import Sink
from gradwatch.stats import StepStats

ON_FINDING_MODES = ("warn", "raise", "stop", "ignore")
FRAMEWORKS = ("torch", "keras")

# Monitors whose run never asked for its report: the one-line
# ``gradwatch.watch(model, optimizer)`` keeps no handle, so it prints at exit.
_UNREPORTED: weakref.WeakSet[Monitor] = weakref.WeakSet()


# Monitors with sinks still open: their writers are flushed and closed at exit.
_WITH_SINKS: weakref.WeakSet[Monitor] = weakref.WeakSet()


@atexit.register
def _report_unreported_at_exit() -> None:
    for monitor in list(_UNREPORTED):
        # Never turn a finished run into a crash at exit.
        with contextlib.suppress(Exception):
            monitor.report()
    for monitor in list(_WITH_SINKS):
        with contextlib.suppress(Exception):
            monitor.close()


class Monitor:
    """The framework-neutral run: analyzer, guard, finding policy and report.

    Args:
        where: what the adapter is, for messages (``"torch adapter"``). Defaults to
            ``"core"``.
        rules: the rules to apply. Defaults to :data:`gradwatch.DEFAULT_RULES`.
        window: steps the analyzer keeps. Defaults to ``64``.
        check_every: run the rules every this many steps. Defaults to ``1``.
        on_finding: ``"warn"`` (one :class:`~gradwatch.GradwatchWarning` per rule),
            ``"raise"`` (:class:`~gradwatch.FindingError`), ``"stop"`` (calls ``stop``),
            ``"ignore"``, or a callable receiving every new finding. Defaults to ``"warn"``.
        modes: the string modes this adapter supports. Defaults to all four.
        strict: re-raise internal errors. Defaults to ``False``.
        show: print the report from :meth:`report`. Defaults to ``True``.
        report_at_exit: print the report at interpreter exit if :meth:`report` was
            never called. Defaults to ``False``.
        rank_zero: whether this process prints and warns (only rank 0 of a
            distributed job does). Defaults to ``True``.
        width: console width of the printed report; ``None`` is the terminal's, at
            most 100. Defaults to ``None``.
        stop: asks the training loop to stop, for ``on_finding="stop"``. Defaults to
            ``None``.
        before_raise: runs before a :class:`~gradwatch.FindingError` leaves, so an
            adapter can undo its patches first. Defaults to ``None``.
        before_report: runs before a report is built (an adapter's flush). Defaults
            to ``None``.
        log_to: where the per-step numbers go: a TensorBoard log directory (``str`` or
            ``Path``), a ``torch.utils.tensorboard.SummaryWriter``, a wandb run, the
            ``mlflow`` module, a callable ``(step, {name: value})``, a
            :class:`~gradwatch.sinks.Sink`, or a list of those. Written once per
            :meth:`observe` (the adapter's flush), on rank zero only; tags are in
            ``docs/logging.md``. A failing sink warns once and stops logging, monitoring
            goes on (``strict=True`` raises). Defaults to ``None``: nowhere.
        framework: ``"torch"`` or ``"keras"``: the report, its warnings and its fixes
            speak this framework's spelling. Defaults to ``None``: both spellings.

    Raises:
        ValueError: naming the bad parameter.
        TypeError: naming ``log_to``, for a target of no known kind.
    """

    def __init__(
        self,
        *,
        where: str = "core",
        rules: Sequence[Rule | str] = DEFAULT_RULES,
        window: int = 64,
        check_every: int = 1,
        on_finding: str | Callable[[Finding], Any] = "warn",
        modes: Sequence[str] = ON_FINDING_MODES,
        strict: bool = False,
        show: bool = True,
        report_at_exit: bool = False,
        rank_zero: bool = True,
        width: int | None = None,
        stop: Callable[[], None] | None = None,
        before_raise: Callable[[], None] | None = None,
        before_report: Callable[[], None] | None = None,
        log_to: Any = None,
        framework: str | None = None,
    ) -> None:
        self.on_finding = check_on_finding(on_finding, modes)
        check_bool("strict", strict)
        check_bool("show", show)
        if framework is not None and framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS} or None, got {framework!r}")
        self.framework = framework
        self.strict = strict
        self._sinks = SinkSet(framework, strict)
        if log_to is not None:
            self.add_sink(log_to)
        self.where = where
        self.show = show
        self.rank_zero = rank_zero
        self.width = width
        self.guard = Guard(f"gradwatch {where}", strict=strict)
        self.analyzer = Analyzer(
            rules, window=window, check_every=check_every, strict=strict, on_finding=self._handle
        )
        # At the end of a run a finding can no longer stop or raise out of it: it warns.
        self.final = False
        self.error_step: int | None = None
        self._stop = stop
        self._before_raise = before_raise
        self._before_report = before_report
        self._warned: set[str] = set()
        self._coverage: ModelContents | None = None
        if report_at_exit and show:
            _UNREPORTED.add(self)

    # --- input ---------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False once an internal error (the adapter's or the analyzer's) switched it off."""
        return self.guard.enabled and self.analyzer.enabled

    def observe(self, stats: StepStats | Sequence[StepStats]) -> None:
        """Hand reduced statistics to the analyzer; findings are dispatched here, then
        the batch goes to the sinks in one write each (also when a finding raises)."""
        batch = [stats] if isinstance(stats, StepStats) else list(stats)
        try:
            self.analyzer.observe_stats(batch)
        finally:
            if self._sinks and batch and self.rank_zero:
                self._sinks.log(batch, self.analyzer.findings, set(self.analyzer.open_rules))

    # --- sinks ---------------------------------------------------------------------

    def add_sink(self, target: Any) -> Sink:
        """Also log every observed batch to ``target`` (anything ``log_to=`` takes; a
        trainer callback passes a callable that routes to its trainer's logger).

        Returns:
            the :class:`~gradwatch.sinks.Sink` (the last one, for a list).

        Raises:
            TypeError, ValueError: naming ``log_to``, for a target of no known kind.
        """
        sink = self._sinks.add(target)
        _WITH_SINKS.add(self)
        return sink

    @property
    def sinks(self) -> tuple[Sink, ...]:
        """The sinks still logging (a failed one is dropped)."""
        return self._sinks.live

    def set_coverage(
        self,
        parameters: Sequence[str],
        activation_sites: Mapping[str, str],
        activation_modules: Mapping[str, str],
    ) -> None:
        """What the model holds, for the report's :class:`~gradwatch.report.Coverage`
        (the latest call wins; merged with what the analyzer observed at report time).

        Args:
            parameters: names of the trainable parameters.
            activation_sites: the activation sites observed so far, name -> kind.
            activation_modules: the activation-like modules, name -> kind (``"other"``
                for a class gradwatch does not know).
        """
        self._coverage = ModelContents(
            tuple(parameters), dict(activation_sites), dict(activation_modules)
        )

    def set_layer_info(self, info: Mapping[str, LayerInfo]) -> None:
        """What the adapter knows of each parameter's layer (which activation it feeds,
        its fan-in, whether it is recurrent), keyed by parameter name; see
        :meth:`gradwatch.Analyzer.set_layer_info`."""
        self.analyzer.set_layer_info(info)

    def note(self, text: str) -> None:
        """A coverage note for the report (once, however often it is added)."""
        self.analyzer.add_note(text)

    # --- findings ------------------------------------------------------------------

    def _spell(self, finding: Finding) -> Finding:
        if self.framework is None or not finding.fixes:
            return finding
        return dataclasses.replace(
            finding, fixes=tuple(fix.spelled(self.framework) for fix in finding.fixes)
        )

    def _handle(self, finding: Finding) -> None:
        finding = self._spell(finding)
        mode = self.on_finding
        if callable(mode):
            mode(finding)
            return
        if mode == "ignore" or SEVERITY_RANK[finding.severity] < SEVERITY_RANK["warning"]:
            return
        if mode == "raise" and not self.final:
            if self._before_raise is not None:
                self._before_raise()
            raise FindingError(finding)
        if not self.rank_zero or finding.rule in self._warned:
            return
        self._warned.add(finding.rule)
        fix = f" Try first: {finding.fixes[0].text}" if finding.fixes else ""
        text = (
            f"gradwatch {finding.severity} [{finding.rule}] at step {finding.first_step}: "
            f"{finding.message}{fix}"
        )
        if mode == "stop" and not self.final and self._stop is not None:
            self._stop()
            text += " Stopping training (on_finding='stop')."
        warn(text)

    # --- output --------------------------------------------------------------------

    def report(self, show: bool | None = None) -> Report:
        """The :class:`Report` so far; printed (rank zero only) when ``show``.

        Args:
            show: print it. Defaults to the ``show`` given at construction.
        """
        _UNREPORTED.discard(self)
        if self._before_report is not None:
            self._before_report()
        error = self.guard.error
        if error is not None:
            at = f" at step {self.error_step}" if self.error_step is not None else ""
            self.note(
                f"Monitoring stopped early{at} after an internal error in the {self.where}: "
                f"{type(error).__name__}: {error}"
            )
        report = self.analyzer.report()
        if error is not None and report.stopped_at is None:
            stopped = self.error_step if self.error_step is not None else report.last_step
            report = dataclasses.replace(report, stopped_at=stopped)
        if self._coverage is not None:
            coverage = merge_coverage(self._coverage, report, self.analyzer.group_of)
            report = dataclasses.replace(report, coverage=coverage)
        if self.framework is not None:
            report = dataclasses.replace(
                report,
                framework=self.framework,
                findings=tuple(self._spell(f) for f in report.findings),
            )
        self._sinks.flush()
        if (self.show if show is None else show) and self.rank_zero:
            print(render_for_console(report, self.width))
        return report

    def close(self) -> None:
        """Forget the at-exit report (the adapter removed its hooks) and close the sinks:
        flush them, and close the writers gradwatch opened itself. Idempotent."""
        _UNREPORTED.discard(self)
        _WITH_SINKS.discard(self)
        self._sinks.flush(close=True)


def render_for_console(report: Report, width: int | None = None) -> str:
    """The report as console text; a plain fallback if rendering fails, so a report
    is never lost to a renderer problem."""
    if width is None:
        width = min(100, shutil.get_terminal_size((80, 24)).columns)
    try:
        return report.render(width=width)
    except Exception:
        lines = [f"gradwatch: {report.steps_observed} steps observed"]
        missing = report.coverage.layers_not_observed if report.coverage else ()
        if report.healthy:
            where = f" where observed; {len(missing)} layers not observed" if missing else ""
            lines.append(f"  gradient flow looks healthy{where}")
        for f in report.findings:
            lines.append(f"  [{f.severity}] {f.rule}: {f.message}")
            lines.extend(f"      fix: {fix.text}" for fix in f.fixes[:2])
        lines.extend(f"  note: {note}" for note in report.notes)
        return "\n".join(lines)


__all__ = ["ON_FINDING_MODES", "Monitor", "render_for_console"]

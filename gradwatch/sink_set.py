"""The sinks of one run: :class:`SinkSet` writes each observed batch to every sink once,
each behind its own guard, so a sink that fails stops alone and training goes on.

Example:
    >>> from gradwatch import StepStats
    >>> seen = []
    >>> sinks = SinkSet(framework=None, strict=False)
    >>> _ = sinks.add(lambda step, scalars: seen.append(step))
    >>> sinks.log([StepStats(step=3, grad_total_norm=1.0)], findings=(), open_rules=set())
    >>> seen
    [3]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradwatch.findings import Finding
from gradwatch.guard import Guard
from gradwatch.sinks import Sink, resolve_sink, scalars_for, sinks_of
from gradwatch.stats import StepStats

_CONSEQUENCE = "it logs nothing more, training and monitoring continue"


class SinkSet:
    """Every sink of a run, each with its guard.

    Args:
        framework: ``"torch"``, ``"keras"`` or ``None``: how a directory target is
            written (torch's ``SummaryWriter`` or ``tf.summary`` first).
        strict: re-raise a sink's errors instead of warning once and dropping it.
    """

    def __init__(self, framework: str | None, strict: bool) -> None:
        self.framework = framework
        self.strict = strict
        self._sinks: list[tuple[Sink, Guard]] = []
        self._rows_guard = Guard("gradwatch logging", strict=strict, consequence=_CONSEQUENCE)

    def add(self, target: Any) -> Sink:
        """Resolve ``target`` (anything ``log_to=`` takes) and log to it from now on.

        Raises:
            TypeError, ValueError: naming ``log_to``, for a target of no known kind.
        """
        sink = resolve_sink(target, self.framework)
        for one in sinks_of(sink):
            guard = Guard(
                f"gradwatch logging to {one.name}", strict=self.strict, consequence=_CONSEQUENCE
            )
            self._sinks.append((one, guard))
        return sink

    def __bool__(self) -> bool:
        return bool(self._sinks)

    @property
    def live(self) -> tuple[Sink, ...]:
        """The sinks still logging (a failed one is dropped)."""
        return tuple(sink for sink, guard in self._sinks if guard.enabled)

    def log(
        self, batch: Sequence[StepStats], findings: Sequence[Finding], open_rules: set[str]
    ) -> None:
        """One write per sink for the whole batch; findings go on its last step (they are
        judged after the whole batch)."""
        live = [(sink, guard) for sink, guard in self._sinks if guard.enabled]
        if not live or not batch or not self._rows_guard.enabled:
            return
        rows: list[tuple[int, dict[str, float]]] | None = None
        with self._rows_guard:
            rows = [(int(s.step), scalars_for(s)) for s in batch[:-1]]
            last = batch[-1]
            rows.append((int(last.step), scalars_for(last, findings, open_rules)))
        if rows is None:  # building them failed: the guard warned, logging is off
            return
        for sink, guard in live:
            with guard:
                sink.write(rows)

    def flush(self, close: bool = False) -> None:
        """Flush every live sink; with ``close``, close the writers gradwatch opened and
        forget them all."""
        for sink, guard in self._sinks:
            if guard.enabled:
                with guard:
                    if close:
                        sink.close()
                    else:
                        sink.flush()
        if close:
            self._sinks.clear()


__all__ = ["SinkSet"]

"""What the trainer callbacks share: their options, checked once, and :class:`TrainerRun`.

A trainer callback (Lightning, Hugging Face Trainer) only knows *when* the gradients the
optimizer will apply are final. Everything else is the torch adapter's: a
:class:`~gradwatch.adapters.torch.TorchWatch` over the trainer's model does the reductions,
activation capture, guard, ``on_finding`` policy and report.

The watch is driven by :class:`StepMarker`, an optimizer over the model's parameters whose
``step()`` updates nothing: the trainer's own optimizer cannot serve, because its ``step()``
either runs the backward pass and the clipping inside its closure (Lightning's
``optimizer.step(closure)``) or comes after clipping (HF). Calling ``marker.step()`` is one
optimizer step for the watch, under the torch adapter's documented rule, and a backward
pass alone never counts as one (``watch()`` without an optimizer would count the first
backward pass as a step before the first hand-marked one).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from gradwatch.adapters.torch import (
    DEFAULT_ACTIVATION_SCHEDULE,
    DEFAULT_GRAD_SCHEDULE,
    DEFAULT_NORM_SCHEDULE,
    TorchWatch,
)
from torch import nn

from gradwatch.analyzer import Analyzer
from gradwatch.config import check_bool, check_int, check_on_finding, check_schedule
from gradwatch.findings import Finding
from gradwatch.guard import FindingError, GradwatchWarning, Guard
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.schedules import Schedule

# The modes TorchWatch implements; a callable receives every new finding.
ON_FINDING_MODES = ("warn", "raise", "ignore")
_USE_THE_CALLBACK = r"gradwatch\.watch\(\) inside Lightning"


class StepMarker(torch.optim.Optimizer):
    """An optimizer over the model's parameters whose ``step()`` changes nothing: calling
    it tells the watch that one optimizer step's gradients are final."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        super().__init__(list(params), {})

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None


@dataclass(frozen=True)
class WatchOptions:
    """The knobs of :func:`gradwatch.watch` that a trainer callback passes on, checked."""

    on_finding: str | Callable[[Finding], None] = "warn"
    rules: Sequence[Rule | str] = DEFAULT_RULES
    strict: bool = False
    activations: bool = True
    grad_schedule: Schedule = DEFAULT_GRAD_SCHEDULE
    activation_schedule: Schedule = DEFAULT_ACTIVATION_SCHEDULE
    norm_schedule: Schedule = DEFAULT_NORM_SCHEDULE
    flush_every: int = 20
    verbose: bool = True

    def __post_init__(self) -> None:
        check_on_finding(self.on_finding, ON_FINDING_MODES)
        rules = [self.rules] if isinstance(self.rules, str) else self.rules
        if not isinstance(rules, Sequence) or not all(isinstance(r, Rule | str) for r in rules):
            raise ValueError(
                f"rules must be a sequence of Rule instances or rule ids, got {rules!r}"
            )
        Analyzer(self.rules)  # the core's own checks: known ids, windows, no duplicates
        check_bool("strict", self.strict)
        check_bool("activations", self.activations)
        check_bool("verbose", self.verbose)
        check_schedule("grad_schedule", self.grad_schedule)
        check_schedule("activation_schedule", self.activation_schedule)
        check_schedule("norm_schedule", self.norm_schedule)
        check_int("flush_every", self.flush_every, minimum=1)


class TrainerRun:
    """One training run of a trainer callback: the watch, its step marker and the report.

    ``start`` at train begin (closing any earlier run, so one callback serves several
    fits), ``step`` when an optimizer step's gradients are final, ``finish`` at train end.
    """

    def __init__(self, options: WatchOptions, where: str) -> None:
        self.options = options
        self.watch: TorchWatch | None = None
        self.report: Report | None = None
        self._marker: StepMarker | None = None
        self._where = f"gradwatch {where}"

    @property
    def live(self) -> bool:
        """A watch is open (between ``start`` and ``finish``)."""
        return self.watch is not None and not self.watch.closed

    def start(self, model: nn.Module) -> None:
        self.abort()
        self.report = None
        o = self.options
        # Never crash training: a watch that cannot start warns once and the run goes on.
        with Guard(self._where, strict=o.strict), warnings.catch_warnings():
            # The torch adapter's advice to use this very callback instead of watch().
            warnings.filterwarnings("ignore", message=_USE_THE_CALLBACK, category=GradwatchWarning)
            marker = StepMarker(model.parameters())
            self.watch = TorchWatch(
                model,
                marker,
                on_finding=o.on_finding,
                grad_schedule=o.grad_schedule,
                activations=o.activations,
                activation_schedule=o.activation_schedule,
                norm_schedule=o.norm_schedule,
                flush_every=o.flush_every,
                rules=o.rules,
                strict=o.strict,
                show=False,
            )
            self._marker = marker

    def step(self) -> None:
        """One optimizer step: the watch reads the gradients as they are now."""
        if self._marker is not None and self.live:
            self._marker.step()  # the watch's hook runs inside the watch's own guard

    def finish(self, show: bool) -> Report | None:
        """Report (printed when ``show``), then close the watch: every hook removed."""
        watch, self.watch, self._marker = self.watch, None, None
        if watch is None or watch.closed:
            return self.report
        try:
            with Guard(self._where, strict=self.options.strict):
                self.report = watch.report(show=show)
        finally:
            watch.close()  # the report drained every pending step: nothing left to raise
        return self.report

    def abort(self) -> None:
        """Close after an exception in training: keep the report, print nothing, raise
        nothing (not even a finding in ``on_finding="raise"`` mode)."""
        with contextlib.suppress(FindingError):
            self.finish(show=False)


__all__ = ["ON_FINDING_MODES", "StepMarker", "TrainerRun", "WatchOptions"]

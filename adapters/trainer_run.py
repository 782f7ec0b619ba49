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
from typing import Any, ClassVar

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
from gradwatch.sinks import Sink, resolve_sink

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
    log_to: Any = None
    log_to_trainer: bool = True

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
        check_bool("log_to_trainer", self.log_to_trainer)
        if self.log_to is not None:
            # The checks the watch's Monitor runs at each fit, run now: a bad target fails
            # where it is written (TypeError/ValueError naming log_to), never mid-training.
            # A directory's writer is deferred to its first write, so this opens nothing.
            resolve_sink(self.log_to, "torch")

    def targets(self, route: Sink | None) -> Any:
        """What the watch's ``log_to`` gets: the user's targets and the trainer route."""
        given = self.log_to if isinstance(self.log_to, (list, tuple)) else [self.log_to]
        targets = [t for t in (*given, route) if t is not None]
        if not targets:
            return None
        return targets[0] if len(targets) == 1 else targets


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

    def start(self, model: nn.Module, route: Sink | None = None) -> None:
        """Open a watch over ``model``; ``route`` (the trainer's logger) also receives
        every flush when the options' ``log_to_trainer`` is on."""
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
                log_to=o.targets(route if o.log_to_trainer else None),
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


_OPTIONS_DOC = """Args:
        on_finding: ``"warn"`` (one :class:`~gradwatch.GradwatchWarning` per rule),
            ``"raise"`` (:class:`~gradwatch.FindingError` stops {training}), ``"ignore"``,
            or a callable taking each new :class:`~gradwatch.Finding`. Defaults to ``"warn"``.
        rules: rule instances or built-in rule ids. Defaults to
            :data:`gradwatch.DEFAULT_RULES`.
        strict: re-raise internal errors instead of warning once and switching off.
            Defaults to ``False``.
        activations: capture activation statistics with forward hooks. Defaults to ``True``.
        grad_schedule: ``step -> bool``, steps whose gradients are reduced per layer.
            Defaults to the torch adapter's (every step up to 50, then every 10th).
        activation_schedule: ``step -> bool`` for activations. Defaults to the torch
            adapter's.
        norm_schedule: ``step -> bool``, other steps whose total norm is taken. Defaults
            to the torch adapter's (every 3rd step).
        flush_every: steps between host copies; findings appear, and the numbers are
            logged, at flushes. Defaults to ``20``.
        verbose: print the report at the end of training. Defaults to ``True``.
        log_to: where the per-step numbers also go: a TensorBoard log directory (``str``
            or ``Path``), a ``torch.utils.tensorboard.SummaryWriter``, a wandb run, the
            ``mlflow`` module, a callable ``(step, {{tag: value}})``, a
            :class:`~gradwatch.sinks.Sink`, or a list of those; tags in
            ``docs/logging.md``. Defaults to ``None``: only the trainer's logger.
        log_to_trainer: also log the numbers through the trainer's own logger:
            {trainer_logger}.
            ``False`` keeps them out of it. Defaults to ``True``.

    Attributes:
        report: the :class:`~gradwatch.Report` of the last {training} (``None`` before
            one ends).
        watch: the :class:`~gradwatch.adapters.torch.TorchWatch` of the running
            {training} (``None`` outside one).

    Raises:
        ValueError: for a bad argument, naming it.
        TypeError: for a ``log_to`` target of no known kind, naming ``log_to``."""


class WatchingCallback:
    """The constructor, options and properties both trainer callbacks share.

    A subclass names itself in the class statement: ``where`` (for messages),
    ``training`` (what ``on_finding="raise"`` stops) and ``trainer_logger`` (where
    ``log_to_trainer`` sends the numbers); they fill the ``{options}`` line of its
    docstring with the documented arguments, attributes and errors.
    """

    _where: ClassVar[str] = "trainer callback"

    def __init_subclass__(
        cls, *, where: str, training: str, trainer_logger: str, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls._where = where
        options = _OPTIONS_DOC.format(training=training, trainer_logger=trainer_logger)
        cls.__doc__ = (cls.__doc__ or "").replace("{options}", options)

    def __init__(
        self,
        *,
        on_finding: str | Callable[[Finding], None] = "warn",
        rules: Sequence[Rule | str] = DEFAULT_RULES,
        strict: bool = False,
        activations: bool = True,
        grad_schedule: Schedule = DEFAULT_GRAD_SCHEDULE,
        activation_schedule: Schedule = DEFAULT_ACTIVATION_SCHEDULE,
        norm_schedule: Schedule = DEFAULT_NORM_SCHEDULE,
        flush_every: int = 20,
        verbose: bool = True,
        log_to: Any = None,
        log_to_trainer: bool = True,
    ) -> None:
        """Check every option (``ValueError`` naming it; ``TypeError`` naming ``log_to``
        for a target of no known kind). The arguments are in the class docstring."""
        super().__init__()
        options = WatchOptions(
            on_finding=on_finding,
            rules=rules,
            strict=strict,
            activations=activations,
            grad_schedule=grad_schedule,
            activation_schedule=activation_schedule,
            norm_schedule=norm_schedule,
            flush_every=flush_every,
            verbose=verbose,
            log_to=log_to,
            log_to_trainer=log_to_trainer,
        )
        self._run = TrainerRun(options, where=self._where)

    @property
    def report(self) -> Report | None:
        """The Report of the last training run (``None`` before one ends)."""
        return self._run.report

    @property
    def watch(self) -> TorchWatch | None:
        """The watch of the running training (``None`` outside one)."""
        return self._run.watch


__all__ = ["ON_FINDING_MODES", "StepMarker", "TrainerRun", "WatchOptions", "WatchingCallback"]

"""The Hugging Face Trainer callback: :class:`HFTrainerCallback`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradwatch.adapters.torch import (
    DEFAULT_ACTIVATION_SCHEDULE,
    DEFAULT_GRAD_SCHEDULE,
    DEFAULT_NORM_SCHEDULE,
    TorchWatch,
)
from gradwatch.adapters.trainer_run import TrainerRun, WatchOptions
from gradwatch.adapters.transformers.clip import ClipTap, find_trainer
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradwatch.findings import Finding
from gradwatch.guard import FindingError
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.schedules import Schedule


class HFTrainerCallback(TrainerCallback):
    """Watches the gradient flow of a ``transformers.Trainer`` model during ``train()``.

    A step is one optimizer step: after ``gradient_accumulation_steps`` micro-batches and
    AMP unscaling, before ``max_grad_norm`` clipping (see :mod:`gradwatch.adapters.transformers`).
    The report prints at the end of training on the main process and stays in :attr:`report`.

    Args:
        on_finding: ``"warn"`` (one :class:`~gradwatch.GradwatchWarning` per rule),
            ``"raise"`` (:class:`~gradwatch.FindingError` stops ``train()``), ``"ignore"``,
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
        flush_every: steps between host copies; findings appear at flushes. Defaults to
            ``20``.
        verbose: print the report at the end of training. Defaults to ``True``.

    Attributes:
        report: the :class:`~gradwatch.Report` of the last ``train()`` (``None`` before).
        watch: the :class:`~gradwatch.adapters.torch.TorchWatch` of the running ``train()``.

    Raises:
        ValueError: for a bad argument, naming it.

    Example:
        >>> import gradwatch, transformers
        >>> cb = gradwatch.HFTrainerCallback(on_finding="ignore")
        >>> trainer = transformers.Trainer(model, args, callbacks=[cb])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> cb.report.healthy  # doctest: +SKIP
        True
    """

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
    ) -> None:
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
        )
        self._run = TrainerRun(options, where="Hugging Face Trainer callback")
        self._tap: ClipTap | None = None
        self._stepped = False  # this optimizer step's gradients were read already

    @property
    def report(self) -> Report | None:
        """The Report of the last ``train()`` (``None`` before one ends)."""
        return self._run.report

    @property
    def watch(self) -> TorchWatch | None:
        """The watch of the running ``train()`` (``None`` outside one)."""
        return self._run.watch

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._close()  # an earlier train() that raised never reached on_train_end
        self._stepped = False
        self._run.start(kwargs["model"])
        trainer = find_trainer(self)
        if trainer is not None and self._run.live:
            self._tap = ClipTap(trainer.accelerator, self._step)
        elif self._run.watch is not None and args.max_grad_norm > 0:
            self._run.watch.analyzer.add_note(
                "The Trainer was not found from its callback, so gradients were read at "
                f"on_pre_optimizer_step, after clipping to max_grad_norm={args.max_grad_norm}."
            )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step()  # only if no clip call came this step (DeepSpeed, no tap)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._stepped = False

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        try:
            self._run.finish(show=self._run.options.verbose and state.is_world_process_zero)
        finally:
            self._close()

    def _step(self) -> None:
        if self._stepped:
            return
        self._stepped = True
        try:
            self._run.step()
        except FindingError:
            self._close()  # on_finding="raise" ends train() here: on_train_end never runs
            raise

    def _close(self) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self._run.abort()


__all__ = ["HFTrainerCallback"]

"""The Lightning callback: :class:`LightningCallback`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from gradwatch.adapters.torch import (
    DEFAULT_ACTIVATION_SCHEDULE,
    DEFAULT_GRAD_SCHEDULE,
    DEFAULT_NORM_SCHEDULE,
    TorchWatch,
)
from gradwatch.adapters.trainer_run import TrainerRun, WatchOptions
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gradwatch.findings import Finding
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.schedules import Schedule


class LightningCallback(Callback):
    """Watches the gradient flow of a ``LightningModule`` during ``trainer.fit``.

    A step is one optimizer step: the gradients are read at ``on_before_optimizer_step``,
    after accumulation and AMP unscaling, before ``gradient_clip_val`` clipping. The
    report prints at the end of training on rank zero and stays in :attr:`report`.

    Args:
        on_finding: ``"warn"`` (one :class:`~gradwatch.GradwatchWarning` per rule),
            ``"raise"`` (:class:`~gradwatch.FindingError` stops ``fit``), ``"ignore"``, or a
            callable taking each new :class:`~gradwatch.Finding`. Defaults to ``"warn"``.
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
        report: the :class:`~gradwatch.Report` of the last fit (``None`` before one ends).
        watch: the :class:`~gradwatch.adapters.torch.TorchWatch` of the running fit.

    Raises:
        ValueError: for a bad argument, naming it.

    Example:
        >>> import gradwatch, lightning
        >>> cb = gradwatch.LightningCallback(on_finding="ignore")
        >>> trainer = lightning.Trainer(callbacks=[cb], max_steps=30)  # doctest: +SKIP
        >>> trainer.fit(module, loader)  # doctest: +SKIP
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
        self._run = TrainerRun(options, where="Lightning callback")

    @property
    def report(self) -> Report | None:
        """The Report of the last fit (``None`` before one ends)."""
        return self._run.report

    @property
    def watch(self) -> TorchWatch | None:
        """The watch of the running fit (``None`` outside one)."""
        return self._run.watch

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run.start(pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._run.step()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run.finish(show=self._run.options.verbose and trainer.is_global_zero)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._run.abort()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run.abort()  # a fit stopped before on_train_end (interrupt): hooks never stay


__all__ = ["LightningCallback"]

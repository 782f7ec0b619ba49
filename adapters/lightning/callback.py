"""The Lightning callback: :class:`LightningCallback`, and :class:`LoggersSink`, its route
to the trainer's loggers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from gradwatch.adapters.trainer_run import WatchingCallback
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gradwatch.sinks import Batch, Sink


class LoggersSink(Sink):
    """A Lightning trainer's loggers (``trainer.loggers``): ``log_metrics(scalars,
    step=step)`` on each, per step of each flush. The step is the optimizer step, the one
    Lightning logs ``self.log`` calls of that batch against."""

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = tuple(loggers)
        self.name = "Lightning logger " + ", ".join(type(lg).__name__ for lg in self.loggers)

    def write(self, batch: Batch) -> None:
        for logger in self.loggers:
            for step, scalars in batch:
                logger.log_metrics(dict(scalars), step=step)


class LightningCallback(
    WatchingCallback,
    Callback,
    where="Lightning callback",
    training="``fit``",
    trainer_logger="``log_metrics`` of each of ``trainer.loggers``, on global rank zero",
):
    """Watches the gradient flow of a ``LightningModule`` during ``trainer.fit``.

    A step is one optimizer step: the gradients are read at ``on_before_optimizer_step``,
    after accumulation and AMP unscaling, before ``gradient_clip_val`` clipping. The
    report prints at the end of training on rank zero and stays in :attr:`report`.

    The numbers also go to the trainer's loggers (a ``CSVLogger``, ``TensorBoardLogger``,
    ``WandbLogger``...) at each flush, on global rank zero, under the tags of
    ``docs/logging.md``: ``grad_2.0_norm/<param>``, ``grad_max_abs/<param>``,
    ``grad_zero_frac/<param>``, ``grad_norm``, ``act_dead_frac/<activation>``,
    ``act_tail_frac/<activation>`` and ``gradwatch/finding/<rule>``, each at its
    optimizer step.

    {options}

    Example:
        >>> import gradwatch, lightning
        >>> cb = gradwatch.LightningCallback(on_finding="ignore")
        >>> trainer = lightning.Trainer(callbacks=[cb], max_steps=30)  # doctest: +SKIP
        >>> trainer.fit(module, loader)  # doctest: +SKIP
        >>> cb.report.healthy  # doctest: +SKIP
        True
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = trainer.loggers if trainer.is_global_zero else []
        self._run.start(pl_module, route=LoggersSink(loggers) if loggers else None)

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


__all__ = ["LightningCallback", "LoggersSink"]

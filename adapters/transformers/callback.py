"""The Hugging Face Trainer callback: :class:`HFTrainerCallback`."""

from __future__ import annotations

from typing import Any

from gradwatch.adapters.trainer_run import WatchingCallback
from gradwatch.adapters.transformers.clip import ClipTap, find_trainer
from gradwatch.adapters.transformers.logs import LatestScalars, LogsTap
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradwatch.guard import FindingError


class HFTrainerCallback(
    WatchingCallback,
    TrainerCallback,
    where="Hugging Face Trainer callback",
    training="``train()``",
    trainer_logger="the logs of every ``on_log``, which the ``report_to`` integrations write",
):
    """Watches the gradient flow of a ``transformers.Trainer`` model during ``train()``.

    A step is one optimizer step: after ``gradient_accumulation_steps`` micro-batches and
    AMP unscaling, before ``max_grad_norm`` clipping (see :mod:`gradwatch.adapters.transformers`).
    The report prints at the end of training on the main process and stays in :attr:`report`.

    At each ``on_log`` the Trainer's logs also hold gradwatch's newest numbers (each tag's
    latest value from the flushes since the previous log), so ``report_to`` integrations
    write them: ``grad_2.0_norm/<param>``, ``grad_max_abs/<param>``,
    ``grad_zero_frac/<param>``, ``act_dead_frac/<activation>``,
    ``act_tail_frac/<activation>``, ``gradwatch/finding/<rule>``, the total norm as
    ``gradwatch/grad_norm`` (the Trainer's own ``grad_norm`` is left alone) and
    ``gradwatch/step``, gradwatch's step of those numbers. The console printers and
    ``state.log_history`` do not get them (:mod:`gradwatch.adapters.transformers.logs`).

    {options}

    Example:
        >>> import gradwatch, transformers
        >>> cb = gradwatch.HFTrainerCallback(on_finding="ignore")
        >>> trainer = transformers.Trainer(model, args, callbacks=[cb])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> cb.report.healthy  # doctest: +SKIP
        True
    """

    _tap: ClipTap | None = None
    _logs_tap: LogsTap | None = None
    _latest: LatestScalars | None = None
    _stepped = False  # this optimizer step's gradients were read already

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._close()  # an earlier train() that raised never reached on_train_end
        self._stepped = False
        # Only the main process's integrations write logs (and only its Monitor logs).
        to_logs = self._run.options.log_to_trainer and state.is_world_process_zero
        route = self._latest = LatestScalars() if to_logs else None
        self._run.start(kwargs["model"], route=route)
        trainer = find_trainer(self)
        if trainer is not None and self._run.live:
            self._tap = ClipTap(trainer.accelerator, self._step)
            if route is not None:
                self._logs_tap = LogsTap(trainer.callback_handler, route.pop)
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

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Without the Trainer there is no tap: the callbacks after this one still get them.
        if self._logs_tap is None and self._latest is not None and logs is not None:
            for tag, value in self._latest.pop().items():
                logs.setdefault(tag, value)  # never overwrite the Trainer's own keys

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
        if self._logs_tap is not None:
            self._logs_tap.remove()
            self._logs_tap = None
        self._latest = None
        self._run.abort()


__all__ = ["HFTrainerCallback"]

"""gradwatch's numbers in the Hugging Face Trainer's logs: :class:`LatestScalars` and
:class:`LogsTap`.

The Trainer hands one ``logs`` dict to every callback's ``on_log``; its ``report_to``
integrations (TensorBoard, wandb, MLflow, ...) are callbacks that write it. They stand
*before* the user's callbacks in the handler's list (``default_callbacks + callbacks``,
transformers 5.24 ``Trainer.__init__``), so numbers merged in gradwatch's own ``on_log``
would reach none of them. :class:`LogsTap` therefore wraps the handler's ``on_log`` for
the length of ``train()`` (an instance attribute, removed at the end, as
:class:`~gradwatch.adapters.transformers.clip.ClipTap` does) and merges them before any
callback runs.

Two things stay as the Trainer made them: the console printers (``ProgressCallback``,
``PrinterCallback``, which print every key; hundreds of per-layer tags would bury the
loss) get the logs without gradwatch's numbers, and ``state.log_history`` (saved in every
checkpoint's ``trainer_state.json``) never holds them: the Trainer copies the logs into it
before ``on_log``. After ``on_log`` the dict is as the Trainer passed it (``evaluate()``
returns it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from transformers import PrinterCallback, ProgressCallback

from gradwatch.sinks import TOTAL_NORM_TAG, Batch, Sink

#: The Trainer logs its own ``grad_norm``: the same quantity (the pre-clip total norm,
#: ``Trainer._clip_grad_norm``), but of the logging step, while gradwatch's is of its
#: latest flushed step. Ours is renamed so that neither overwrites the other.
HF_TOTAL_NORM_TAG = "gradwatch/grad_norm"
#: gradwatch's step of the newest numbers merged (0-based: the Trainer's ``global_step``
#: after that optimizer step is one more).
STEP_TAG = "gradwatch/step"

_PRINTERS = (ProgressCallback, PrinterCallback)


class LatestScalars(Sink):
    """Keeps each tag's newest value from the flushes since :meth:`pop` last ran."""

    name = "Hugging Face Trainer logs"

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}
        self._step: int | None = None

    def write(self, batch: Batch) -> None:
        for step, scalars in batch:
            self._pending.update(scalars)
            self._step = step

    def pop(self) -> dict[str, float]:
        """The numbers for the next ``on_log`` (empty when no flush came since the last):
        HF-route tags (``gradwatch/grad_norm``) and ``gradwatch/step``."""
        if self._step is None:
            return {}
        out = {
            (HF_TOTAL_NORM_TAG if tag == TOTAL_NORM_TAG else tag): value
            for tag, value in self._pending.items()
        }
        out[STEP_TAG] = self._step
        self._pending, self._step = {}, None
        return out


_MISSING = object()


class LogsTap:
    """Merges ``scalars()`` into the logs of every ``on_log`` callback but the console
    printers, while the tap is on ``handler`` (the Trainer's ``callback_handler``).

    Args:
        handler: the Trainer's ``CallbackHandler``.
        scalars: returns the numbers to merge now (empty: the call passes through).
    """

    def __init__(self, handler: Any, scalars: Callable[[], dict[str, float]]) -> None:
        self._handler = handler
        self._saved = handler.__dict__.get("on_log", _MISSING)
        original = handler.on_log

        @functools.wraps(original)
        def on_log(args: Any, state: Any, control: Any, logs: Any, **kwargs: Any) -> Any:
            extra = scalars() if isinstance(logs, dict) else {}
            if not extra:
                return original(args, state, control, logs, **kwargs)
            return self._dispatch(original, extra, args, state, control, logs, **kwargs)

        self._wrapper = on_log
        handler.on_log = on_log

    def _dispatch(
        self,
        original: Callable[..., Any],
        extra: dict[str, float],
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, Any],
        **kwargs: Any,
    ) -> Any:
        handler = self._handler
        callbacks = handler.callbacks
        printers = [cb for cb in callbacks if isinstance(cb, _PRINTERS)]
        added = [tag for tag in extra if tag not in logs]  # never overwrite the Trainer's
        logs.update((tag, extra[tag]) for tag in added)
        try:
            handler.callbacks = [cb for cb in callbacks if not isinstance(cb, _PRINTERS)]
            control = original(args, state, control, logs, **kwargs)
        finally:
            handler.callbacks = callbacks
            for tag in added:
                logs.pop(tag, None)
        if printers:  # they stand last in the list anyway (Trainer.__init__ adds them last)
            try:
                handler.callbacks = printers
                control = original(args, state, control, logs, **kwargs)
            finally:
                handler.callbacks = callbacks
        return control

    def remove(self) -> None:
        """Restore the handler's ``on_log`` (unless someone wrapped it after us)."""
        if self._handler.__dict__.get("on_log") is not self._wrapper:
            return
        if self._saved is _MISSING:
            del self._handler.on_log
        else:
            self._handler.on_log = self._saved


__all__ = ["HF_TOTAL_NORM_TAG", "STEP_TAG", "LatestScalars", "LogsTap"]

"""The pre-clip tap: :class:`ClipTap` wraps an accelerator's clip call while training runs.

``accelerate.Accelerator.clip_grad_norm_`` unscales AMP gradients
(``unscale_gradients``) and then clips them. Wrapping both instance methods marks the
moment between the two; with no AMP scaler, ``unscale_gradients`` is still called and
does nothing, so the moment is the same.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

_WRAPPED = ("unscale_gradients", "clip_grad_norm_")
_MISSING = object()
# on_train_begin is called a few frames below the trainer method that runs training.
_TRAINER_FRAMES = 8


def find_trainer(callback: object) -> Any:
    """The Trainer whose callback handler holds ``callback``, from the frames that called
    it (HF callbacks are not handed the trainer), or ``None``."""
    frame = inspect.currentframe()
    try:
        for _ in range(_TRAINER_FRAMES):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            handler = getattr(candidate, "callback_handler", None)
            callbacks = getattr(handler, "callbacks", ())
            if any(c is callback for c in callbacks) and hasattr(candidate, "accelerator"):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold their locals: never keep one


class ClipTap:
    """Calls ``on_final`` inside ``accelerator.clip_grad_norm_``, after unscaling and
    before clipping, on steps that synchronize gradients (the end of accumulation).

    Args:
        accelerator: the trainer's ``accelerate.Accelerator``.
        on_final: called with no arguments at that moment.
    """

    def __init__(self, accelerator: Any, on_final: Callable[[], None]) -> None:
        self._accelerator = accelerator
        self._on_final = on_final
        self._in_clip = False
        self._saved = {name: accelerator.__dict__.get(name, _MISSING) for name in _WRAPPED}
        self._wrappers: dict[str, Callable[..., Any]] = {
            "unscale_gradients": self._wrap_unscale(accelerator.unscale_gradients),
            "clip_grad_norm_": self._wrap_clip(accelerator.clip_grad_norm_),
        }
        for name, wrapper in self._wrappers.items():
            setattr(accelerator, name, wrapper)

    def remove(self) -> None:
        """Restore the accelerator's methods (unless someone wrapped them after us)."""
        for name, wrapper in self._wrappers.items():
            if self._accelerator.__dict__.get(name) is not wrapper:
                continue
            if self._saved[name] is _MISSING:
                delattr(self._accelerator, name)
            else:
                setattr(self._accelerator, name, self._saved[name])
        self._wrappers.clear()

    def _wrap_clip(self, clip: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(clip)
        def clip_grad_norm_(*args: Any, **kwargs: Any) -> Any:
            self._in_clip = True
            try:
                return clip(*args, **kwargs)
            finally:
                self._in_clip = False

        return clip_grad_norm_

    def _wrap_unscale(self, unscale: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(unscale)
        def unscale_gradients(*args: Any, **kwargs: Any) -> Any:
            result = unscale(*args, **kwargs)
            if self._in_clip and getattr(self._accelerator, "sync_gradients", True):
                self._in_clip = False  # once per clip call
                self._on_final()
            return result

        return unscale_gradients


__all__ = ["ClipTap", "find_trainer"]

"""When the watch's hooks run: :class:`HookGate` owns the on/off test and the
:class:`~gradwatch.guard.Guard` that every hook body runs under.

A hook holds the gate and the gate holds the watch, so the one-line
``gradwatch.watch(model, optimizer)`` keeps monitoring without a kept handle; the watch
holds the model only weakly, so nothing leaks, and ``close()`` removes the hooks.

Example:
    >>> from gradwatch.guard import Guard
    >>> gate = HookGate(Guard("demo"), lambda: False)
    >>> gate.hook(print)("never printed") is None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradwatch.guard import Guard


class HookGate:
    """Runs hook bodies only while monitoring is on, inside ``guard``.

    Args:
        guard: turns an internal error in a hook into one warning and switches off.
        is_enabled: whether monitoring is on (the watch is open and has not failed).
    """

    def __init__(self, guard: Guard, is_enabled: Callable[[], bool]) -> None:
        self.guard = guard
        self._is_enabled = is_enabled

    @property
    def enabled(self) -> bool:
        """Whether hooks run now."""
        return self._is_enabled()

    def hook(self, fn: Callable[..., None], *, guarded: bool = True) -> Callable[..., None]:
        """A hook calling ``fn(*args)`` while enabled, inside the guard unless
        ``guarded=False`` (a body that enters it itself, after a cheap early exit). It
        returns ``None``, so torch never replaces a gradient, input or output with it."""

        def hook(*args: Any) -> None:
            if not self._is_enabled():
                return
            if not guarded:
                fn(*args)
                return
            with self.guard:
                fn(*args)

        return hook


__all__ = ["HookGate"]

"""Never hurt the user's training: :class:`Guard` turns internal errors into one warning.

Example:
    >>> import warnings
    >>> g = Guard("demo")
    >>> with warnings.catch_warnings(record=True):
    ...     with g:
    ...         raise RuntimeError("boom")
    >>> g.enabled
    False
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from types import FrameType, TracebackType
from typing import Any, TextIO

# Packages between the user's line and the warning: gradwatch itself and the frameworks
# and trainers that call its hooks. A warning points at the first frame outside them
# (the user's ``optimizer.step()``, ``loss.backward()`` or ``fit`` call).
INTERNAL_PACKAGES = (
    "gradwatch",
    "torch",
    "keras",
    "tensorflow",
    "tf_keras",
    "jax",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "accelerate",
)


class GradwatchWarning(UserWarning):
    """Category of every warning gradwatch emits, so users can filter them."""


class FindingError(RuntimeError):
    """Raised with ``on_finding="raise"`` to stop a doomed run. Never swallowed by a Guard."""

    def __init__(self, finding: object) -> None:
        super().__init__(str(getattr(finding, "message", finding)))
        self.finding = finding


class Guard:
    """Context manager that catches internal errors, warns once and disables monitoring.

    Args:
        where: named in the warning ("gradwatch torch adapter").
        strict: re-raise instead. Defaults to ``False``.
        consequence: what the warning says happens next. Defaults to ``"training
            continues unmonitored"``.
    """

    def __init__(
        self,
        where: str,
        strict: bool = False,
        *,
        consequence: str = "training continues unmonitored",
    ) -> None:
        self.where = where
        self.strict = strict
        self.consequence = consequence
        self.enabled = True
        self.error: BaseException | None = None

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, FindingError):
            return False
        if self.strict:
            return False
        self.fail(exc)
        return True

    def fail(self, exc: BaseException) -> None:
        """Record ``exc``, warn once and switch off."""
        if self.enabled:
            self.enabled = False
            self.error = exc
            warn(
                f"{self.where} hit an internal error and switched itself off; "
                f"{self.consequence} ({type(exc).__name__}: {exc}). "
                f"Pass strict=True to raise instead."
            )


def _is_internal(frame: FrameType) -> bool:
    module = frame.f_globals.get("__name__", "")
    if not isinstance(module, str):
        return False
    return any(module == p or module.startswith(p + ".") for p in INTERNAL_PACKAGES)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller point at the first
    frame outside gradwatch and the frameworks (see :data:`INTERNAL_PACKAGES`); ``1``
    when there is none (a report printed at interpreter exit)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _is_internal(frame):
        back = frame.f_back
        if back is None:
            return 1
        frame = back
        level += 1
    return level


def _on_own_line(stream: TextIO | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except Exception:  # a closed or odd stream: write nothing extra
        return False


def warn(text: str) -> None:
    """Emit ``text`` as a :class:`GradwatchWarning` that points at the user's line and,
    on a terminal, starts on a line of its own: a tqdm, rich or Keras progress bar
    leaves the cursor mid-line, and the warning would be glued onto it.

    The newline is written by a ``showwarning`` wrapper installed only for this call, so
    it appears only when the warning is actually shown (filters and "once" apply).
    """
    level = user_stacklevel()
    original = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        stream = file if file is not None else sys.stderr
        if issubclass(category, GradwatchWarning) and _on_own_line(stream):
            with contextlib.suppress(Exception):  # never let the newline cost the warning
                stream.write("\n")
        original(message, category, filename, lineno, file, line)

    shower: Any = show
    warnings.showwarning = shower
    try:
        warnings.warn(text, GradwatchWarning, stacklevel=level)
    finally:
        warnings.showwarning = original

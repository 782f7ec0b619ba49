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

import warnings
from types import TracebackType


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
    """

    def __init__(self, where: str, strict: bool = False) -> None:
        self.where = where
        self.strict = strict
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
            warnings.warn(
                f"{self.where} hit an internal error and switched itself off; training "
                f"continues unmonitored ({type(exc).__name__}: {exc}). "
                f"Pass strict=True to raise instead.",
                GradwatchWarning,
                stacklevel=3,
            )

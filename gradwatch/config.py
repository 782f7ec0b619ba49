"""Argument checks shared by every public constructor: a clear error naming the parameter.

Bad configuration must fail where it is written, not steps later inside training.

Example:
    >>> check_int("flush_every", 20, minimum=1)
    20
    >>> check_int("flush_every", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: flush_every must be an integer >= 1, got 0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (``"false"`` is not)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_schedule(name: str, schedule: Any) -> Callable[[int], Any]:
    """``schedule`` if it is callable as ``step -> bool``: it is called once with step
    ``0`` here, so a wrong signature or a non-bool answer fails now, not mid-run."""
    if not callable(schedule):
        raise ValueError(f"{name} must be a callable step -> bool, got {schedule!r}")
    try:
        answer = schedule(0)
    except Exception as exc:
        raise ValueError(
            f"{name} must be a callable step -> bool; calling it with step 0 raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    # numpy's bool_ (a schedule written with numpy) is a bool too.
    if not isinstance(answer, bool) and type(answer).__name__ != "bool_":
        raise ValueError(f"{name} must return True or False for a step, got {answer!r} for step 0")
    return schedule  # type: ignore[no-any-return]


def check_callable(name: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` if it is callable (or ``None`` when ``optional``); a string never is."""
    if value is None and optional:
        return value
    if isinstance(value, str) or not callable(value):
        allowed = "a callable or None" if optional else "a callable"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_on_finding(value: Any, modes: Sequence[str]) -> str | Callable[..., Any]:
    """``value`` if it is one of ``modes`` or a callable (a string never counts as one)."""
    if isinstance(value, str):
        if value in modes:
            return value
    elif callable(value):
        return value  # type: ignore[no-any-return]
    raise ValueError(f"on_finding must be one of {list(modes)} or a callable, got {value!r}")


__all__ = ["check_bool", "check_callable", "check_int", "check_on_finding", "check_schedule"]

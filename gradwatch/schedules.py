"""Schedules: plain callables ``step -> bool`` deciding which steps are sampled.

Any function of the step index works (Cockpit's ``utils/schedules.py`` style);
:class:`every` covers the common case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Schedule = Callable[[int], bool]


@dataclass(frozen=True)
class every:
    """Schedule ``step -> bool``: every step below ``dense_until``, then every ``k``-th.

    Args:
        k: period after the dense phase. Must be ``>= 1``.
        dense_until: steps at the start that are all sampled. Defaults to ``0``.

    Example:
        >>> s = every(10, dense_until=3)
        >>> [i for i in range(25) if s(i)]
        [0, 1, 2, 10, 20]
    """

    k: int
    dense_until: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"every(k=...) must be an integer >= 1, got {self.k!r}")
        if (
            isinstance(self.dense_until, bool)
            or not isinstance(self.dense_until, int)
            or self.dense_until < 0
        ):
            raise ValueError(
                f"every(dense_until=...) must be an integer >= 0, got {self.dense_until!r}"
            )

    def __call__(self, step: int) -> bool:
        return step < self.dense_until or step % self.k == 0

"""A fixed-size ring buffer of the last ``size`` steps, per layer group.

Rules judge this window. Memory is ``size x groups x metrics`` floats, whatever the
length of the run. Layers that had no gradient in a step (frozen, unused) are
"absent" there and show up as NaN in :meth:`Window.view`; a gradient that really
was non-finite shows up in the ``nonfinite`` metric instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowView:
    """Chronological arrays of shape ``(steps, columns)``; absent entries are NaN."""

    steps: np.ndarray
    columns: tuple[str, ...]
    metrics: dict[str, np.ndarray]

    def __getitem__(self, metric: str) -> np.ndarray:
        return self.metrics[metric]

    @property
    def n_steps(self) -> int:
        return int(self.steps.size)


class Window:
    """Ring buffer of per-column metrics for the last ``size`` steps.

    >>> import numpy as np
    >>> w = Window(size=2, metrics=("norm",))
    >>> w.push(0, ("fc1",), {"norm": np.array([1.0])})
    >>> w.push(1, ("fc1", "fc2"), {"norm": np.array([2.0, 3.0])})
    >>> w.view()["norm"].tolist()
    [[1.0, nan], [2.0, 3.0]]
    """

    def __init__(self, size: int, metrics: tuple[str, ...]) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self.metric_names = metrics
        self._columns: dict[str, int] = {}
        self._capacity = 8
        self._data = {m: np.full((size, self._capacity), np.nan) for m in metrics}
        self._steps = np.zeros(size, dtype=np.int64)
        self._count = 0  # rows pushed in total
        self._order: list[str] = []
        self._last_names: tuple[str, ...] | None = None
        self._last_cols = np.zeros(0, dtype=np.int64)

    @property
    def columns(self) -> tuple[str, ...]:
        """Column names in model order (first layer to last)."""
        return tuple(self._order)

    def __len__(self) -> int:
        return min(self._count, self.size)

    def _column(self, name: str) -> int:
        idx = self._columns.get(name)
        if idx is None:
            idx = len(self._columns)
            if idx >= self._capacity:
                self._capacity *= 2
                for m, arr in self._data.items():
                    grown = np.full((self.size, self._capacity), np.nan)
                    grown[:, : arr.shape[1]] = arr
                    self._data[m] = grown
            self._columns[name] = idx
        return idx

    def _place_in_order(self, names: list[str]) -> None:
        """Insert names not yet known right after their predecessor in this step's order."""
        known = set(self._order)
        previous: str | None = None
        for name in names:
            if name not in known:
                pos = 0 if previous is None else self._order.index(previous) + 1
                self._order.insert(pos, name)
                known.add(name)
            previous = name

    def push(self, step: int, names: tuple[str, ...], values: dict[str, np.ndarray]) -> None:
        """Append one step. ``values[metric]`` is aligned with ``names``; columns not
        named are absent in this step."""
        if names != self._last_names:
            self._place_in_order(list(names))
            self._last_cols = np.array([self._column(n) for n in names], dtype=np.int64)
            self._last_names = names
        row = self._count % self.size
        for metric, arr in self._data.items():
            arr[row, :] = np.nan
            if metric in values:
                arr[row, self._last_cols] = values[metric]
        self._steps[row] = step
        self._count += 1

    def view(self, last: int | None = None) -> WindowView:
        """The newest ``last`` rows (default: all held), oldest first, in model order."""
        n = len(self)
        if last is not None:
            n = min(n, last)
        rows = (np.arange(self._count - n, self._count) % self.size) if n else np.zeros(0, int)
        cols = np.array([self._columns[c] for c in self._order], dtype=np.int64)
        metrics = {m: arr[np.ix_(rows, cols)] for m, arr in self._data.items()}
        return WindowView(steps=self._steps[rows].copy(), columns=self.columns, metrics=metrics)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(a.nbytes for a in self._data.values()) + self._steps.nbytes

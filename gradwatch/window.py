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
        self._last_cols: np.ndarray | slice = np.zeros(0, dtype=np.int64)
        # view()'s column order, cached until a column is added (a slice when in order).
        self._view_cols: np.ndarray | None = None
        self._view_slice: slice | None = None

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
            self._view_cols = None
            self._place_in_order(list(names))
            cols = np.array([self._column(n) for n in names], dtype=np.int64)
            # The first len(names) columns in order (the steady state): a slice.
            in_order = np.array_equal(cols, np.arange(len(names)))
            self._last_cols = slice(0, len(names)) if in_order else cols
            self._last_names = names
        row = self._count % self.size
        where = self._last_cols
        rest = len(names) if isinstance(where, slice) else 0
        for metric, arr in self._data.items():
            arr[row, rest:] = np.nan
            if metric in values:
                arr[row, where] = values[metric]
            elif rest:
                arr[row, :rest] = np.nan
        self._steps[row] = step
        self._count += 1

    def view(self, last: int | None = None) -> WindowView:
        """The newest ``last`` rows (default: all held), oldest first, in model order."""
        n = len(self)
        if last is not None:
            n = min(n, last)
        width = len(self._order)
        if self._view_cols is None or len(self._view_cols) != width:
            cols = np.array([self._columns[c] for c in self._order], dtype=np.int64)
            # Columns stored in model order (no layer appeared between known ones): a slice.
            in_order = bool(np.array_equal(cols, np.arange(width)))
            self._view_cols = cols
            self._view_slice = slice(0, width) if in_order else None
        start = (self._count - n) % self.size if n else 0
        if start + n <= self.size:  # the rows are contiguous in the ring: slices, no gather
            rows: slice | np.ndarray = slice(start, start + n)
        else:
            rows = np.arange(self._count - n, self._count) % self.size
        take = self._view_slice
        if take is not None:
            metrics = {m: arr[rows, take].copy() for m, arr in self._data.items()}
        else:
            cols = self._view_cols
            metrics = {m: arr[rows][:, cols] for m, arr in self._data.items()}
        return WindowView(steps=self._steps[rows].copy(), columns=self.columns, metrics=metrics)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(a.nbytes for a in self._data.values()) + self._steps.nbytes

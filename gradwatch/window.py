"""A fixed-size ring buffer of the last ``size`` steps, per layer group.

Rules judge this window. Memory is ``size x groups x metrics`` floats, whatever the
length of the run. Layers that had no gradient in a step (frozen, unused) are
"absent" there and show up as NaN in :meth:`Window.view`; a gradient that really
was non-finite shows up in the ``nonfinite`` metric instead.

The buffer is one preallocated ``(metrics, size, columns)`` array, so a step is one
row assignment (:meth:`Window.push_block`) and a view is one copy, cached until the
next push: every rule of a check reads the same read-only view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowView:
    """Chronological arrays of shape ``(steps, columns)``; absent entries are NaN.

    The arrays are read-only: every rule of a check shares them.
    """

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
        # One block for all metrics: a step is one assignment, a view one copy.
        self._data = np.full((len(metrics), size, self._capacity), np.nan)
        self._present = np.zeros((size, self._capacity), dtype=bool)  # named in that step
        # Per ring row: the n of a step that named exactly the first n columns, else -1
        # (so a steady-state push rewrites neither the absent tail nor the presence row).
        self._row_width = [-1] * size
        self._steps = np.zeros(size, dtype=np.int64)
        self._ring = np.arange(2 * size) % size  # rows of a wrapped view: one slice of it
        self._count = 0  # rows pushed in total
        self._order: list[str] = []
        self._last_names: tuple[str, ...] | None = None
        self._last_cols: np.ndarray | slice = slice(0, 0)
        # view()'s column order, cached until a column is added (a slice when in order).
        self._view_cols: np.ndarray | slice | None = None
        self._view_columns: tuple[str, ...] = ()
        self._view: WindowView | None = None  # the full view, until the next push

    @property
    def columns(self) -> tuple[str, ...]:
        """Column names in model order (first layer to last)."""
        return tuple(self._order)

    @property
    def stored_columns(self) -> tuple[str, ...]:
        """Column names in storage order (the order they first appeared)."""
        return tuple(self._columns)

    @property
    def count(self) -> int:
        """Rows pushed in total (the ring holds the newest ``min(count, size)``)."""
        return self._count

    def __len__(self) -> int:
        return min(self._count, self.size)

    def _column(self, name: str) -> int:
        idx = self._columns.get(name)
        if idx is None:
            idx = len(self._columns)
            if idx >= self._capacity:
                self._capacity *= 2
                grown = np.full((len(self.metric_names), self.size, self._capacity), np.nan)
                grown[:, :, : self._data.shape[2]] = self._data
                self._data = grown
                present = np.zeros((self.size, self._capacity), dtype=bool)
                present[:, : self._present.shape[1]] = self._present
                self._present = present
                self._row_width = [-1] * self.size  # the new columns' rows are unwritten
            self._columns[name] = idx
        return idx

    def _place_in_order(self, names: tuple[str, ...]) -> None:
        """Insert names not yet known right after their predecessor in this step's order."""
        known = set(self._order)
        previous: str | None = None
        for name in names:
            if name not in known:
                pos = 0 if previous is None else self._order.index(previous) + 1
                self._order.insert(pos, name)
                known.add(name)
            previous = name

    def _where(self, names: tuple[str, ...]) -> np.ndarray | slice:
        """Storage columns of ``names``, cached while the names repeat (the steady state)."""
        if names != self._last_names:
            self._view_cols = None
            self._place_in_order(names)
            cols = np.array([self._column(n) for n in names], dtype=np.int64)
            # The first len(names) columns in order (the steady state): a slice.
            in_order = np.array_equal(cols, np.arange(len(names)))
            self._last_cols = slice(0, len(names)) if in_order else cols
            self._last_names = names
        return self._last_cols

    def push_block(self, step: int, names: tuple[str, ...], block: np.ndarray) -> None:
        """Append one step from a ``(metrics, len(names))`` array, rows in
        ``metric_names`` order; columns not named are absent in this step."""
        where = self._where(names)
        row = self._count % self.size
        data = self._data
        width = len(self._columns)
        if isinstance(where, slice):
            data[:, row, : where.stop] = block
            if self._row_width[row] != where.stop or where.stop < width:
                data[:, row, where.stop :] = np.nan
                self._present[row, : where.stop] = True
                self._present[row, where.stop :] = False
                self._row_width[row] = where.stop
        else:
            data[:, row, :] = np.nan
            data[:, row, where] = block
            self._present[row] = False
            self._present[row, where] = True
            self._row_width[row] = -1
        self._steps[row] = step
        self._count += 1
        self._view = None

    def push(self, step: int, names: tuple[str, ...], values: Mapping[str, np.ndarray]) -> None:
        """Append one step. ``values[metric]`` is aligned with ``names``; metrics not
        given are absent (NaN) in this step, as are columns not named."""
        block = np.full((len(self.metric_names), len(names)), np.nan)
        for i, metric in enumerate(self.metric_names):
            if metric in values:
                block[i] = values[metric]
        self.push_block(step, names, block)

    def rows(self, last: int | None = None) -> tuple[slice | np.ndarray, int]:
        """``(ring rows, count)`` of the newest ``last`` rows (default: all held), oldest
        first: a slice while they are contiguous in the ring, else an index array."""
        n = len(self) if last is None else min(len(self), last)
        start = (self._count - n) % self.size if n else 0
        if start + n <= self.size:  # contiguous in the ring: a slice, no gather
            return slice(start, start + n), n
        return self._ring[start : start + n], n

    def block(self, rows: slice | np.ndarray) -> np.ndarray:
        """A copy of the raw ``(metrics, rows, stored columns)`` block: columns in
        storage order (:attr:`stored_columns`), absent entries NaN."""
        block: np.ndarray = self._data[:, rows, : len(self._columns)].copy()
        return block

    def present(self, rows: slice | np.ndarray) -> np.ndarray:
        """Whether each stored column was named in ring ``rows`` (a copy)."""
        present: np.ndarray = self._present[rows, : len(self._columns)].copy()
        return present

    def steps_at(self, rows: slice | np.ndarray) -> np.ndarray:
        """The steps of ring ``rows`` (a copy)."""
        steps: np.ndarray = self._steps[rows].copy()
        return steps

    def view(self, last: int | None = None) -> WindowView:
        """The newest ``last`` rows (default: all held), oldest first, in model order.

        The full view is built once per push (one copy) and shared; ``last`` slices it.
        """
        full = self._view
        if full is None:
            full = self._view = self._full_view()
        if last is None or last >= full.n_steps:
            return full
        keep = slice(full.n_steps - max(last, 0), None)
        return WindowView(
            steps=full.steps[keep],
            columns=full.columns,
            metrics={m: arr[keep] for m, arr in full.metrics.items()},
        )

    def _full_view(self) -> WindowView:
        width = len(self._order)
        if self._view_cols is None:
            cols = np.array([self._columns[c] for c in self._order], dtype=np.int64)
            # Columns stored in model order (no layer appeared between known ones): a slice.
            in_order = bool(np.array_equal(cols, np.arange(width)))
            self._view_cols = slice(0, width) if in_order else cols
            self._view_columns = tuple(self._order)
        rows, _ = self.rows()
        take = self._view_cols
        if isinstance(take, slice):
            block = self._data[:, rows, take]
            block = block.copy() if isinstance(rows, slice) else block  # a gather copies
        else:
            block = self._data[:, rows][:, :, take]
        block.flags.writeable = False  # shared by every rule of the check
        steps = self._steps[rows].copy()
        steps.flags.writeable = False
        metrics = {m: block[i] for i, m in enumerate(self.metric_names)}
        return WindowView(steps=steps, columns=self._view_columns, metrics=metrics)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return self._data.nbytes + self._present.nbytes + self._steps.nbytes + self._ring.nbytes

"""Whole-run summaries in bounded memory: per-layer totals and a downsampled flow history.

:class:`LayerTotals` keeps running aggregates per layer group (count, geometric mean
norm, extremes). :class:`FlowHistory` keeps the mean log10 gradient norm of every
group in at most ``bins`` time bins: when the bins fill up, neighbours merge and
each bin covers twice as many steps. Memory is ``bins x groups`` floats however
long the run.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np


class _Columns:
    """Name-to-column registry shared by the growable arrays below."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        self._last: tuple[tuple[str, ...], np.ndarray | slice] | None = None

    def positions(self, names: tuple[str, ...]) -> np.ndarray | slice:
        """:meth:`indices`, as a slice when ``names`` are exactly the registered columns in
        order (the steady state: slices index without a gather). Cached per names."""
        last = self._last
        if last is not None and last[0] == names:
            return last[1]
        idx = self.indices(names)
        where: np.ndarray | slice = idx
        if len(names) == len(self.names) and np.array_equal(idx, np.arange(len(names))):
            where = slice(0, len(names))
        self._last = (names, where)
        return where

    def indices(self, names: tuple[str, ...]) -> np.ndarray:
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            idx = self.index.get(name)
            if idx is None:
                idx = len(self.names)
                self.index[name] = idx
                self.names.append(name)
            out[i] = idx
        return out


def _running_sum(total: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``total + rows[0] + rows[1] + ...`` added in that order, as per-step adds would."""
    summed: np.ndarray = np.add.accumulate(np.vstack([total[None], rows]), axis=0)[-1]
    return summed


def _grow(arr: np.ndarray, width: int, fill: float) -> np.ndarray:
    if arr.shape[-1] >= width:
        return arr
    new_width = max(width, 2 * arr.shape[-1], 8)
    grown = np.full((*arr.shape[:-1], new_width), fill, dtype=arr.dtype)
    grown[..., : arr.shape[-1]] = arr
    return grown


class LayerTotals:
    """Running per-group aggregates over the whole run."""

    _FIELDS: ClassVar[dict[str, float]] = {
        "steps": 0.0,
        "log_norm_sum": 0.0,
        "log_norm_count": 0.0,
        "min_norm": math.inf,
        "max_norm": 0.0,
        "last_norm": math.nan,
        "max_abs": 0.0,
        "zero_frac_sum": 0.0,
        "nonfinite": 0.0,
        "numel": 0.0,
    }

    def __init__(self) -> None:
        self.columns = _Columns()
        self.data = {k: np.full(0, v) for k, v in self._FIELDS.items()}

    def update(
        self,
        names: tuple[str, ...],
        norm: np.ndarray,
        max_abs: np.ndarray,
        zero_frac: np.ndarray,
        nonfinite: np.ndarray,
        numel: np.ndarray,
    ) -> None:
        """Add one step: ``norm`` etc. aligned with ``names`` (see :meth:`update_rows`)."""
        norm, max_abs, zero_frac, nonfinite, numel = (
            np.asarray(v, dtype=np.float64)[None]
            for v in (norm, max_abs, zero_frac, nonfinite, numel)
        )
        present = np.ones((1, len(names)), dtype=bool)
        self.update_rows(names, norm, max_abs, zero_frac, nonfinite, numel, present)

    def update_rows(
        self,
        names: tuple[str, ...],
        norm: np.ndarray,
        max_abs: np.ndarray,
        zero_frac: np.ndarray,
        nonfinite: np.ndarray,
        numel: np.ndarray,
        present: np.ndarray,
    ) -> None:
        """Add several steps at once: ``(steps, len(names))`` arrays, oldest step first;
        ``present[r, c]`` says whether column ``c`` had a gradient in step ``r``.

        The same numbers as one :meth:`update` per step: sums accumulate in step order
        (``np.add.accumulate`` is sequential), extremes and last values are exact.
        """
        if norm.shape[0] == 0:
            return
        idx = self.columns.positions(names)
        width = len(self.columns.names)
        d = self.data
        if d["steps"].shape[-1] < width:
            for k, fill in self._FIELDS.items():
                d[k] = _grow(d[k], width, fill)
        finite = np.isfinite(norm)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(norm)
        positive = finite & (norm > 0)
        # Masked adds (0 where not positive or absent): no gather of the columns.
        d["steps"][idx] += np.count_nonzero(present, axis=0)
        d["log_norm_count"][idx] += np.count_nonzero(positive, axis=0)
        d["nonfinite"][idx] += np.where(present, nonfinite, 0.0).sum(axis=0)
        for key, rows in (
            ("log_norm_sum", np.where(positive, logs, 0.0)),
            ("zero_frac_sum", np.where(present, zero_frac, 0.0)),
        ):
            d[key][idx] = _running_sum(d[key][idx], rows)
        kept = np.where(finite, norm, np.nan)  # fmin/fmax skip NaN (and absent entries)
        d["min_norm"][idx] = np.fmin(d["min_norm"][idx], np.fmin.reduce(kept, axis=0))
        d["max_norm"][idx] = np.fmax(d["max_norm"][idx], np.fmax.reduce(kept, axis=0))
        d["max_abs"][idx] = np.fmax(d["max_abs"][idx], np.fmax.reduce(max_abs, axis=0))
        seen = present.any(axis=0)
        # The newest step in which each column was present.
        last = present.shape[0] - 1 - np.argmax(present[::-1], axis=0)
        cols = np.flatnonzero(seen)
        positions = np.arange(width)[idx][cols]
        d["last_norm"][positions] = norm[last[cols], cols]
        d["numel"][positions] = numel[last[cols], cols]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.data.values())


class FlowHistory:
    """Mean log10 gradient norm per group in at most ``bins`` time bins.

    >>> h = FlowHistory(bins=2)
    >>> for step in range(4):
    ...     h.add(step, ("fc1",), np.array([10.0 ** step]))
    >>> h.snapshot()[0], h.snapshot()[2].tolist()
    ([0, 2], [[0.5], [2.5]])
    """

    def __init__(self, bins: int = 128) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"history bins must be an even number >= 2, got {bins}")
        self.bins = bins
        self.stride = 1
        self.columns = _Columns()
        self._sum = np.zeros((bins, 0))
        self._count = np.zeros((bins, 0))
        self._bin_start = np.full(bins, -1, dtype=np.int64)
        self._n = 0  # steps added

    def add(self, step: int, names: tuple[str, ...], norm: np.ndarray) -> None:
        """Add one step's norms, aligned with ``names``."""
        self.add_rows(np.array([step]), names, np.asarray(norm, dtype=np.float64)[None])

    def add_rows(self, steps: np.ndarray, names: tuple[str, ...], norm: np.ndarray) -> None:
        """Add several steps at once: ``norm`` is ``(len(steps), len(names))``, oldest
        step first, NaN where a column is absent. The same bins and sums as one
        :meth:`add` per step (``np.add.at`` adds in order)."""
        if len(steps) == 0:
            return
        idx = self.columns.positions(names)
        width = len(self.columns.names)
        if self._sum.shape[-1] < width:
            self._sum = _grow(self._sum, width, 0.0)
            self._count = _grow(self._count, width, 0.0)
        ok = np.isfinite(norm) & (norm > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(ok, np.log10(norm), 0.0)
        cols = np.arange(width)[idx]
        done = 0
        while done < len(steps):
            if self._n // self.stride >= self.bins:
                self._merge()
            # The rows that fit before the bins fill up (and the next merge).
            take = min(len(steps) - done, self.bins * self.stride - self._n)
            bins = (self._n + np.arange(take)) // self.stride
            rows = slice(done, done + take)
            first = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
            fresh = self._bin_start[bins[first]] < 0
            self._bin_start[bins[first][fresh]] = steps[rows][first[fresh]]
            where = (bins[:, None], cols[None, :])
            np.add.at(self._sum, where, logs[rows])
            np.add.at(self._count, where, ok[rows])
            self._n += take
            done += take

    def _merge(self) -> None:
        half = self.bins // 2
        self._sum[:half] = self._sum[0::2] + self._sum[1::2]
        self._count[:half] = self._count[0::2] + self._count[1::2]
        self._sum[half:] = 0.0
        self._count[half:] = 0.0
        self._bin_start[:half] = self._bin_start[0::2]
        self._bin_start[half:] = -1
        self.stride *= 2

    def snapshot(self) -> tuple[list[int], list[str], np.ndarray]:
        """``(bin_start_steps, column_names, mean_log10_norm[bins, columns])``; NaN where empty."""
        used = int(np.count_nonzero(self._bin_start >= 0))
        width = len(self.columns.names)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self._sum[:used, :width] / self._count[:used, :width]
        mean[self._count[:used, :width] == 0] = np.nan
        return self._bin_start[:used].tolist(), list(self.columns.names), mean

    def nbytes(self) -> int:
        return self._sum.nbytes + self._count.nbytes + self._bin_start.nbytes

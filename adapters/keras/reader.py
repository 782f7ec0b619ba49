"""The host side of one ``fit``: :class:`RingReader` reads the probe rings and turns
every slot written since the last read into :class:`gradwatch.StepStats`, through
:func:`gradwatch.rows.step_stats_from_rows`: a sample per variable, or the total norm
of a step not sampled (``StepStats(step=..., grad_total_norm=...)``).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from gradwatch.adapters.keras.capture import Capture
from gradwatch.adapters.keras.layers import ActivationLayers
from gradwatch.adapters.keras.probe import Probe, to_host

from gradwatch.monitor import Monitor
from gradwatch.rows import TIME_ROWS, step_stats_from_rows
from gradwatch.stats import StepStats


class RingReader:
    """The host side of one ``fit``: reads the probe rings and turns every slot written
    since the last read into :class:`StepStats`, oldest first.

    Args:
        probe: the rings the train step writes.
        capture: names the variables that had a gradient (known once traced).
        acts: the watched activation layers, one ring row each.
        schedule: the host twin of the in-graph sampling condition.
        flush_every: named in the note when a slot was overwritten before it was read.
        time_layers: the name of each through-time row (recurrent layers). Defaults to
            none.
    """

    def __init__(
        self,
        probe: Probe,
        capture: Capture,
        acts: ActivationLayers,
        schedule: Callable[[int], bool],
        flush_every: int,
        time_layers: tuple[str, ...] = (),
    ) -> None:
        self.probe = probe
        self.capture = capture
        self.acts = acts
        self.schedule = schedule
        self.flush_every = flush_every
        self.time_layers = time_layers
        self._last_read = -1
        self._last_norm_read = -1

    def flush(self, model: keras.Model | None, monitor: Monitor) -> StepStats | None:
        """Read the rings and hand what is new to ``monitor``; the newest sample (per
        variable; a step with only its total norm is not one). Findings are dispatched
        outside the guard: ``on_finding`` errors are the user's."""
        batch: list[StepStats] = []
        with monitor.guard:
            batch = self.read(model, monitor)
        if not batch:
            return None
        monitor.observe(batch)
        return next((s for s in reversed(batch) if s.grad_layers), None)

    def read(self, model: keras.Model | None, monitor: Monitor) -> list[StepStats]:
        """The new samples and total norms, in step order (one host transfer per ring);
        notes lost samples on ``monitor``."""
        sync = getattr(model, "jax_state_sync", None)
        if callable(sync):
            # JAX keeps the live state outside the variables during an epoch.
            sync()
        batch = self._read_samples(monitor) + self._read_norms()
        batch.sort(key=lambda s: s.step)
        return batch

    def _read_norms(self) -> list[StepStats]:
        """The total norms written since the last read (steps not sampled)."""
        probe = self.probe
        if probe.norm_steps is None or probe.norms is None:
            return []
        steps = to_host(probe.norm_steps)
        fresh = np.flatnonzero(steps > self._last_norm_read)
        if fresh.size == 0:
            return []
        fresh = fresh[np.argsort(steps[fresh])]
        values = to_host(probe.norms).astype(np.float64)
        self._last_norm_read = int(steps[fresh[-1]])
        return [
            step_stats_from_rows(
                int(steps[slot]),
                grad_total_norm=float(values[slot, 0]),
                skipped=bool(values[slot, 1] > 0),
            )
            for slot in fresh
        ]

    def _read_samples(self, monitor: Monitor) -> list[StepStats]:
        probe = self.probe
        steps = to_host(probe.steps)
        fresh = np.flatnonzero(steps[:, 0] > self._last_read)
        if fresh.size == 0:
            return []
        fresh = fresh[np.argsort(steps[fresh, 0])]
        if probe.grads is None:
            return []
        grads = to_host(probe.grads).astype(np.float64)
        act_rows = to_host(probe.acts).astype(np.float64) if probe.acts is not None else None
        time_rows = to_host(probe.time).astype(np.float64) if probe.time is not None else None
        first = int(steps[fresh[0], 0])
        expected = next(s for s in range(self._last_read + 1, first + 1) if self.schedule(s))
        if first != expected:
            monitor.note(
                f"Samples of steps {expected}..{first - 1} were overwritten before they "
                f"were read; lower flush_every (now {self.flush_every})."
            )
        self._last_read = int(steps[fresh[-1], 0])
        n = len(self.capture.grad_names)
        return [
            self._step_stats(
                int(steps[slot, 0]),
                bool(steps[slot, 1]),
                grads[slot, :n],
                None if act_rows is None else act_rows[slot],
                None if time_rows is None else time_rows[slot],
            )
            for slot in fresh
        ]

    def _step_stats(
        self,
        step: int,
        skipped: bool,
        g: np.ndarray,
        a: np.ndarray | None,
        t: np.ndarray | None = None,
    ) -> StepStats:
        """One ring slot's :class:`StepStats`: ``g`` holds a row per variable, ``a`` a
        row per activation layer, ``t`` a through-time row per recurrent layer (those
        not measured at this step, NaN, are left out)."""
        acts = self.acts
        seen = np.flatnonzero(np.isfinite(t[:, TIME_ROWS])) if t is not None else np.array([], int)
        return step_stats_from_rows(
            step,
            self.capture.grad_names,
            g.T,
            act_layers=acts.names,
            act_kinds=acts.kinds,
            act_is_output=acts.is_output,
            act_rows=a,
            time_layers=[self.time_layers[i] for i in seen],
            time_length=[round(n) for n in t[seen, TIME_ROWS]] if t is not None else [],
            time_rows=t[seen, :TIME_ROWS] if t is not None and seen.size else None,
            skipped=skipped,
        )


__all__ = ["RingReader"]

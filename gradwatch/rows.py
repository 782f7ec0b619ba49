"""Device rows to :class:`~gradwatch.StepStats`: the one layout every adapter reduces into.

Adapters reduce each gradient tensor on its device to one column of
:data:`GRAD_ROW_FIELDS` and each activation output to one row of
:data:`ACT_ROW_FIELDS`, copy many steps to the host in one transfer, and build
``StepStats`` here. Sums and counts travel instead of means and fractions so that
shards and micro-batches combine by adding.

Example:
    >>> import numpy as np
    >>> rows = np.array([[5.0], [4.0], [7.0], [2.0], [0.0], [3.0], [1.0]])
    >>> s = step_stats_from_rows(0, ("fc.weight",), rows)
    >>> s.grad_norm, s.grad_mean_abs, s.grad_zero_frac
    ((5.0,), (2.3333333333333335,), (0.33333333333333337,))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradwatch.stats import StepStats

# One column per gradient tensor: L2 norm over finite entries, max |g|, sum |g|,
# count of non-zero entries, count of NaN/Inf entries, entry count, weight L2 norm
# (NaN when the weights were not measured at that step).
GRAD_ROW_FIELDS = ("norm", "max_abs", "sum_abs", "nonzero", "nonfinite", "numel", "param_norm")
GRAD_ROWS = len(GRAD_ROW_FIELDS)
NORM, MAX_ABS, SUM_ABS, NONZERO, NONFINITE, NUMEL, PARAM_NORM = range(GRAD_ROWS)
# One row per activation output: fractions in the inactive region, of dead units, in
# the flat tails (a NaN entry is in neither; NaN fractions when no entry is finite may
# come from an adapter), and the count of NaN/Inf entries. A row whose count is NaN is
# an activation not seen at that step.
ACT_ROW_FIELDS = ("inactive", "dead", "tail", "nonfinite")
ACT_ROWS = len(ACT_ROW_FIELDS)
ACT_NONFINITE = ACT_ROW_FIELDS.index("nonfinite")
# One row per recurrent layer: RMS of dL/d(input) at its first and at its last time step.
TIME_ROW_FIELDS = ("grad_first", "grad_last")
TIME_ROWS = len(TIME_ROW_FIELDS)


def step_stats_from_rows(
    step: int,
    grad_layers: Sequence[str] = (),
    grad_rows: np.ndarray | None = None,
    *,
    act_layers: Sequence[str] = (),
    act_kinds: Sequence[str] = (),
    act_is_output: Sequence[bool] = (),
    act_rows: np.ndarray | None = None,
    time_layers: Sequence[str] = (),
    time_length: Sequence[int] = (),
    time_rows: np.ndarray | None = None,
    grad_total_norm: float | None = None,
    skipped: bool = False,
) -> StepStats:
    """One step's :class:`StepStats` from its rows.

    Args:
        step: the training step.
        grad_layers: a name per column of ``grad_rows``, in model order.
        grad_rows: ``(GRAD_ROWS, len(grad_layers))`` array, or ``None`` for a step
            with no per-layer gradient statistics.
        act_layers, act_kinds, act_is_output: one entry per row of ``act_rows``.
        act_rows: ``(len(act_layers), ACT_ROWS)`` array; rows whose ``nonfinite`` count
            is NaN (not seen) are left out.
        time_layers, time_length: one entry per row of ``time_rows``: the recurrent
            layer's name and its number of time steps.
        time_rows: ``(len(time_layers), TIME_ROWS)`` array (see :data:`TIME_ROW_FIELDS`).
        grad_total_norm: the fused total norm of a step not sampled per layer.
        skipped: the optimizer skipped this step (AMP overflow); nothing else is kept.
    """
    if skipped:
        return StepStats(step=step, skipped_step=True)
    fields: dict[str, object] = {}
    if grad_rows is not None and len(grad_layers):
        g = np.asarray(grad_rows, dtype=np.float64).reshape(GRAD_ROWS, len(grad_layers))
        numel = g[NUMEL]
        safe = np.maximum(numel, 1.0)
        bad = g[NONFINITE]
        fields.update(
            grad_layers=tuple(grad_layers),
            grad_norm=tuple(g[NORM].tolist()),
            grad_max_abs=tuple(g[MAX_ABS].tolist()),
            grad_mean_abs=tuple((g[SUM_ABS] / safe).tolist()),
            # With Inf/NaN entries the zero count means nothing (NaN is not counted as
            # zero nor as non-zero by every reduction): unknown.
            grad_zero_frac=tuple(
                np.where(bad > 0, np.nan, np.clip(1.0 - g[NONZERO] / safe, 0.0, 1.0)).tolist()
            ),
            grad_nonfinite=tuple(round(v) for v in bad.tolist()),
            grad_numel=tuple(round(v) for v in numel.tolist()),
            param_norm=tuple(g[PARAM_NORM].tolist()),
        )
    elif grad_total_norm is not None:
        fields["grad_total_norm"] = float(grad_total_norm)
    if act_rows is not None and len(act_layers):
        a = np.asarray(act_rows, dtype=np.float64).reshape(len(act_layers), ACT_ROWS)
        seen = np.flatnonzero(~np.isnan(a[:, ACT_NONFINITE])).tolist()
        if seen:
            fields.update(
                act_layers=tuple(act_layers[i] for i in seen),
                act_kinds=tuple(act_kinds[i] for i in seen),
                act_inactive_frac=tuple(a[seen, 0].tolist()),
                act_dead_frac=tuple(a[seen, 1].tolist()),
                act_tail_frac=tuple(a[seen, 2].tolist()),
                act_is_output=tuple(bool(act_is_output[i]) for i in seen),
                act_nonfinite=tuple(round(v) for v in a[seen, ACT_NONFINITE].tolist()),
            )
    if time_rows is not None and len(time_layers):
        t = np.asarray(time_rows, dtype=np.float64).reshape(len(time_layers), TIME_ROWS)
        fields.update(
            time_layers=tuple(time_layers),
            time_grad_first=tuple(t[:, 0].tolist()),
            time_grad_last=tuple(t[:, 1].tolist()),
            time_length=tuple(int(n) for n in time_length),
        )
    return StepStats(step=step, **fields)  # type: ignore[arg-type]


__all__ = [
    "ACT_NONFINITE",
    "ACT_ROWS",
    "ACT_ROW_FIELDS",
    "GRAD_ROWS",
    "GRAD_ROW_FIELDS",
    "TIME_ROWS",
    "TIME_ROW_FIELDS",
    "step_stats_from_rows",
]

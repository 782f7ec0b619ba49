"""The ``keras.ops`` reductions that run inside the compiled train step, on any backend.

Owns the in-graph arithmetic: one gradient to a column of
:data:`gradwatch.rows.GRAD_ROW_FIELDS` (:func:`_grad_row`, :func:`_param_norms`), one
activation output to a row of :data:`gradwatch.rows.ACT_ROW_FIELDS`
(:func:`_activation_row`), the sampling condition and the scatter-free ring write.
Pure functions of tensors: no state, no patching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch.activations import CAN_DIE, CAN_SATURATE, SQUASHING, tail_bounds
from gradwatch.rows import ACT_ROWS


def _grad_row(grad: Any) -> Any:
    """``[norm, max_abs, sum_abs, nonzero, nonfinite, numel]`` of one gradient, in-graph
    (the parameter norm, the seventh field, comes from :func:`_param_norms`).

    Six passes over the data, the fewest that give every statistic with plain ops: a
    dot product (squared norm), ``|g|``, its max and sum, and ``sign(|g|)`` summed (the
    count of non-zero entries). As in the torch adapter, a gradient with Inf/NaN
    entries has an Inf/NaN norm, max and sum, a ``nonfinite`` flag of 1 (a lower
    bound of the count) and an unknown zero fraction (set on the host).
    """
    g = ops.reshape(ops.cast(grad, "float32"), (-1,))
    numel = max(int(np.prod(grad.shape)), 1)
    a = ops.abs(g)
    max_abs = ops.max(a)
    return ops.stack(
        [
            ops.sqrt(ops.vdot(g, g)),
            max_abs,
            ops.sum(a),
            ops.sum(ops.sign(a)),
            ops.cast(ops.logical_not(ops.isfinite(max_abs)), "float32"),
            ops.convert_to_tensor(float(numel), "float32"),
        ]
    )


def _param_norms(variables: list[Any], sample: Any, sampled: Any = None) -> Any:
    """The L2 norm of each variable on the first 5 samples and every 5th after, NaN on
    the others: weights move slowly, and the rules take window medians of them (the
    torch adapter does the same), so four passes over the weights in five are saved."""

    def norms() -> Any:
        flats = [ops.reshape(ops.cast(v, "float32"), (-1,)) for v in variables]
        return ops.stack([ops.sqrt(ops.vdot(f, f)) for f in flats])

    def unknown() -> Any:
        return ops.full((len(variables),), math.nan, "float32")

    due = ops.logical_or(ops.less(sample, 5), ops.equal(ops.mod(sample, 5), 0))
    if sampled is not None:
        due = ops.logical_and(sampled, due)
    return ops.cond(due, norms, unknown)


def _activation_row(y: Any, kind: str, unit_axis: int, derivative_fraction: float) -> Any:
    """``[inactive, dead, tail]`` fractions of one activation output, in-graph.

    Mirrors :func:`gradwatch.activations.activation_stats_from_array` (NaN is neither
    inactive nor in a tail). For the ReLU family one pass counts each unit's inactive
    outputs, and both fractions follow from those counts.
    """
    y = ops.cast(ops.stop_gradient(y), "float32")
    zero = ops.convert_to_tensor(0.0, "float32")
    inactive_frac = dead_frac = tail_frac = zero
    if kind in CAN_DIE:
        inactive = ops.cast(ops.less_equal(y, 0.0), "float32")
        moved = ops.moveaxis(inactive, unit_axis, -1) if unit_axis != -1 else inactive
        per_unit = ops.sum(ops.reshape(moved, (-1, moved.shape[-1])), axis=0)
        rows = ops.cast(ops.size(inactive), "float32") / float(moved.shape[-1])
        inactive_frac = ops.sum(per_unit) / (rows * float(moved.shape[-1]))
        dead_frac = ops.mean(ops.cast(ops.greater_equal(per_unit, rows), "float32"))
    elif kind not in SQUASHING:  # tanh is negative half the time: "inactive" means nothing
        inactive_frac = ops.mean(ops.cast(ops.less_equal(y, 0.0), "float32"))
    if kind in CAN_SATURATE:
        lo, hi = tail_bounds(kind, derivative_fraction)
        tails = ops.logical_or(ops.less_equal(y, lo), ops.greater_equal(y, hi))
        tail_frac = ops.mean(ops.cast(tails, "float32"))
    return ops.stack([inactive_frac, dead_frac, tail_frac])


def _activation_table(
    outputs: dict[int, Any],
    kinds: Sequence[str],
    unit_axes: Sequence[int],
    derivative_fraction: float,
) -> Any:
    """``(len(kinds), ACT_ROWS)`` activation fractions of one step from the outputs by
    layer index; NaN rows for layers that did not run in it."""
    missing = ops.full((ACT_ROWS,), math.nan, "float32")
    rows = []
    for i, (kind, axis) in enumerate(zip(kinds, unit_axes, strict=True)):
        y = outputs.get(i)
        rows.append(missing if y is None else _activation_row(y, kind, axis, derivative_fraction))
    return ops.stack(rows)


def _is_sampled(step: Any, sample_every: int, dense_until: int) -> Any:
    """In-graph twin of :func:`gradwatch.schedules.every`: is ``step`` a sampled step?"""
    return ops.logical_or(ops.less(step, dense_until), ops.equal(ops.mod(step, sample_every), 0))


def _one_hot_where(index: Any, size: int, new: Any, old: Any) -> Any:
    """``old`` with entry ``index`` along axis 0 replaced by ``new`` (no scatter needed)."""
    mask = ops.equal(ops.arange(size, dtype="int32"), ops.cast(index, "int32"))
    mask = ops.reshape(mask, (size,) + (1,) * (len(old.shape) - 1))
    return ops.where(mask, ops.expand_dims(new, 0), old)

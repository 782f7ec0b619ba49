"""The ``keras.ops`` reductions that run inside the compiled train step, on any backend.

Owns the in-graph arithmetic: one gradient to a column of
:data:`gradwatch.rows.GRAD_ROW_FIELDS` (:func:`_grad_row`, :func:`_param_norms`), one
activation output to a row of :data:`gradwatch.rows.ACT_ROW_FIELDS`
(:func:`_activation_row`), the total norm of a step not sampled per layer (:func:`_grad_norms`,
:func:`_combined_norm`), the sampling conditions and the scatter-free ring write.
Pure functions of tensors: no state, no patching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch.activations import CAN_DIE, CAN_SATURATE, SQUASHING, tail_bounds
from gradwatch.rows import ACT_ROWS


def _grad_row(grad: Any, scale: Any = None) -> Any:
    """``[norm, max_abs, sum_abs, nonzero, nonfinite, numel]`` of one gradient, in-graph
    (the parameter norm, the seventh field, comes from :func:`_param_norms`).

    ``scale`` is what the gradient is divided by first (a loss scale), or ``None``.
    Shapes may be unknown when traced (``tf.data``, a partial last batch, a
    ``tf.IndexedSlices`` of unknown dense shape): the entry count is computed in-graph.

    Six passes over the data, the fewest that give every statistic with plain ops: a
    dot product (squared norm), ``|g|``, its max and sum, and ``sign(|g|)`` summed (the
    count of non-zero entries). As in the torch adapter, a gradient with Inf/NaN
    entries has an Inf/NaN norm and sum, a ``nonfinite`` flag of 1 (a lower bound of
    the count) and an unknown zero fraction (set on the host). The flag reads the sum
    as well as the max: a sum propagates NaN on every kernel, a max need not.
    """
    g, numel = _flat_entries(grad)
    if scale is not None:
        g = ops.divide(g, ops.cast(scale, "float32"))
    a = ops.abs(g)
    max_abs = ops.max(a)
    sum_abs = ops.sum(a)
    bad = ops.logical_or(ops.logical_not(ops.isfinite(max_abs)), ops.isnan(sum_abs))
    return ops.stack(
        [
            ops.sqrt(ops.vdot(g, g)),
            max_abs,
            sum_abs,
            ops.sum(ops.sign(a)),
            ops.cast(bad, "float32"),
            numel,
        ]
    )


def _flat_entries(grad: Any) -> tuple[Any, Any]:
    """The entries of ``grad`` as a flat float32 tensor, and the entry count of the
    dense gradient (at least 1) as a float32 tensor.

    A ``tf.IndexedSlices`` (the gradient of an ``Embedding`` or a gather) is summed
    over repeated indices, its only non-zero entries, with one zero appended so that
    the max of no looked-up row is 0; it is never made dense.
    """
    if type(grad).__name__ == "IndexedSlices" and getattr(grad, "dense_shape", None) is not None:
        import tensorflow as tf

        rows, position = tf.unique(grad.indices)
        summed = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(rows)[0])
        g = ops.concatenate([ops.reshape(ops.cast(summed, "float32"), (-1,)), ops.zeros((1,))])
        numel = ops.prod(ops.cast(grad.dense_shape, "float32"))
    else:
        g = ops.reshape(ops.cast(grad, "float32"), (-1,))
        numel = ops.cast(ops.size(g), "float32")
    return g, ops.maximum(numel, 1.0)


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
    """``[inactive, dead, tail, nonfinite]`` of one activation output, in-graph: three
    fractions and the count of NaN/Inf entries.

    The fractions are over the finite entries only: a NaN or Inf output is never
    inactive nor in a tail, whatever ``relu(NaN)`` returns on the machine (oneDNN and
    the vector width decide), and a unit is dead when it has finite outputs and all of
    them are inactive. With no finite entry at all the fractions are NaN (unknown) and
    the count is the entry count. On finite outputs this is
    :func:`gradwatch.activations.activation_stats_from_array`; the count is
    :func:`gradwatch.activations.nonfinite_entries`, the entry count less the finite
    ones the fractions already count (no extra pass). Shapes may be unknown when
    traced: counts are computed in-graph.
    """
    y = ops.cast(ops.stop_gradient(y), "float32")
    finite = ops.isfinite(y)
    known = ops.sum(ops.cast(finite, "float32"))
    zero = ops.zeros((), "float32")
    inactive_frac = dead_frac = tail_frac = zero
    if kind in CAN_DIE:
        inactive = ops.logical_and(ops.less_equal(y, 0.0), finite)
        per_unit, per_unit_known = _per_unit_counts([inactive, finite], unit_axis)
        inactive_frac = ops.sum(per_unit) / known
        judged = ops.greater(per_unit_known, 0.0)
        dead = ops.logical_and(judged, ops.greater_equal(per_unit, per_unit_known))
        dead_frac = ops.sum(ops.cast(dead, "float32")) / ops.sum(ops.cast(judged, "float32"))
    elif kind not in SQUASHING:  # tanh is negative half the time: "inactive" means nothing
        inactive = ops.logical_and(ops.less_equal(y, 0.0), finite)
        inactive_frac = ops.sum(ops.cast(inactive, "float32")) / known
    if kind in CAN_SATURATE:
        lo, hi = tail_bounds(kind, derivative_fraction)
        tails = ops.logical_or(ops.less_equal(y, lo), ops.greater_equal(y, hi))
        tail_frac = ops.sum(ops.cast(ops.logical_and(tails, finite), "float32")) / known
    # 0/0 is NaN, but say it outright for every fraction: no finite entry, none known.
    unknown = ops.equal(known, 0.0)
    fractions = ops.stack([inactive_frac, dead_frac, tail_frac])
    fractions = ops.where(unknown, ops.full((ACT_ROWS - 1,), math.nan, "float32"), fractions)
    nonfinite = ops.cast(ops.size(y), "float32") - known
    return ops.concatenate([fractions, ops.reshape(nonfinite, (1,))])


def _per_unit_counts(masks: Sequence[Any], unit_axis: int) -> list[Any]:
    """For each boolean mask, the count of its true entries per unit (along
    ``unit_axis``), the unit count read in-graph (it may be unknown when traced)."""
    counts = []
    for mask in masks:
        moved = ops.moveaxis(mask, unit_axis, -1) if unit_axis != -1 else mask
        units = ops.shape(moved)[-1]
        counts.append(ops.sum(ops.reshape(ops.cast(moved, "float32"), (-1, units)), axis=0))
    return counts


def _activation_table(
    outputs: dict[int, Any],
    kinds: Sequence[str],
    unit_axes: Sequence[int],
    derivative_fraction: float,
) -> Any:
    """``(len(kinds), ACT_ROWS)`` activation rows of one step (see :func:`_activation_row`)
    from the outputs by layer index; NaN rows for layers that did not run in it."""
    missing = ops.full((ACT_ROWS,), math.nan, "float32")
    rows = []
    for i, (kind, axis) in enumerate(zip(kinds, unit_axes, strict=True)):
        y = outputs.get(i)
        rows.append(missing if y is None else _activation_row(y, kind, axis, derivative_fraction))
    return ops.stack(rows)


def _is_sampled(step: Any, sample_every: int, dense_until: int) -> Any:
    """In-graph twin of :func:`gradwatch.schedules.every`: is ``step`` a sampled step?"""
    return ops.logical_or(ops.less(step, dense_until), ops.equal(ops.mod(step, sample_every), 0))


def _is_norm_due(step: Any, sample_every: int, dense_until: int, norm_every: int) -> Any:
    """In-graph: does ``step`` take only its total norm (a multiple of ``norm_every``
    that is not sampled)? The host twin is :func:`norm_due`."""
    unsampled = ops.logical_not(_is_sampled(step, sample_every, dense_until))
    return ops.logical_and(unsampled, ops.equal(ops.mod(step, norm_every), 0))


def norm_due(step: int, sample_every: int, dense_until: int, norm_every: int) -> bool:
    """Host twin of :func:`_is_norm_due`.

    Example:
        >>> [s for s in range(20) if norm_due(s, 8, 4, 3)]
        [6, 9, 12, 15, 18]
    """
    sampled = step < dense_until or step % sample_every == 0
    return norm_every > 0 and not sampled and step % norm_every == 0


def _grad_norms(grads: Sequence[Any], scale: Any = None) -> Any:
    """``(len(grads),)`` float32: the L2 norm of each gradient, one fused pass each
    (``vdot``; ``tf.nn.l2_loss`` on TensorFlow), divided by ``scale`` (a loss scale)
    unless it is ``None``. Finite up to ~1.8e19 per gradient, the range of the sampled
    rows' norms (:func:`_grad_row`)."""
    norms = []
    tensorflow = keras.backend.backend() == "tensorflow"
    for grad in grads:
        g, _ = _flat_entries(grad)
        if tensorflow:
            import tensorflow as tf

            # One kernel: 3x faster than vdot on CPU (12x512 MLP: 1.3 vs 3.9 ms, min of 200).
            norms.append(ops.sqrt(2.0 * tf.nn.l2_loss(g)))
        else:
            norms.append(ops.sqrt(ops.vdot(g, g)))
    stacked = ops.stack(norms)
    return stacked if scale is None else ops.divide(stacked, ops.cast(scale, "float32"))


def _combined_norm(norms: Any) -> Any:
    """The L2 norm of a vector of norms, scaled by the largest so that norms near the
    float32 limit combine without overflow; NaN if any is NaN, Inf if any is Inf."""
    largest = ops.max(norms)
    usable = ops.logical_and(ops.isfinite(largest), ops.greater(largest, 0.0))
    unit = ops.where(usable, largest, ops.ones_like(largest))
    combined = unit * ops.sqrt(ops.sum(ops.square(norms / unit)))
    # A sum propagates NaN on every kernel, a max need not (see _grad_row).
    nan = ops.isnan(ops.sum(norms))
    out = ops.where(ops.isinf(largest), largest, combined)
    return ops.where(nan, ops.full_like(largest, math.nan), out)


def _one_hot_where(index: Any, size: int, new: Any, old: Any) -> Any:
    """``old`` with entry ``index`` along axis 0 replaced by ``new`` (no scatter needed)."""
    mask = ops.equal(ops.arange(size, dtype="int32"), ops.cast(index, "int32"))
    mask = ops.reshape(mask, (size,) + (1,) * (len(old.shape) - 1))
    return ops.where(mask, ops.expand_dims(new, 0), old)


def _one_hot_rows_where(slot: Any, size: int, offset: int, rows: Any, old: Any) -> Any:
    """``old`` (``(size, n, fields)``) with rows ``offset .. offset + len(rows)`` of entry
    ``slot`` replaced by ``rows`` (``(k, fields)``, ``k`` known when traced)."""
    n, k = int(old.shape[1]), int(rows.shape[0])
    fields = int(old.shape[2])
    parts = [rows]
    if offset:
        parts.insert(0, ops.zeros((offset, fields), "float32"))
    if n - offset - k:
        parts.append(ops.zeros((n - offset - k, fields), "float32"))
    padded = ops.concatenate(parts, axis=0) if len(parts) > 1 else rows
    in_rows = np.zeros((1, n, 1), bool)
    in_rows[0, offset : offset + k] = True
    in_slot = ops.equal(ops.arange(size, dtype="int32"), ops.cast(slot, "int32"))
    mask = ops.logical_and(ops.reshape(in_slot, (size, 1, 1)), ops.convert_to_tensor(in_rows))
    return ops.where(mask, ops.expand_dims(padded, 0), old)

"""The callback-owned variables the train step writes into: :class:`Probe`.

Owns the ring layout (one slot per sample: the step, whether the optimizer skipped
it, a :data:`gradwatch.rows.GRAD_ROW_FIELDS` row per gradient, an
:data:`gradwatch.rows.ACT_ROW_FIELDS` row per activation layer and a
:data:`gradwatch.rows.TIME_ROW_FIELDS` row with the time steps per recurrent layer;
and a ring of the total norms of steps not sampled) and :func:`write_sample` /
:func:`write_norm`, the pure computations of a slot's new contents that both the
TensorFlow/torch capture (which assigns them) and the JAX capture (which returns them
as state) use. Also two small
reads: the loss scale the gradients carry (for the captures) and a probe variable's
copy to the host (for the callback).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from gradwatch.adapters.keras.reductions import _grad_row, _one_hot_where, _param_norms
from keras import ops

from gradwatch.rows import ACT_ROWS, GRAD_ROWS, NONFINITE, TIME_ROWS


class Probe:
    """The rings the traced train step writes and the host reads every flush.

    Args:
        n_vars: gradient rows per slot (trainable variables; may grow once, see
            :meth:`ensure_grads`).
        n_acts: activation rows per slot.
        ring: slots of the sample rings.
        norm_ring: slots of the total-norm rings (``0``: none, see :func:`norm_ring_size`).
        norm_every: a step not sampled takes its total norm when it is a multiple of this.
        n_time: through-time rows per slot (recurrent layers, see
            :mod:`gradwatch.adapters.keras.recurrence`). Defaults to ``0``.
    """

    def __init__(
        self,
        n_vars: int,
        n_acts: int,
        ring: int,
        norm_ring: int = 0,
        norm_every: int = 0,
        n_time: int = 0,
    ) -> None:
        self.ring = ring
        self.norm_ring = norm_ring
        self.norm_every = norm_every
        self.n_vars = n_vars
        self.n_acts = n_acts
        kw: dict[str, Any] = {"trainable": False}
        # Optimizer steps seen in this fit.
        self.counter = keras.Variable(0, dtype="int32", name="gradwatch_counter", **kw)
        # Samples written in this fit; the ring slot of a sample is `samples % ring`.
        self.samples = keras.Variable(0, dtype="int32", name="gradwatch_samples", **kw)
        # Per slot: the step written there (-1 = never) and whether it was skipped.
        self.steps = keras.Variable(
            np.full((ring, 2), -1, np.int32), dtype="int32", name="gradwatch_steps", **kw
        )
        self.grads: keras.Variable | None = None
        if n_vars:
            self.ensure_grads(n_vars)
        self.acts: keras.Variable | None = None
        if n_acts:
            self.acts = keras.Variable(
                np.full((ring, n_acts, ACT_ROWS), np.nan, np.float32), name="gradwatch_acts", **kw
            )
        # Per slot and recurrent layer: TIME_ROW_FIELDS and the time steps (NaN = not seen).
        self.time: keras.Variable | None = None
        if n_time:
            self.time = keras.Variable(
                np.full((ring, n_time, TIME_ROWS + 1), np.nan, np.float32),
                name="gradwatch_time",
                **kw,
            )
        # Steps not sampled that took their total norm: slot `step // norm_every % norm_ring`
        # holds the step (-1 = never) and [total norm, skipped by the loss scaler].
        self.norm_steps: keras.Variable | None = None
        self.norms: keras.Variable | None = None
        if norm_ring:
            self.norm_steps = keras.Variable(
                np.full((norm_ring,), -1, np.int32),
                dtype="int32",
                name="gradwatch_norm_steps",
                **kw,
            )
            self.norms = keras.Variable(
                np.full((norm_ring, 2), np.nan, np.float32), name="gradwatch_norms", **kw
            )

    def ensure_grads(self, n_vars: int, capacity: int = 0) -> keras.Variable:
        """The gradient ring, with room for ``n_vars`` rows (and for ``capacity``, the
        model's trainable variables now, when it is created here: on first use when the
        model was not built before fit; a subclassed model builds inside the first
        traced step, and Keras creates variables there under ``tf.init_scope``, as the
        optimizer does)."""
        if self.grads is None:
            self.n_vars = max(n_vars, capacity)
            self.grads = keras.Variable(
                np.zeros((self.ring, max(self.n_vars, 1), GRAD_ROWS), np.float32),
                trainable=False,
                name="gradwatch_grads",
            )
        if n_vars > self.n_vars:
            raise RuntimeError(
                f"the train step applies {n_vars} gradients but the model listed "
                f"{self.n_vars} trainable variables at the start of fit"
            )
        return self.grads

    def state(self) -> list[tuple[str, keras.Variable]]:
        """The variables by attribute name, in the order the JAX path threads them."""
        names = ("counter", "samples", "steps", "grads", "acts", "time", "norm_steps", "norms")
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]


def write_sample(
    probe: Probe,
    current: dict[str, Any],
    step: Any,
    grads: list[Any],
    params: list[Any],
    scale: Any,
    dynamic: bool,
    activation_table: Callable[[], Any] | None,
    param_norms: Any = None,
) -> dict[str, Any]:
    """New values of the rings (``grads``, ``steps``, ``acts``) and of ``samples``
    after writing one sample, from their ``current`` values. Pure, so the TensorFlow
    and torch path assigns the result and the JAX path returns it as state."""
    samples = current["samples"]
    table = grad_table(grads, params, scale, samples, param_norms)
    # Rows in call order (model order), zero-padded to the probe's fixed shape.
    padding = probe.n_vars - len(grads)
    if padding:
        table = ops.concatenate([table, ops.zeros((padding, GRAD_ROWS), "float32")], axis=0)
    slot = ops.mod(samples, probe.ring)
    if dynamic and grads:
        skipped = ops.cast(ops.greater(ops.sum(table[:, NONFINITE]), 0.0), "int32")
    else:
        skipped = ops.convert_to_tensor(0, "int32")
    new = {
        "grads": _one_hot_where(slot, probe.ring, table, current["grads"]),
        "steps": _one_hot_where(slot, probe.ring, ops.stack([step, skipped]), current["steps"]),
    }
    if activation_table is not None:
        new["acts"] = _one_hot_where(slot, probe.ring, activation_table(), current["acts"])
    new["samples"] = samples + 1
    return new


def grad_table(
    grads: list[Any], params: list[Any], scale: Any, samples: Any, param_norms: Any = None
) -> Any:
    """``(len(grads), GRAD_ROWS)``: one :data:`gradwatch.rows.GRAD_ROW_FIELDS` row per
    gradient, divided by ``scale`` first (``None``: unscaled); the weight norms are
    measured on the samples :func:`_param_norms` picks unless ``param_norms`` is given."""
    if not grads:
        return ops.zeros((0, GRAD_ROWS), "float32")
    rows = ops.stack([_grad_row(g, scale) for g in grads])
    if param_norms is None:
        param_norms = _param_norms(params, samples)
    return ops.concatenate([rows, ops.expand_dims(param_norms, -1)], axis=1)


def ring_size(steps_between_reads: int, spe: int, dense_until: int, sample_every: int) -> int:
    """Slots for the samples that can land between two reads, with slack for the final
    partial one (every step is a sample during the dense start)."""
    period = 1 if dense_until > 0 else sample_every
    return math.ceil((steps_between_reads + spe) / period) + 2


def norm_ring_size(steps_between_reads: int, spe: int, sample_every: int, norm_every: int) -> int:
    """Slots for the total norms of the steps between two reads (one per ``norm_every``
    steps, indexed by ``step // norm_every``), or 0 when no step takes only its norm."""
    if norm_every == 0 or sample_every == 1:
        return 0
    return math.ceil((steps_between_reads + spe) / norm_every) + 2


def write_norm(
    probe: Probe, current: dict[str, Any], step: Any, total: Any, skipped: Any
) -> dict[str, Any]:
    """New values of the norm rings after writing ``step``'s total norm (and whether the
    loss scaler skipped it), from their ``current`` values. Pure, as :func:`write_sample`."""
    ring = probe.norm_ring
    slot = ops.mod(ops.floor_divide(step, probe.norm_every), ring)
    entry = ops.stack([ops.cast(total, "float32"), ops.cast(skipped, "float32")])
    return {
        "norm_steps": _one_hot_where(slot, ring, ops.cast(step, "int32"), current["norm_steps"]),
        "norms": _one_hot_where(slot, ring, entry, current["norms"]),
    }


def loss_scale(optimizer: Any) -> Any:
    """What ``optimizer`` divides the gradients by: LossScaleOptimizer's dynamic scale
    (a variable), a fixed ``loss_scale_factor``, or ``None``."""
    scale = getattr(optimizer, "dynamic_scale", None)
    if scale is None:
        scale = getattr(optimizer, "loss_scale_factor", None)
    return scale


def to_host(variable: keras.Variable) -> np.ndarray:
    """One device-to-host copy of a probe variable (tf.Tensor, torch.Tensor or a JAX
    array)."""
    value = variable.value
    detach = getattr(value, "detach", None)
    if callable(detach):  # torch
        value = detach().cpu()
    numpy = getattr(value, "numpy", None)
    return np.asarray(numpy() if callable(numpy) else value)


__all__ = [
    "Probe",
    "grad_table",
    "loss_scale",
    "norm_ring_size",
    "ring_size",
    "to_host",
    "write_norm",
    "write_sample",
]

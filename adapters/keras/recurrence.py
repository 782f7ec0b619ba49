"""Through-time gradients of the Keras adapter: :class:`RecurrentLayers` and the taps.

For every recurrent layer of a model (any ``keras.layers.RNN``: ``SimpleRNN``, ``LSTM``,
``GRU``, ``ConvLSTM*``, an ``RNN`` of a custom cell, also inside ``Bidirectional``) the
callback measures, on sampled training steps, how much of the gradient arriving at the
layer's last processed output is left when it has gone back through every time step:
the RMS of dL/d(initial state) (``StepStats.time_grad_first``; LSTM's ``h`` and ``c``
together) against the RMS of dL/d(output) at the last processed step
(``time_grad_last``). Parameter norms cannot show a gradient that dies on its way back
through 200 time steps: the recurrent weights still get the gradient of the last few.

Why the state and not the input (which the torch adapter taps, on sampled steps only):
a Keras train step is one traced graph (TensorFlow, JAX), so a tap is there on every
step. The gradient reaching the initial state is the recurrence's own carried gradient
after its last backward step, computed anyway; a gradient with respect to a data input
is not, and asking for it made every step of a 200-step ``SimpleRNN`` ~40% slower on
TensorFlow (measured, ``benchmarks/keras_fit_cost.py --model rnn``). A plain RNN's two
measures both shrink by the product of its per-step Jacobians; they differ by one
weight matrix (``W_hh`` against ``W_xh``).

How: the layer's ``call`` is wrapped inside the train step. Its initial state (the zeros
Keras would make, or the one passed) and its output pass through taps: identities (the
layer computes exactly what it computed before) whose backward passes hand the gradient
to the capture unchanged, which reduces it in the step's sampled branch. A state of
zeros needs no gradient: the tap also takes one of the layer's own trainable variables
(TensorFlow, JAX) or a scalar that requires a gradient (torch) and gives it an
exactly-zero gradient, so the backward pass runs through the tap.

* TensorFlow: ``tf.custom_gradient``; the gradients are tensors of the traced train step.
* torch: a ``torch.autograd.Function``, only on steps known to be sampled.
* JAX: ``jax.custom_vjp``; its backward runs when ``jax.value_and_grad`` transposes the
  step, at the level of the ``jit`` trace, so the gradient can be reduced after it.

What is measured, layer by layer:

* the last processed output is the output itself, or its last step with
  ``return_sequences=True`` (Keras returns sequences in processing order, so also with
  ``go_backwards=True``);
* each direction of a ``Bidirectional`` layer is measured on its own, named by its
  variables' layer group (``bidirectional/forward_simple_rnn/simple_rnn_cell``);
* with a mask the state is carried through masked steps unchanged, so the ratio is
  that of the real steps, and the time steps are the mean unmasked count;
* a ``stateful=True`` layer, or a nested (tuple) input, is not measured.

Example:
    >>> import keras
    >>> m = keras.Sequential([keras.Input((20, 4)), keras.layers.SimpleRNN(8)])
    >>> RecurrentLayers(m).names
    ('sequential/simple_rnn/simple_rnn_cell',)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
from gradwatch.adapters.keras.layers import var_name
from keras import ops

from gradwatch.rows import TIME_ROWS
from gradwatch.run_statistics import module_of

# The backend's tap: (tensor, anchor, report) -> the tensor, unchanged; `report` gets the
# gradient arriving at it in the backward pass.
Tap = Callable[[Any, Any, Callable[[Any], None]], Any]


class RecurrentLayers:
    """The recurrent layers of ``model`` measured through time, in model order.

    Attributes:
        layers: the ``keras.layers.RNN`` instances (each direction of a
            ``Bidirectional`` on its own) that hold trainable variables.
        names: the time row name of each, its variables' layer group.
        anchors: a trainable variable of each, whose zero gradient makes the tap run.
    """

    def __init__(self, model: keras.Model) -> None:
        layers: list[Any] = []
        seen: set[int] = set()
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if not isinstance(layer, keras.layers.RNN) or id(layer) in seen:
                continue
            seen.add(id(layer))
            if layer.trainable_variables:
                layers.append(layer)
        # In the order of the model's variables, as the gradient rows are.
        order = {id(v): i for i, v in enumerate(model.trainable_variables)}
        layers.sort(key=lambda layer: order.get(id(layer.trainable_variables[0]), len(order)))
        self.layers: tuple[Any, ...] = tuple(layers)
        self.anchors: tuple[Any, ...] = tuple(layer.trainable_variables[0] for layer in layers)
        self.names: tuple[str, ...] = tuple(module_of(var_name(v)) for v in self.anchors)

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class TimeGrads:
    """What the taps of one recurrent layer's call handed over in this step.

    Attributes:
        sequences: the layer's input (its time steps are ``shape[1]``).
        mask: its mask, or ``None``.
        first: dL/d(initial state), one tensor per state tensor.
        last: dL/d(output), or ``None`` before the backward pass reached it.
    """

    sequences: Any
    mask: Any = None
    first: list[Any] = field(default_factory=list)
    last: Any = None


def measurable(layer: Any, sequences: Any) -> bool:
    """A stateless layer called on a single batch-major tensor with a time axis."""
    # A list or tuple of tensors has no shape.
    shape = getattr(sequences, "shape", None)
    return not getattr(layer, "stateful", False) and shape is not None and len(shape) >= 3


def time_table(grads: dict[int, TimeGrads], n_layers: int) -> Any:
    """``(n_layers, TIME_ROWS + 1)``: per recurrent layer the RMS of dL/d(initial state),
    of dL/d(output) at the last processed step, and its time steps; a row of NaN for a
    layer not measured this step."""
    rows = []
    missing = ops.full((TIME_ROWS + 1,), math.nan, "float32")
    for i in range(n_layers):
        record = grads.get(i)
        if record is None or record.last is None or not record.first:
            rows.append(missing)
            continue
        flat = [ops.reshape(ops.cast(g, "float32"), (-1,)) for g in record.first]
        first = _rms(ops.concatenate(flat) if len(flat) > 1 else flat[0])
        last_out = record.last[:, -1] if len(record.last.shape) == 3 else record.last
        rows.append(ops.stack([first, _rms(last_out), _time_steps(record)]))
    return ops.stack(rows)


def _time_steps(record: TimeGrads) -> Any:
    """The sequence length, or with a mask the mean number of unmasked steps."""
    if record.mask is not None:
        return ops.mean(ops.sum(ops.cast(record.mask, "float32"), axis=1))
    return ops.cast(ops.shape(record.sequences)[1], "float32")


def _rms(g: Any) -> Any:
    """RMS of ``g``, scaled by its max first: a gradient that decayed through time to
    1e-25 must not square to 0 in float32 (JAX has no float64 here)."""
    g = ops.cast(g, "float32")
    peak = ops.max(ops.abs(g))
    safe = ops.where(ops.logical_and(peak > 0.0, ops.isfinite(peak)), peak, 1.0)
    return peak * ops.sqrt(ops.mean(ops.square(g / safe)))


# --- the backends' taps ----------------------------------------------------------------


def backend_tap(backend: str) -> Tap:
    """The tap of ``backend`` (``"tensorflow"``, ``"torch"`` or ``"jax"``)."""
    if backend == "tensorflow":
        return _tf_tap
    if backend == "torch":
        return _torch_tap
    if backend == "jax":
        return _jax_tap
    raise NotImplementedError(f"no through-time tap for the {backend!r} backend")


def _tf_tap(x: Any, anchor: Any, report: Callable[[Any], None]) -> Any:
    import tensorflow as tf

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def gradwatch_tap(x: Any, anchor: Any) -> Any:
        def grad(g: Any) -> Any:
            report(g)
            return g, tf.zeros_like(anchor)

        return tf.identity(x), grad

    return gradwatch_tap(x, anchor)


def _torch_tap(x: Any, anchor: Any, report: Callable[[Any], None]) -> Any:
    import torch

    # A fresh scalar that requires a gradient: the tap runs even on data; the model's
    # variables are not touched at all.
    scalar = torch.zeros((), device=x.device, requires_grad=True)
    return _TorchTap.apply(x, scalar, report)


def _jax_tap(x: Any, anchor: Any, report: Callable[[Any], None]) -> Any:
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def gradwatch_tap(x: Any, anchor: Any) -> Any:
        return x

    def forward(x: Any, anchor: Any) -> tuple[Any, Any]:
        return x, anchor

    def backward(anchor: Any, g: Any) -> tuple[Any, Any]:
        report(g)
        return g, jnp.zeros_like(anchor)

    gradwatch_tap.defvjp(forward, backward)
    return gradwatch_tap(x, anchor)


def _torch_tap_type() -> type:
    import torch

    class TorchTap(torch.autograd.Function):
        """Identity forward; the backward reports the gradient and passes it on."""

        @staticmethod
        def forward(ctx: Any, x: Any, scalar: Any, report: Callable[[Any], None]) -> Any:  # type: ignore[override]
            ctx.report = report
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None]:  # type: ignore[override]
            ctx.report(grad.detach())
            return (grad if ctx.needs_input_grad[0] else None), None, None

    return TorchTap


class _LazyTorchTap:
    """The autograd Function, defined on first use: importing this module must not
    import torch on the TensorFlow and JAX backends."""

    _type: type | None = None

    def apply(self, *args: Any) -> Any:
        if self._type is None:
            self._type = _torch_tap_type()
        return self._type.apply(*args)  # type: ignore[attr-defined]


_TorchTap = _LazyTorchTap()


__all__ = ["RecurrentLayers", "TimeGrads", "backend_tap", "measurable", "time_table"]

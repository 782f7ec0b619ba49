"""Through-time gradients of the Keras adapter: :class:`RecurrentLayers` and the input taps.

For every recurrent layer of a model (any ``keras.layers.RNN``: ``SimpleRNN``, ``LSTM``,
``GRU``, ``ConvLSTM*``, an ``RNN`` of a custom cell, also inside ``Bidirectional``) the
callback measures, on sampled training steps, the RMS over batch and features of
dL/d(input) at the time step the layer processes first and at the one it processes last
(``StepStats.time_grad_first`` / ``time_grad_last``). Parameter norms cannot show a
gradient that dies on its way back through 200 time steps: the recurrent weights still
get the gradient of the last few steps.

How: the layer's ``call`` is wrapped so that, inside the train step, its input passes
through a tap: an identity (the layer computes exactly what it computed before) whose
backward pass hands the gradient arriving at the input to the capture unchanged, which
reduces it in the step's sampled branch. An input that needs no gradient (data) gets one
anyway: the tap also takes one of the layer's own trainable variables (TensorFlow, JAX)
or a scalar that requires a gradient (torch) and gives it an exactly-zero gradient, so
the backward pass runs through the tap; the variable's gradient is its own plus 0.

* TensorFlow: ``tf.custom_gradient``; the gradient is a tensor of the traced train step.
* torch: a ``torch.autograd.Function``, only on steps known to be sampled.
* JAX: ``jax.custom_vjp``; its backward runs when ``jax.value_and_grad`` transposes the
  step, at the level of the ``jit`` trace, so the gradient can be reduced after it.

What is measured, layer by layer:

* the time axis is 1 (Keras 3 recurrent inputs are batch-major);
* a layer with ``go_backwards=True`` (the backward half of ``Bidirectional``) processes
  the last input step first: its ends are swapped, so "first" is always the step whose
  gradient went back through the whole recurrence;
* each direction of a ``Bidirectional`` layer is measured on its own, named by its
  variables' layer group (``bidirectional/forward_simple_rnn/simple_rnn_cell``);
* a masked input is not measured (its sequences end at different steps, and pre-padding
  would zero the first steps' gradient); the report says so once;
* a nested (tuple) input, or one with fewer than 2 time steps, is not measured.

Example:
    >>> import keras
    >>> m = keras.Sequential([keras.Input((20, 4)), keras.layers.SimpleRNN(8)])
    >>> RecurrentLayers(m).names
    ('sequential/simple_rnn/simple_rnn_cell',)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
from gradwatch.adapters.keras.layers import var_name
from keras import ops

from gradwatch.rows import TIME_ROWS
from gradwatch.run_statistics import module_of

# The backend's tap: (input, anchor, report) -> the input, unchanged; `report` gets the
# gradient arriving at it in the backward pass.
Tap = Callable[[Any, Any, Callable[[Any], None]], Any]


class RecurrentLayers:
    """The recurrent layers of ``model`` whose input gradient is measured, in model order.

    Attributes:
        layers: the ``keras.layers.RNN`` instances (each direction of a
            ``Bidirectional`` on its own) that hold trainable variables.
        names: the time row name of each, its variables' layer group.
        reversed: whether each processes its input from the last step (``go_backwards``).
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
        self.reversed: tuple[bool, ...] = tuple(bool(layer.go_backwards) for layer in layers)

    def __len__(self) -> int:
        return len(self.layers)


def measurable(sequences: Any) -> bool:
    """A single batch-major tensor with a time axis (``ndim >= 3``)."""
    shape = getattr(sequences, "shape", None)
    return shape is not None and len(shape) >= 3 and not isinstance(sequences, (list, tuple))


def time_table(grads: dict[int, Any], reversed_: tuple[bool, ...]) -> Any:
    """``(len(reversed_), TIME_ROWS + 1)``: per recurrent layer the RMS of its input
    gradient at the step processed first and at the one processed last, and its time
    steps; a row of NaN for a layer with no gradient this step."""
    rows = []
    missing = ops.full((TIME_ROWS + 1,), math.nan, "float32")
    for i, backwards in enumerate(reversed_):
        g = grads.get(i)
        if g is None:
            rows.append(missing)
            continue
        first, last = _step_rms(g[:, 0]), _step_rms(g[:, -1])
        if backwards:
            first, last = last, first
        length = ops.cast(ops.shape(g)[1], "float32")
        rows.append(ops.stack([first, last, length]))
    return ops.stack(rows)


def _step_rms(g: Any) -> Any:
    """RMS of one time step's gradient, scaled by its max first: a gradient that decayed
    through time to 1e-25 must not square to 0 in float32 (JAX has no float64 here)."""
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
    raise NotImplementedError(f"no input tap for the {backend!r} backend")


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


__all__ = ["RecurrentLayers", "backend_tap", "measurable", "time_table"]

"""Keras 3 scenarios of the causes published buggy models showed (issue #14), each with
a known cause that decides which fix an expert tries first (see
``benchmarks/scenarios/expected_fixes.py``).

Every label was measured without gradwatch by ``benchmarks/verify_labels.py``
(``tf.GradientTape`` over the same batches, see ``keras_zoo.measure_keras``); the
"measured" line of each docstring gives that evidence (seed 0, TensorFlow backend).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras

from benchmarks.scenarios import HEALTHY, Scenario
from benchmarks.scenarios.keras_zoo import BATCH, KerasRun, _mlp, _run, _seed


def dead_relu_tiny_uniform_init(seed: int) -> KerasRun:
    """6 ReLU Dense(128) with Keras 1's old default ``RandomUniform(-0.05, 0.05)``.

    measured: 90% of a hidden layer's units dead (median), loss 2.31 -> 2.31;
    first/last RMS ratio 0.16 (no vanishing), total norm growth 1x."""
    _seed(seed)
    tiny = keras.initializers.RandomUniform(-0.05, 0.05)
    model = _mlp([128] * 6, "relu", kernel_initializer=tiny)
    return _run(model, keras.optimizers.SGD(0.1, momentum=0.9), epochs=2)


def saturation_sigmoid_gate_bias(seed: int) -> KerasRun:
    """``relu(W x) * sigmoid(G x + 8)``: the gate starts at sigmoid(8) = 0.9997.

    measured: 98% of the gate's outputs in the tails (median), loss 2.5 -> 0.051."""
    _seed(seed)
    x = keras.Input((64,))
    value = keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal")(x)
    gate = keras.layers.Dense(
        64, activation="sigmoid", bias_initializer=keras.initializers.Constant(8.0)
    )(x)
    out = keras.layers.Dense(10)(keras.layers.Multiply()([value, gate]))
    return _run(keras.Model(x, out), keras.optimizers.SGD(0.05, momentum=0.9), epochs=2)


def nonfinite_exp_activation(seed: int) -> KerasRun:
    """A hidden ``activation="exponential"`` layer: the updates grow its input until
    exp(z) overflows float32 in the forward pass.

    measured: total norm up 2980x in two steps, then NaN on every step (112 of 114)."""
    _seed(seed)
    model = _mlp([64], "exponential")
    return _run(model, keras.optimizers.SGD(0.05), epochs=2)


def _lstm(layer: keras.layers.Layer) -> keras.Model:
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Reshape((8, 8)), layer, keras.layers.Dense(10)]
    )


def exploding_lstm_sgd_lr200(seed: int) -> KerasRun:
    """An LSTM(32) trained with plain SGD at lr=200.

    measured: total norm up 427x within 50 steps, loss 70.9 -> 35.2, no NaN."""
    _seed(seed)
    return _run(_lstm(keras.layers.LSTM(32)), keras.optimizers.SGD(200.0), epochs=2)


def healthy_bilstm(seed: int) -> KerasRun:
    """A bidirectional LSTM with Adam: isolated gradient spikes are normal for LSTMs.

    measured: total norm at most 1.48x its first value, loss 2.17 -> 0.134."""
    _seed(seed)
    model = _lstm(keras.layers.Bidirectional(keras.layers.LSTM(32)))
    return _run(model, keras.optimizers.Adam(1e-2), epochs=2)


_E2 = 2 * math.ceil(1797 / BATCH)
_SLOW = {"exploding_lstm_sgd_lr200", "healthy_bilstm"}


def _s(fn: Callable[[int], KerasRun], expected: str, cause: str) -> Scenario:
    labels = HEALTHY if expected == HEALTHY else frozenset(expected.split("+"))
    fast = fn.__name__ not in _SLOW
    return Scenario(fn.__name__, "keras", labels, fn, _E2, cause, fast=fast)


SCENARIOS: tuple[Scenario, ...] = (
    _s(dead_relu_tiny_uniform_init, "dead_relu", "6 ReLU Dense(128), RandomUniform(+-0.05)"),
    _s(saturation_sigmoid_gate_bias, "saturation", "relu(Wx) * sigmoid(Gx + 8) gated layer"),
    _s(
        nonfinite_exp_activation,
        "exploding_gradient+nonfinite_gradient",
        "Dense(64, activation='exponential'), SGD lr=0.05",
    ),
    _s(exploding_lstm_sgd_lr200, "exploding_gradient", "LSTM(32), plain SGD at lr=200"),
    _s(healthy_bilstm, HEALTHY, "Bidirectional(LSTM(32)) over the 8 rows, Adam 1e-2"),
)

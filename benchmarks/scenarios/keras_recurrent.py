"""Keras 3 recurrent scenarios: the gradient through time of ``SimpleRNN``, ``LSTM``, ``GRU``.

The task of :mod:`benchmarks.scenarios.torch_recurrent`, on generated data: read a
sequence of 4-feature vectors (N(0, 1)) and say whether the first feature summed over
its last 20 steps is positive (many-to-one: the layer's last output, then ``Dense(2)``,
Adam lr 3e-3, batch 32, 100 steps). A plain tanh ``SimpleRNN`` over 200 steps loses its
gradient through time while its variables' norms look normal; an ``LSTM``, a ``GRU``,
a ``Bidirectional(SimpleRNN)`` read at both final states and a 10-step ``SimpleRNN`` on
the same task are the healthy twins... except that a bidirectional plain RNN's forward
half vanishes just as the plain one does: it is labelled so.

The labels are checked without gradwatch by :func:`measure_through_time`: a
``tf.GradientTape`` over the same batches watches the layer's input and gives the RMS of
dL/dx at the first and the last time step. A run is ``vanishing_gradient`` when its
plain recurrent layer's median ratio, over steps 10 to 59, is below 1e-5; a healthy
run's loss learns (last-10 mean below 80% of the first-5 mean). Run
``KERAS_BACKEND=tensorflow python -m benchmarks.scenarios.keras_recurrent [names]`` for the
table (about 15 minutes for all five).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from benchmarks.scenarios import HEALTHY, Scenario
from benchmarks.scenarios.keras_zoo import KerasRun, _seed
from benchmarks.scenarios.recurrent_task import (
    BATCH,
    FEATURES,
    HIDDEN,
    JUDGED,
    LABEL_STEPS,
    LONG,
    RATIO_THRESHOLD,
    SHORT,
)

STEPS = 100


def sequences(length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``STEPS`` batches of sequences ``(x, y)``: x of shape (BATCH * STEPS, length,
    FEATURES), y whether the first feature summed over the last ``LABEL_STEPS`` steps
    is positive."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH * STEPS, length, FEATURES)).astype(np.float32)
    y = (x[:, -LABEL_STEPS:, 0].sum(axis=1) > 0).astype(np.int32)
    return x, y


def _run(layer: Callable[[], keras.layers.Layer], length: int, seed: int) -> KerasRun:
    _seed(seed)
    model = keras.Sequential(
        [keras.Input((length, FEATURES)), layer(), keras.layers.Dense(2)], name="seq"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = sequences(length, seed)
    return KerasRun(model, x, y, epochs=1, batch_size=BATCH)


def vanishing_simple_rnn_through_time(seed: int) -> KerasRun:
    return _run(lambda: keras.layers.SimpleRNN(HIDDEN), LONG, seed)


def vanishing_bidirectional_rnn_through_time(seed: int) -> KerasRun:
    return _run(lambda: keras.layers.Bidirectional(keras.layers.SimpleRNN(HIDDEN)), LONG, seed)


def healthy_lstm_long_sequence(seed: int) -> KerasRun:
    return _run(lambda: keras.layers.LSTM(HIDDEN), LONG, seed)


def healthy_gru_long_sequence(seed: int) -> KerasRun:
    return _run(lambda: keras.layers.GRU(HIDDEN), LONG, seed)


def healthy_simple_rnn_short_sequence(seed: int) -> KerasRun:
    return _run(lambda: keras.layers.SimpleRNN(HIDDEN), SHORT, seed)


def _s(fn: Callable[[int], KerasRun], expected: str, cause: str, fast: bool = True) -> Scenario:
    labels = HEALTHY if expected == HEALTHY else frozenset({expected})
    return Scenario(fn.__name__, "keras", labels, fn, STEPS, cause, fast=fast)


SCENARIOS: tuple[Scenario, ...] = (
    _s(
        vanishing_simple_rnn_through_time,
        "vanishing_gradient",
        "plain tanh SimpleRNN over 200 time steps, many-to-one, Keras default init",
    ),
    _s(
        vanishing_bidirectional_rnn_through_time,
        "vanishing_gradient",
        "Bidirectional(SimpleRNN) over 200 steps: each half forgets the far end",
        fast=False,
    ),
    _s(healthy_lstm_long_sequence, HEALTHY, "LSTM on the same 200-step task", fast=False),
    _s(healthy_gru_long_sequence, HEALTHY, "GRU on the same 200-step task", fast=False),
    _s(
        healthy_simple_rnn_short_sequence,
        HEALTHY,
        "plain tanh SimpleRNN on the same task over 10 time steps",
    ),
)


# --- label check without gradwatch -------------------------------------------------------


def _rms(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.sqrt(np.mean(a * a)))


def measure_through_time(scn: Scenario, seed: int = 0) -> dict[str, Any]:
    """Train ``scn`` with a plain ``tf.GradientTape`` loop over the same batches and
    measure, per recurrent layer (each direction of a ``Bidirectional`` on its own, by
    the step it processes first), RMS dL/dx_first / RMS dL/dx_last of its input.
    Returns the median ratio over :data:`JUDGED` per layer and whether the loss learns."""
    import tensorflow as tf

    run = scn.build(seed)
    model, opt, loss_fn = run.model, run.model.optimizer, run.model.loss
    ratios: dict[str, list[float]] = {}
    losses: list[float] = []
    for step in range(run.steps):
        xb = tf.constant(run.x[step * BATCH : (step + 1) * BATCH])
        yb = run.y[step * BATCH : (step + 1) * BATCH]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(yb, model(xb, training=True)))
        opt.apply(tape.gradient(loss, model.trainable_weights), model.trainable_weights)
        losses.append(float(loss))
        if step not in JUDGED:
            continue
        for name, (g, backwards) in _input_grads(model, xb, yb).items():
            first, last = _rms(g[:, 0]), _rms(g[:, -1])
            if backwards:
                first, last = last, first
            ratios.setdefault(name, []).append(first / last if last > 0 else math.nan)
    median = {k: statistics.median(v) for k, v in ratios.items()}
    learns = statistics.mean(losses[-10:]) < 0.8 * statistics.mean(losses[:5])
    cells = [layer.cell for layer in model._flatten_layers() if isinstance(layer, keras.layers.RNN)]
    plain = all(isinstance(c, keras.layers.SimpleRNNCell) for c in cells)
    return {
        "ratio": median,
        "plain": plain,
        "learns": learns,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _input_grads(model: Any, xb: Any, yb: Any) -> dict[str, tuple[np.ndarray, bool]]:
    """dL/dx of the recurrent layer (of each direction of a ``Bidirectional`` one, the
    other held constant), and whether it processes the input backwards."""
    import tensorflow as tf

    rnn, head = model.layers[0], model.layers[1]

    def loss_of(h: Any) -> Any:
        return tf.reduce_mean(model.loss(yb, head(h, training=True)))

    if not isinstance(rnn, keras.layers.Bidirectional):
        with tf.GradientTape() as tape:
            tape.watch(xb)
            loss = loss_of(rnn(xb, training=True))
        return {rnn.name: (np.asarray(tape.gradient(loss, xb)), False)}
    grads = {}
    for mine in (rnn.forward_layer, rnn.backward_layer):
        with tf.GradientTape() as tape:
            tape.watch(xb)
            halves = [
                d(xb, training=True) if d is mine else tf.stop_gradient(d(xb, training=True))
                for d in (rnn.forward_layer, rnn.backward_layer)
            ]
            loss = loss_of(tf.concat(halves, axis=-1))  # merge_mode="concat", the default
        grads[mine.name] = (np.asarray(tape.gradient(loss, xb)), bool(mine.go_backwards))
    return grads


def judge(m: dict[str, Any]) -> set[str]:
    """The labels a measurement gives: vanishing when a plain layer's ratio is low."""
    low = any(r < RATIO_THRESHOLD for r in m["ratio"].values())
    return {"vanishing_gradient"} if low else set()


def main(names: list[str]) -> int:
    """Print each scenario's (or those ``names`` lists) measured ratios and whether its
    label holds: a plain RNN by its ratio, a gated one (not judged through time) by
    learning."""
    wrong = 0
    for scn in SCENARIOS:
        if names and scn.name not in names:
            continue
        m = measure_through_time(scn)
        got = judge(m) if m["plain"] else set()
        ok = got == set(scn.expected_rules) and (m["plain"] or m["learns"])
        wrong += not ok
        ratios = ", ".join(f"{k} {v:.1e}" for k, v in m["ratio"].items())
        print(
            f"{scn.name:45s} {ratios:60s} loss {m['loss_first']:.3f} -> "
            f"{m['loss_last']:.3f} {'ok' if ok else 'WRONG'}"
        )
    return wrong


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))

"""Keras 3 scenarios: each ``build(seed)`` returns a :class:`KerasRun`, a compiled model
and its data; ``run.fit(callbacks)`` trains it with ``model.fit`` as a user would.

Set ``KERAS_BACKEND`` before importing this module. Data: scikit-learn's digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from benchmarks.scenarios import HEALTHY, Scenario

BATCH = 32
# The eager GradientTape loop is ~20x slower than fit: measure the first 120 steps
# (labels are judged over the first 50; "learns" compares steps 0-5 with 110-120).
MEASURE_STEPS = 120


@dataclass
class KerasRun:
    model: Any
    x: np.ndarray
    y: np.ndarray
    epochs: int
    batch_size: int = BATCH

    def fit(self, callbacks: list[Any]) -> Any:
        return self.model.fit(
            self.x,
            self.y,
            batch_size=self.batch_size,
            epochs=self.epochs,
            verbose=0,
            shuffle=False,
            callbacks=callbacks,
        )

    @property
    def steps(self) -> int:
        return self.epochs * math.ceil(len(self.x) / self.batch_size)


def digits(normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32)
    if normalize:
        x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-3)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))  # fit runs with shuffle=False: shuffle once here
    return x[order], d.target.astype(np.int32)[order]


def _mlp(
    sizes: list[int],
    activation: str,
    out: int = 10,
    out_activation: str | None = None,
    **dense: Any,
) -> Any:
    layers: list[Any] = [keras.Input((64,))]
    layers += [keras.layers.Dense(n, activation=activation, **dense) for n in sizes]
    layers.append(keras.layers.Dense(out, activation=out_activation))
    return keras.Sequential(layers)


def _run(
    model: Any, optimizer: Any, *, normalize: bool = True, epochs: int = 5, loss: Any = None
) -> KerasRun:
    model.compile(
        optimizer=optimizer,
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = digits(normalize)
    return KerasRun(model, x, y, epochs)


def _seed(seed: int) -> None:
    keras.utils.set_random_seed(seed)


def _normal(std: float) -> Any:
    return keras.initializers.RandomNormal(stddev=std)


# --- faulty ---------------------------------------------------------------------------


def vanishing_sigmoid_deep(seed: int) -> KerasRun:
    _seed(seed)
    return _run(_mlp([32] * 15, "sigmoid"), keras.optimizers.SGD(0.1))


def vanishing_tanh_tiny_init(seed: int) -> KerasRun:
    _seed(seed)
    return _run(_mlp([64] * 8, "tanh", kernel_initializer=_normal(0.02)), keras.optimizers.SGD(0.1))


def exploding_large_init(seed: int) -> KerasRun:
    _seed(seed)
    return _run(
        _mlp([64] * 6, "relu", kernel_initializer=_normal(0.5)),
        keras.optimizers.SGD(0.01),
        epochs=2,
    )


def exploding_huge_lr(seed: int) -> KerasRun:
    _seed(seed)
    return _run(
        _mlp([128] * 4, "relu", kernel_initializer="he_normal"),
        keras.optimizers.SGD(3.0, momentum=0.9),
        epochs=2,
    )


def dead_relu_negative_bias(seed: int) -> KerasRun:
    _seed(seed)
    model = _mlp(
        [128] * 4,
        "relu",
        kernel_initializer="he_normal",
        bias_initializer=keras.initializers.Constant(-3.0),
    )
    return _run(model, keras.optimizers.SGD(0.05))


def saturation_large_init(seed: int) -> KerasRun:
    _seed(seed)
    return _run(
        _mlp([128] * 3, "sigmoid", kernel_initializer=_normal(2.0)), keras.optimizers.SGD(0.05)
    )


def saturation_unnormalized_inputs(seed: int) -> KerasRun:
    _seed(seed)
    return _run(_mlp([64] * 3, "tanh"), keras.optimizers.SGD(0.01), normalize=False)


def _naive_bce(y_true: Any, p: Any) -> Any:
    from keras import ops

    y = ops.cast(ops.expand_dims(ops.greater_equal(ops.cast(y_true, "int32"), 5), -1), p.dtype)
    return -ops.mean(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p))


def nonfinite_naive_bce(seed: int) -> KerasRun:
    _seed(seed)
    model = _mlp([64, 64], "relu", out=1, out_activation="sigmoid", kernel_initializer="he_normal")
    return _run(model, keras.optimizers.SGD(0.01), normalize=False, loss=_naive_bce, epochs=2)


# --- healthy --------------------------------------------------------------------------


def healthy_he_relu_batchnorm(seed: int) -> KerasRun:
    _seed(seed)
    layers: list[Any] = [keras.Input((64,))]
    for _ in range(6):
        layers += [
            keras.layers.Dense(64, kernel_initializer="he_normal"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    model = keras.Sequential([*layers, keras.layers.Dense(10)])
    return _run(model, keras.optimizers.SGD(0.05, momentum=0.9))


def healthy_cnn(seed: int) -> KerasRun:
    _seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Reshape((8, 8, 1)),
            keras.layers.Conv2D(
                16, 3, padding="same", activation="relu", kernel_initializer="he_normal"
            ),
            keras.layers.Conv2D(
                16, 3, padding="same", activation="relu", kernel_initializer="he_normal"
            ),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    return _run(model, keras.optimizers.Adam(3e-3))


def healthy_lstm(seed: int) -> KerasRun:
    _seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Reshape((8, 8)),
            keras.layers.LSTM(32),
            keras.layers.Dense(10),
        ]
    )
    return _run(model, keras.optimizers.Adam(1e-2))


def healthy_sigmoid_output_confident(seed: int) -> KerasRun:
    _seed(seed)
    model = _mlp([64, 64], "relu", out=1, out_activation="sigmoid", kernel_initializer="he_normal")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    x, y = digits()
    return KerasRun(model, x, (y == 0).astype(np.float32)[:, None], epochs=5)


def healthy_frozen_layers(seed: int) -> KerasRun:
    _seed(seed)
    model = _mlp([128] * 4, "relu", kernel_initializer="he_normal")
    for layer in model.layers[:2]:
        layer.trainable = False
    return _run(model, keras.optimizers.SGD(0.05))


def healthy_tanh_glorot(seed: int) -> KerasRun:
    _seed(seed)
    return _run(_mlp([64] * 4, "tanh"), keras.optimizers.SGD(0.05, momentum=0.9))


# --- registry -------------------------------------------------------------------------


_FAST = {
    "vanishing_sigmoid_deep",
    "dead_relu_negative_bias",
    "saturation_unnormalized_inputs",
    "nonfinite_naive_bce",
    "healthy_he_relu_batchnorm",
    "healthy_sigmoid_output_confident",
}


def _s(fn: Callable[[int], KerasRun], expected: str, cause: str, steps: int) -> Scenario:
    labels = HEALTHY if expected == HEALTHY else frozenset(expected.split("+"))
    return Scenario(fn.__name__, "keras", labels, fn, steps, cause, fast=fn.__name__ in _FAST)


_E5 = 5 * math.ceil(1797 / BATCH)
_E2 = 2 * math.ceil(1797 / BATCH)

SCENARIOS: tuple[Scenario, ...] = (
    _s(vanishing_sigmoid_deep, "vanishing_gradient", "15 sigmoid Dense(32), Glorot init", _E5),
    _s(vanishing_tanh_tiny_init, "vanishing_gradient", "8 tanh Dense(64), N(0, 0.02)", _E5),
    _s(
        exploding_large_init,
        "exploding_gradient+nonfinite_gradient",
        "6 ReLU Dense(64), N(0, 0.5) init",
        _E2,
    ),
    _s(
        exploding_huge_lr,
        "exploding_gradient+nonfinite_gradient",
        "He ReLU MLP, SGD lr=3 momentum 0.9",
        _E2,
    ),
    _s(dead_relu_negative_bias, "dead_relu", "He ReLU MLP, biases -3", _E5),
    _s(saturation_large_init, "saturation", "3 sigmoid Dense(128), N(0, 2) init", _E5),
    _s(saturation_unnormalized_inputs, "saturation", "tanh MLP on raw 0..16 pixels", _E5),
    _s(nonfinite_naive_bce, "nonfinite_gradient", "hand-written BCE, log(1 - sigmoid)", _E2),
    _s(healthy_he_relu_batchnorm, HEALTHY, "6x(Dense, BatchNorm, ReLU)", _E5),
    _s(healthy_cnn, HEALTHY, "two He-init Conv2D + ReLU, Adam", _E5),
    _s(healthy_lstm, HEALTHY, "LSTM(32) over the 8 rows, Adam", _E5),
    _s(healthy_sigmoid_output_confident, HEALTHY, "sigmoid output, confident BCE", _E5),
    _s(healthy_frozen_layers, HEALTHY, "first two Dense layers frozen", _E5),
    _s(healthy_tanh_glorot, HEALTHY, "4 tanh Dense(64), Glorot init", _E5),
)


# --- independent measurement (for benchmarks/verify_labels.py) ---------------------------


def measure_keras(scn: Scenario, seed: int = 0) -> dict[str, Any]:
    """Train ``scn`` with a plain ``tf.GradientTape`` loop over the same batches, in the
    same order, with the same optimizer, and record what verify_labels judges."""
    import tensorflow as tf

    from benchmarks.verify_labels import summarise

    run = scn.build(seed)
    model = run.model
    opt = model.optimizer
    loss_fn = keras.losses.get(model.loss) if isinstance(model.loss, str) else model.loss
    sites = [
        (layer, getattr(getattr(layer, "activation", None), "__name__", ""))
        for layer in model.layers
    ]
    sites = [(layer, k) for layer, k in sites if k in ("relu", "sigmoid", "tanh")]
    sites += [(layer, "relu") for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    probe = keras.Model(model.inputs, [layer.output for layer, _ in sites]) if sites else None
    out_layer = model.layers[-1]
    groups = [layer.name for layer in model.layers if layer.trainable_weights]
    numels = {
        layer.name: int(sum(np.prod(w.shape) for w in layer.trainable_weights))
        for layer in model.layers
        if layer.trainable_weights
    }
    var_group = {id(w): layer.name for layer in model.layers for w in layer.trainable_weights}
    norms, zero_fracs, totals, nonfinite, acts, losses = [], [], [], [], [], []
    before = {id(w): np.array(w.numpy()) for w in model.trainable_weights}
    n = len(run.x)
    budget = MEASURE_STEPS
    for _ in range(run.epochs):
        for start in range(0, n, run.batch_size):
            budget -= 1
            if budget < 0:
                break
            xb = run.x[start : start + run.batch_size]
            yb = run.y[start : start + run.batch_size]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(yb, model(xb, training=True)))
            grads = tape.gradient(loss, model.trainable_weights)
            sq: dict[str, float] = {}
            zeros: dict[str, float] = {}
            bad = False
            for w, g in zip(model.trainable_weights, grads, strict=True):
                a = np.asarray(g, dtype=np.float64)
                fin = np.isfinite(a)
                bad = bad or not fin.all()
                grp = var_group[id(w)]
                sq[grp] = sq.get(grp, 0.0) + float((a[fin] ** 2).sum())
                zeros[grp] = zeros.get(grp, 0.0) + float((a == 0).sum())
            norms.append({k: math.sqrt(v) for k, v in sq.items()})
            zero_fracs.append({k: v / numels[k] for k, v in zeros.items()})
            totals.append(math.sqrt(sum(sq.values())) if not bad else math.nan)
            nonfinite.append(bad)
            record: dict[str, tuple[float, float, bool, str]] = {}
            if probe is not None:
                outs = probe(xb, training=True)
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                for (layer, kind), y in zip(sites, outs, strict=True):
                    y = np.asarray(y, dtype=np.float64)
                    if kind == "relu":
                        dead = float((y.reshape(-1, y.shape[-1]) <= 0).all(axis=0).mean())
                        tail = 0.0
                    else:
                        d = y * (1 - y) / 0.25 if kind == "sigmoid" else 1 - y * y
                        dead, tail = 0.0, float((d < 0.01).mean())
                    record[layer.name] = (dead, tail, layer is out_layer, kind)
            acts.append(record)
            losses.append(float(loss))
            opt.apply(grads, model.trainable_weights)
    update: dict[str, float] = {}
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        du = sum(
            float(np.nan_to_num(w.numpy() - before[id(w)]).astype(np.float64).__pow__(2).sum())
            for w in layer.trainable_weights
        )
        ww = sum(
            float((before[id(w)].astype(np.float64) ** 2).sum()) for w in layer.trainable_weights
        )
        update[layer.name] = math.sqrt(du) / max(math.sqrt(ww), 1e-12)
    return summarise(
        losses,
        norms,
        zero_fracs,
        {g: numels[g] for g in groups},
        totals,
        nonfinite,
        0,
        acts,
        update,
        scn.onset,
    )

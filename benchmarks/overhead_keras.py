"""Overhead of :class:`gradwatch.GradWatchCallback` on ``model.fit`` (TensorFlow backend).

A 12-layer, 512-wide ReLU MLP, batch 128, SGD. Each round runs one short ``fit``
without the callback (A) and one with it at its defaults (B), interleaved A B A B in
one process after warm-up, and times every training batch with a timing callback.
The ratio is that of the median over fits of each fit's mean step time. Target:
<= 1.05.

    KERAS_BACKEND=tensorflow python benchmarks/overhead_keras.py

The first fit of each kind traces the train function; its steps are warm-up and are
not counted. The callback forces a retrace at the start of every fit it joins, so
each fit's first batch is dropped from both arms alike. The callback samples every
step for the first ``dense_until=50`` steps of a fit, then every 8th: the steady
state (steps 50 on) and the dense start are reported separately.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import statistics
import time
from typing import Any

import keras
import numpy as np
from gradwatch.adapters.keras import GradWatchCallback

DEPTH = 12
WIDTH = 512
BATCH = 128


DENSE = 50  # GradWatchCallback's default dense_until


class _StepTimer(keras.callbacks.Callback):
    """Wall time of every training batch, split into the dense start and the steady
    state; the first batch of a fit (trace) is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.dense_times: list[float] = []
        self._t0 = 0.0
        self._batch = 0

    def on_train_begin(self, logs: Any = None) -> None:
        self._batch = 0
        self._fit_steady: list[float] = []
        self._fit_dense: list[float] = []

    def on_train_end(self, logs: Any = None) -> None:
        # One number per fit: the mean step, so a fit's sampled steps (1 in 8) count
        # at their share instead of being hidden by a median over single steps.
        if self._fit_steady:
            self.times.append(statistics.fmean(self._fit_steady))
        if self._fit_dense:
            self.dense_times.append(statistics.fmean(self._fit_dense))

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        elapsed = time.perf_counter() - self._t0
        if self._batch >= DENSE:
            self._fit_steady.append(elapsed)
        elif self._batch > 0:
            self._fit_dense.append(elapsed)
        self._batch += 1


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers: list[Any] = [keras.Input((WIDTH,))]
    layers += [
        keras.layers.Dense(WIDTH, activation="relu", kernel_initializer="he_normal")
        for _ in range(DEPTH - 1)
    ]
    layers.append(keras.layers.Dense(10))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def measure(rounds: int = 4, steps_per_fit: int = 200) -> list[tuple[str, float]]:
    """Rows ``(name, value)``: per-arm step times (ms; median over fits of each fit's
    mean step) and the overhead ratios."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps_per_fit, WIDTH)).astype("float32")
    y = rng.integers(0, 10, size=(BATCH * steps_per_fit,))
    model = _model()
    plain, watched = _StepTimer(), _StepTimer()
    cb = GradWatchCallback(verbose=0, on_finding="ignore")

    def fit(timer: _StepTimer, extra: list[Any]) -> None:
        model.fit(
            x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[*extra, timer]
        )

    # Warm-up: trace both variants once.
    fit(_StepTimer(), [])
    fit(_StepTimer(), [cb])
    for _ in range(rounds):
        fit(plain, [])
        fit(watched, [cb])
    a = statistics.median(plain.times)
    b = statistics.median(watched.times)
    a_dense = statistics.median(plain.dense_times)
    b_dense = statistics.median(watched.dense_times)
    return [
        ("fit without callback, median step (ms)", a * 1e3),
        ("fit with GradWatchCallback(), median step (ms)", b * 1e3),
        ("ratio (with / without), defaults, steps 50+", b / a),
        ("ratio (with / without), dense start, steps 1-49", b_dense / a_dense),
    ]


def main() -> None:
    rows = measure()
    print(
        f"Keras {keras.__version__}, backend {keras.backend.backend()}, "
        f"{DEPTH}x{WIDTH} ReLU MLP, batch {BATCH}, SGD"
    )
    print()
    print("| measurement | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()

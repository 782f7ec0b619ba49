"""Overhead of :class:`gradwatch.GradWatchCallback` on ``model.fit`` (TensorFlow backend).

A 12-layer, 512-wide ReLU MLP, batch 128, SGD, one TensorFlow thread (as the torch
benchmark: the machine's other core is shared and noisy). Each round runs one short
``fit`` without the callback (A) and one with it at its defaults (B), in the order
A B in even rounds and B A in odd ones, and times every training batch with a timing
callback. A round's ratio is B's mean step over A's; the result is the median of the
rounds' ratios (paired, so slow drifts of the machine cancel). Target: <= 1.05.

    KERAS_BACKEND=tensorflow python benchmarks/overhead_keras.py
    GRADWATCH_TF_THREADS=0 python benchmarks/overhead_keras.py   # TF's default threads

The first fit of each kind traces the train function and is warm-up. The callback
forces a retrace at the start of every fit it joins, so each fit's first batch is
dropped from both arms alike. The callback samples every step for the first
``dense_until=50`` steps of a fit, then every 8th: the steady state (steps 50 on) and
the dense start are reported separately.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import statistics
import time
from typing import Any

import tensorflow as tf

# One thread by default (GRADWATCH_TF_THREADS=0 keeps TensorFlow's own default).
THREADS = int(os.environ.get("GRADWATCH_TF_THREADS", "1"))
if THREADS:
    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from gradwatch.adapters.keras import GradWatchCallback  # noqa: E402

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


def measure(rounds: int = 12, steps_per_fit: int = 130) -> list[tuple[str, str]]:
    """Rows ``(name, value)``: per-arm step times (ms; median over fits of each fit's
    mean step) and the overhead ratios (median over rounds of the paired ratios)."""
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
    for r in range(rounds):
        if r % 2 == 0:
            fit(plain, [])
            fit(watched, [cb])
        else:
            fit(watched, [cb])
            fit(plain, [])
    ratios = [b / a for a, b in zip(plain.times, watched.times, strict=True)]
    dense = [b / a for a, b in zip(plain.dense_times, watched.dense_times, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return [
        ("fit without callback, median step (ms)", f"{statistics.median(plain.times) * 1e3:.2f}"),
        (
            "fit with GradWatchCallback(), median step (ms)",
            f"{statistics.median(watched.times) * 1e3:.2f}",
        ),
        (
            "ratio (with / without), defaults, steps 50+ (quartiles)",
            f"{statistics.median(ratios):.3f} ({q1:.3f}-{q3:.3f})",
        ),
        ("ratio (with / without), dense start, steps 1-49", f"{statistics.median(dense):.3f}"),
    ]


def main() -> None:
    rows = measure()
    print(
        f"Keras {keras.__version__}, backend {keras.backend.backend()}, "
        f"{DEPTH}x{WIDTH} ReLU MLP, batch {BATCH}, SGD, "
        f"{THREADS or 'default'} TensorFlow thread(s)"
    )
    print()
    print("| measurement | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()

"""Whole-``fit`` cost of :class:`gradwatch.GradWatchCallback` on the keras.io MNIST convnet.

The issue #16 target: "a keras.io MNIST convnet ``fit`` of 300 steps, setup and dense
start included, <= 1.05x". Each ``fit`` builds and compiles a fresh copy of the
keras.io "Simple MNIST convnet" (Conv2D 32, MaxPool, Conv2D 64, MaxPool, Flatten,
Dropout 0.5, Dense 10 softmax; Adam, categorical cross-entropy), then trains 300 steps
of batch 128 on generated 28x28x1 images (no download), and is timed from model
construction to the end of ``fit``: tracing, variable creation, the callback's setup
and its dense first steps are all inside. Three arms per round, the order rotating each
round: plain, plain again (the A/A control, this run's noise floor) and the callback at
its defaults. Ratios are per round against the first plain arm, then the median (and
quartiles) over rounds. One TensorFlow thread by default, as ``overhead_keras.py``.

``--model rnn`` times the same way a recurrent ``fit``: ``SimpleRNN(32)`` over 200 time
steps of 4 features, read at its last output, ``Dense(2)``, Adam, batch 32 (the task of
``benchmarks/scenarios/keras_recurrent.py``), where the callback also taps the layer's
input for the gradient through time.

    KERAS_BACKEND=tensorflow python benchmarks/keras_fit_cost.py [--rounds 6] [--steps 300]
        [--model mnist|rnn]
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

THREADS = int(os.environ.get("GRADWATCH_TF_THREADS", "1"))
BATCH = 128


def _set_threads() -> None:
    if THREADS and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(THREADS)


def mnist_convnet() -> keras.Model:
    """The keras.io "Simple MNIST convnet" example's model, compiled as there."""
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def _data(steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((BATCH * steps, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, BATCH * steps)
    return x, np.eye(10, dtype=np.float32)[labels]


def simple_rnn() -> keras.Model:
    """A many-to-one ``SimpleRNN(32)`` over 200 steps (benchmarks/scenarios/keras_recurrent.py)."""
    model = keras.Sequential(
        [keras.Input((RNN_LENGTH, 4)), keras.layers.SimpleRNN(32), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _rnn_data(steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((RNN_BATCH * steps, RNN_LENGTH, 4)).astype(np.float32)
    return x, (x[:, -20:, 0].sum(axis=1) > 0).astype(np.int32)


RNN_LENGTH, RNN_BATCH = 200, 32
# --model: the model builder, its data and its batch size.
MODELS: dict[str, tuple[Callable[[], keras.Model], Callable[[int], Any], int]] = {
    "mnist": (mnist_convnet, _data, BATCH),
    "rnn": (simple_rnn, _rnn_data, RNN_BATCH),
}


def _fit_arm(
    model_name: str, x: np.ndarray, y: np.ndarray, callbacks: Callable[[], list[Any]]
) -> float:
    build, _, batch = MODELS[model_name]
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    model = build()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False, callbacks=callbacks())
    return time.perf_counter() - start


def measure(rounds: int, steps: int, model_name: str = "mnist") -> dict[str, Any]:
    from gradwatch.adapters.keras import GradWatchCallback

    _, make_data, batch = MODELS[model_name]
    x, y = make_data(steps)
    arms: dict[str, Callable[[], list[Any]]] = {
        "plain": lambda: [],
        "plain again (A/A control)": lambda: [],
        "GradWatchCallback() defaults": lambda: [GradWatchCallback(verbose=0, on_finding="ignore")],
    }
    for make in arms.values():  # warm-up: imports, first traces, the C++ kernels' caches
        _fit_arm(model_name, x[: batch * 20], y[: batch * 20], make)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    order = list(arms.items())
    for r in range(rounds):
        for name, make in order[r % len(order) :] + order[: r % len(order)]:
            seconds[name].append(_fit_arm(model_name, x, y, make))
    base = seconds["plain"]
    rows = {}
    for name, values in seconds.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (1.0, 1.0, 1.0)
        rows[name] = (statistics.median(values), statistics.median(ratios), q1, q3)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", choices=sorted(MODELS), default="mnist")
    args = parser.parse_args(argv)
    _set_threads()
    load = os.getloadavg()[0]
    rows = measure(args.rounds, args.steps, args.model)
    what = "keras.io MNIST convnet" if args.model == "mnist" else "SimpleRNN(32) x 200 steps"
    print(
        f"Keras {keras.__version__}, backend {keras.backend.backend()}, {what}, "
        f"{args.steps} steps of batch {MODELS[args.model][2]}, whole fit (build, compile, trace, "
        f"train), {THREADS or 'default'} thread(s), {args.rounds} rounds; load "
        f"{load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print()
    print("| arm | median fit (s) | ratio | quartiles |")
    print("|---|---:|---:|---|")
    for name, (secs, ratio, q1, q3) in rows.items():
        print(f"| {name} | {secs:.2f} | {ratio:.3f} | {q1:.3f}-{q3:.3f} |")


if __name__ == "__main__":
    main()

"""Per-step cost of the Keras callback's through-time taps on a recurrent ``fit``.

The model of ``keras_fit_cost.py --model rnn``: ``SimpleRNN(32)`` over 200 time steps,
``Dense(2)``, Adam, batch 32, 300 steps. Each arm is one ``fit`` of a fresh model; its
figure is the median batch time over steps 60 to 300 (after the callback's dense start
of 50 sampled steps, so the sampling schedule's steady state), and the ratio is per
round against the plain arm, then the median over rounds. The arms, their order
rotating each round:

* plain: no callback;
* defaults: ``GradWatchCallback()``;
* defaults, taps off: the same with no recurrent layer found (no through-time taps);
* unsampled: no step sampled and no total norms (``sample_every`` past the run,
  ``dense_until=0``, ``norm_every=0``), taps on: what an unsampled step pays;
* unsampled, taps off.

    KERAS_BACKEND=tensorflow python benchmarks/keras_through_time_cost.py [--rounds 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import keras

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.keras_fit_cost import _rnn_data, _set_threads, simple_rnn

STEPS = 300
# Batch times before this step are left out: the dense start samples every step.
STEADY_FROM = 60
UNSAMPLED = {"sample_every": 10**6, "dense_until": 0, "norm_every": 0}
ARMS: dict[str, tuple[bool, dict[str, Any]] | None] = {
    "plain": None,
    "defaults": (True, {}),
    "defaults, taps off": (False, {}),
    "unsampled": (True, UNSAMPLED),
    "unsampled, taps off": (False, UNSAMPLED),
}


class _BatchTimes(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _callbacks(arm: tuple[bool, dict[str, Any]] | None) -> list[Any]:
    import gradwatch.adapters.keras.callback as callback_module
    from gradwatch.adapters.keras import GradWatchCallback
    from gradwatch.adapters.keras.recurrence import RecurrentLayers

    if arm is None:
        return []
    taps, kwargs = arm
    # "taps off": the callback finds no recurrent layer, so it installs no tap.
    callback_module.RecurrentLayers = (  # type: ignore[misc]
        RecurrentLayers if taps else (lambda model: RecurrentLayers(keras.Sequential()))
    )
    return [GradWatchCallback(verbose=0, on_finding="ignore", **kwargs)]


def measure(rounds: int) -> dict[str, tuple[float, float]]:
    x, y = _rnn_data(STEPS)
    ms: dict[str, list[float]] = {name: [] for name in ARMS}
    order = list(ARMS.items())
    for r in range(rounds):
        for name, arm in order[r % len(order) :] + order[: r % len(order)]:
            times = _BatchTimes()
            keras.utils.set_random_seed(0)
            model = simple_rnn()
            model.fit(
                x,
                y,
                batch_size=32,
                epochs=1,
                verbose=0,
                shuffle=False,
                callbacks=[times, *_callbacks(arm)],
            )
            ms[name].append(1000 * statistics.median(times.seconds[STEADY_FROM:]))
    base = ms["plain"]
    return {
        name: (
            statistics.median(values),
            statistics.median(v / b for v, b in zip(values, base, strict=True)),
        )
        for name, values in ms.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    _set_threads()
    load = os.getloadavg()[0]
    rows = measure(args.rounds)
    print(
        f"Keras {keras.__version__}, backend {keras.backend.backend()}, SimpleRNN(32) x 200 "
        f"steps, batch 32, median batch time of steps {STEADY_FROM}-{STEPS}, "
        f"{args.rounds} rounds; load {load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print()
    print("| arm | median batch (ms) | ratio |")
    print("|---|---:|---:|")
    for name, (batch_ms, ratio) in rows.items():
        print(f"| {name} | {batch_ms:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()

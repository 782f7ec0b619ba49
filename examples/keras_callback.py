"""Keras 3: one callback argument, and the report reads the real training gradients.

Trains a deep sigmoid MLP (torch-default-like small init) on the bundled 8x8 digits
with ``model.fit(..., callbacks=[gradwatch.GradWatchCallback()])``. The callback
reads the gradients of the very batches being trained on, inside the train step, and
prints its report after Keras' progress bar: here, ``vanishing_gradient``.

Run: ``KERAS_BACKEND=tensorflow python examples/keras_callback.py [--steps 200]``
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
from sklearn.datasets import load_digits

import gradwatch


def main(steps: int) -> gradwatch.Report:
    keras.utils.set_random_seed(0)
    x, y = load_digits(return_X_y=True)
    x = ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32)
    small = keras.initializers.RandomNormal(0.0, 0.1, seed=0)
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, activation="sigmoid", kernel_initializer=small) for _ in range(8)]
        + [keras.layers.Dense(10)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = gradwatch.GradWatchCallback()
    batch = 64
    epochs = max(1, steps // (len(x) // batch))
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[callback])
    assert callback.report is not None
    return callback.report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    report = main(parser.parse_args().steps)
    raise SystemExit(0 if report.by_rule("vanishing_gradient") else 1)

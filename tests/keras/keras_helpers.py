"""Helpers for the Keras callback tests: tiny models, data and a quiet fit."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")


def data(n: int = 512, features: int = 16, classes: int = 4, seed: int = 0) -> tuple[Any, Any]:
    """Standardised inputs and integer labels from a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


def compile_classifier(model: Any, optimizer: Any = None) -> Any:
    model.compile(
        optimizer=optimizer if optimizer is not None else keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def mlp(
    depth: int,
    width: int = 32,
    activation: str = "relu",
    features: int = 16,
    classes: int = 4,
    **dense_kwargs: Any,
) -> Any:
    layers: list[Any] = [keras.Input((features,))]
    layers += [
        keras.layers.Dense(width, activation=activation, **dense_kwargs) for _ in range(depth)
    ]
    layers.append(keras.layers.Dense(classes))
    return keras.Sequential(layers)


def fit(model: Any, callbacks: list[Any], epochs: int = 1, batch_size: int = 16, **kw: Any) -> Any:
    x, y = kw.pop("xy", None) or data()
    return model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
        **kw,
    )

"""Keras callback tests: one backend per process (KERAS_BACKEND), seeded runs."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

keras = pytest.importorskip("keras")


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(0)

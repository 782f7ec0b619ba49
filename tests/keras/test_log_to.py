"""`GradWatchCallback(log_to=...)`: every sampled step's numbers reach the sink, as the
fit's reference gradient norms say (issue #17)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import gradwatch  # noqa: E402


def test_a_callable_gets_every_sampled_step_with_its_norms():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="sgd", loss="mse")
    calls = []
    cb = gradwatch.GradWatchCallback(
        sample_every=1, verbose=0, log_to=lambda step, scalars: calls.append((step, scalars))
    )
    x, y = np.random.rand(64, 4), np.random.rand(64, 1)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    assert [step for step, _ in calls] == list(range(8))
    last = cb.last_step_stats
    name = last.grad_layers[0]
    assert calls[-1][1][f"grad_2.0_norm/{name}"] == pytest.approx(last.grad_norm[0])
    assert all("grad_norm" in scalars for _, scalars in calls)


def test_a_bad_log_to_is_an_error_naming_it_at_construction():
    with pytest.raises((TypeError, ValueError), match="log_to"):
        gradwatch.GradWatchCallback(log_to=5)

"""A fit that dies leaves nothing behind (issue #15): when another callback raises
mid-fit, Keras never calls on_train_end, and the model's next fit, evaluate or
predict without gradwatch still runs exactly as if gradwatch had never been there."""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
from gradwatch.adapters.keras.lifecycle import ENTRY_POINTS  # noqa: E402
from keras_helpers import compile_classifier, data, fit, mlp  # noqa: E402

from gradwatch import GradWatchCallback  # noqa: E402

GRADWATCH_ATTRIBUTES = {
    "call",
    "train_step",
    "apply",
    "stateless_apply",
    "compute_loss_and_updates",
    "save_own_variables",
    "load_own_variables",
    *ENTRY_POINTS,
}


class RaiseAtBatch(keras.callbacks.Callback):
    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise RuntimeError(f"user callback failed at batch {batch}")


def _models():
    """Two identical models: one to watch, one never watched."""
    watched = compile_classifier(mlp(depth=2, width=16), keras.optimizers.Adam(0.01))
    plain = compile_classifier(mlp(depth=2, width=16), keras.optimizers.Adam(0.01))
    plain.set_weights(watched.get_weights())
    return watched, plain


def _instance_overrides(model):
    """Every gradwatch wrapper left in an instance __dict__ of the model, its
    optimizer or a layer."""
    objects = [model, model.optimizer, *model._flatten_layers(include_self=False)]
    inner = getattr(model.optimizer, "inner_optimizer", None)
    if inner is not None:
        objects.append(inner)
    return [
        (type(o).__name__, name)
        for o in objects
        for name in sorted(GRADWATCH_ATTRIBUTES & set(vars(o)))
    ]


def _weights(model):
    return [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in model.weights]


def _kill_fit(model, callbacks):
    with pytest.raises(RuntimeError, match="user callback failed at batch 3"):
        fit(model, [*callbacks, RaiseAtBatch(3)])


def test_a_fit_killed_by_another_callback_leaves_no_patch_in_a_later_fit() -> None:
    watched, plain = _models()
    cb = GradWatchCallback(sample_every=1, verbose=0, on_finding="ignore")
    _kill_fit(watched, [cb])
    _kill_fit(plain, [])
    # Keras never called on_train_end: the patches are still there, guarded.
    assert _instance_overrides(watched)
    stale_train_function = watched.train_function
    counter = cb._probe.counter
    steps = int(keras.ops.convert_to_numpy(counter.value))
    assert steps == 4

    history_watched = fit(watched, [])  # a plain fit, without gradwatch
    history_plain = fit(plain, [])

    assert _instance_overrides(watched) == []
    # Retraced: the probe is no longer in the train function.
    assert watched.train_function is not stale_train_function
    assert int(keras.ops.convert_to_numpy(counter.value)) == steps
    np.testing.assert_allclose(
        history_watched.history["loss"], history_plain.history["loss"], rtol=1e-6
    )
    for a, b in zip(_weights(watched), _weights(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("entry_point", ["evaluate", "predict", "train_on_batch"])
def test_evaluate_or_predict_after_a_killed_fit_restores_first(entry_point) -> None:
    watched, plain = _models()
    cb = GradWatchCallback(sample_every=1, verbose=0, on_finding="ignore")
    _kill_fit(watched, [cb])
    _kill_fit(plain, [])
    x, y = data(n=64)
    results = []
    for model in (watched, plain):
        if entry_point == "evaluate":
            results.append(model.evaluate(x, y, verbose=0))
        elif entry_point == "predict":
            results.append(model.predict(x, verbose=0))
        else:
            results.append(model.train_on_batch(x[:16], y[:16]))
        assert _instance_overrides(model) == []
    np.testing.assert_allclose(np.asarray(results[0]), np.asarray(results[1]), rtol=1e-5, atol=1e-7)


def test_validation_inside_a_live_fit_keeps_monitoring() -> None:
    # Keras' own validation calls model.evaluate inside fit: the guard lets it through.
    model = compile_classifier(mlp(depth=1, width=8))
    x, y = data(n=64)
    cb = GradWatchCallback(sample_every=1, verbose=0, on_finding="ignore")
    model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.report.steps_observed == 8
    assert _instance_overrides(model) == []


def test_the_same_callback_in_the_next_fit_after_a_killed_one() -> None:
    watched, _ = _models()
    cb = GradWatchCallback(sample_every=1, verbose=0, on_finding="ignore")
    _kill_fit(watched, [cb])
    fit(watched, [cb])
    assert cb.report.steps_observed == 32
    assert cb.report.first_step == 0
    assert _instance_overrides(watched) == []

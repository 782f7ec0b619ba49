"""Each pathology on a real ``model.fit`` is reported by its rule; healthy nets are not."""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
from keras_helpers import compile_classifier, data, fit, mlp  # noqa: E402

from gradwatch import GradWatchCallback  # noqa: E402


def _cb() -> GradWatchCallback:
    return GradWatchCallback(sample_every=1, verbose=0, on_finding="ignore")


def _rules(report) -> set[str]:
    return {f.rule for f in report.findings}


def test_deep_sigmoid_mlp_reports_vanishing_gradient() -> None:
    model = compile_classifier(mlp(depth=12, width=32, activation="sigmoid"))
    cb = _cb()
    fit(model, [cb], epochs=2)
    finding = cb.report.by_rule("vanishing_gradient")
    assert finding is not None, cb.report.render()
    # The first layer is named by its Keras variable path.
    assert finding.layers[0] == model.layers[0].path
    assert finding.evidence["first_last_norm_ratio"] < 1e-3


def test_large_init_relu_mlp_reports_exploding_or_nonfinite_gradient() -> None:
    # stddev=1 on width 32 amplifies the signal ~4x per layer: logits ~1e5, and the
    # first SGD steps with such gradients blow the weights up.
    init = keras.initializers.RandomNormal(stddev=1.0)
    model = compile_classifier(mlp(depth=8, width=32, kernel_initializer=init))
    cb = _cb()
    fit(model, [cb])
    assert _rules(cb.report) & {"exploding_gradient", "nonfinite_gradient"}, cb.report.render()
    # The very first step already carried huge (real) gradients.
    assert cb.report.layers[0].max_norm > 1e3


def test_large_init_is_exploding_even_when_the_weights_do_not_move() -> None:
    # The same net with a learning rate so small the weights stay put: norms are huge
    # but flat across layers and steps, so only their size next to the weights shows.
    init = keras.initializers.RandomNormal(stddev=1.0, seed=0)
    model = compile_classifier(
        mlp(depth=8, width=32, kernel_initializer=init), keras.optimizers.SGD(1e-12)
    )
    cb = _cb()
    fit(model, [cb])
    finding = cb.report.by_rule("exploding_gradient")
    assert finding is not None, cb.report.render()
    assert finding.evidence["grad_to_weight_ratio"] > 100
    assert finding.fixes[0].id in {"he_init", "xavier_init"}


def test_huge_learning_rate_reports_nonfinite_gradient() -> None:
    model = compile_classifier(mlp(depth=4), keras.optimizers.SGD(1e4))
    cb = _cb()
    fit(model, [cb], xy=data(n=128))  # NaN arithmetic is slow on CPU: 8 steps suffice
    rules = _rules(cb.report)
    assert rules & {"nonfinite_gradient", "exploding_gradient"}, cb.report.render()
    assert cb.report.by_rule("nonfinite_gradient") is not None
    assert cb.report.by_rule("nonfinite_gradient").severity == "error"


def test_negative_bias_relu_reports_dead_relu() -> None:
    model = compile_classifier(
        mlp(depth=3, width=32, bias_initializer=keras.initializers.Constant(-5.0))
    )
    cb = _cb()
    fit(model, [cb])
    finding = cb.report.by_rule("dead_relu")
    assert finding is not None, cb.report.render()
    assert finding.evidence["dead_unit_fraction"] > 0.9
    assert set(finding.layers) <= {layer.path for layer in model.layers[:3]}


def test_large_init_sigmoid_reports_saturation() -> None:
    init = keras.initializers.RandomNormal(stddev=5.0)
    model = compile_classifier(
        mlp(depth=3, width=32, activation="sigmoid", kernel_initializer=init)
    )
    cb = _cb()
    fit(model, [cb])
    finding = cb.report.by_rule("saturation")
    assert finding is not None, cb.report.render()
    assert finding.evidence["tail_fraction"] > 0.5


def test_healthy_he_relu_mlp_with_batchnorm_is_healthy() -> None:
    layers = [keras.Input((16,))]
    for _ in range(6):
        layers += [
            keras.layers.Dense(64, kernel_initializer="he_normal"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    model = compile_classifier(keras.Sequential([*layers, keras.layers.Dense(4)]))
    cb = _cb()
    fit(model, [cb], epochs=2)
    assert cb.report.steps_observed == 64
    assert cb.report.healthy, cb.report.render()
    # The ReLU layers were observed (activations are covered, not silently skipped).
    assert cb.last_step_stats is not None
    assert len(cb.last_step_stats.act_layers) == 6
    assert set(cb.last_step_stats.act_kinds) == {"relu"}


def test_small_cnn_is_healthy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12, 12, 1)).astype("float32")
    y = (x[:, :6].mean(axis=(1, 2, 3)) > x[:, 6:].mean(axis=(1, 2, 3))).astype("int32")
    model = compile_classifier(
        keras.Sequential(
            [
                keras.Input((12, 12, 1)),
                keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer="he_normal"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer="he_normal"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(2, activation="softmax"),
            ]
        )
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    cb = _cb()
    fit(model, [cb], epochs=3, xy=(x, y))
    assert cb.report.healthy, cb.report.render()
    stats = cb.last_step_stats
    assert stats is not None
    # The softmax output layer is marked as output, so its confident predictions never
    # count as saturation.
    assert dict(zip(stats.act_layers, stats.act_is_output, strict=True))[model.layers[-1].path]


def test_lstm_is_healthy_and_notes_uncovered_recurrent_activations() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 10, 4)).astype("float32")
    y = (x[:, :, 0].sum(axis=1) > 0).astype("int32")
    model = compile_classifier(
        keras.Sequential([keras.Input((10, 4)), keras.layers.LSTM(16), keras.layers.Dense(2)]),
        keras.optimizers.Adam(1e-2),
    )
    cb = _cb()
    fit(model, [cb], epochs=2, xy=(x, y))
    assert cb.report.healthy, cb.report.render()
    assert any("lstm" in note for note in cb.report.notes), cb.report.notes

"""The gradient through time of Keras recurrent layers (issue #14): a plain SimpleRNN over
a long sequence reports ``vanishing_gradient`` with ``gated_recurrence`` first, the time
rows are the real dL/d(input) at the layer's first and last processed step (checked by
the backend's own autograd), gated and short layers stay quiet, a masked input is named
as not measured, and the taps change no output or gradient. Runs on whatever backend
``KERAS_BACKEND`` selects."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from keras import ops  # noqa: E402

import gradwatch  # noqa: E402

# Cheaper than the zoo's 200 steps (the torch backend runs the recurrence eagerly): a
# tanh SimpleRNN decays ~0.8x per step back here (measured), 0.8**119 = 3e-12.
LONG, SHORT, FEATURES, HIDDEN, BATCH = 120, 8, 4, 16, 32
# The rule's threshold (VanishingGradientRule.time_ratio_threshold), for the label checks.
THRESHOLD = 1e-5


def _sequences(length: int, batches: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The zoo's task: is the first feature summed over the last steps positive?"""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH * batches, length, FEATURES)).astype(np.float32)
    y = (x[:, -min(length, 20) :, 0].sum(axis=1) > 0).astype(np.int32)
    return x, y


def _model(layer: Any, length: int, lr: float = 3e-3, head: bool = True) -> Any:
    layers = [keras.Input((length, FEATURES)), layer]
    model = keras.Sequential([*layers, keras.layers.Dense(2)] if head else layers, name="seq")
    model.compile(
        optimizer=keras.optimizers.Adam(lr) if lr else keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit(model: Any, xy: tuple[np.ndarray, np.ndarray], callbacks: list[Any]) -> Any:
    x, y = xy
    return model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=callbacks
    )


def _watch(**kw: Any) -> Any:
    return gradwatch.GradWatchCallback(verbose=0, on_finding="ignore", **kw)


def _input_grad(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL/dx of one batch, by the backend's own autograd (no gradwatch)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = loss_fn(y, model(xt, training=True))
        return np.asarray(tape.gradient(loss, xt))
    if backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        loss = loss_fn(y, model(xt, training=True))
        return torch.autograd.grad(loss, xt)[0].detach().cpu().numpy()
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_of(xx: Any) -> Any:
        out, _ = model.stateless_call(trainable, non_trainable, xx, training=True)
        return loss_fn(y, out)

    return np.asarray(jax.grad(loss_of)(x))


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(a, np.float64) ** 2)))


def _by_rule(cb: Any) -> dict[str, Any]:
    return {f.rule: f for f in cb.report.findings}


def test_a_plain_rnn_over_a_long_sequence_reports_vanishing_through_time() -> None:
    model = _model(keras.layers.SimpleRNN(HIDDEN, name="rnn"), LONG)
    xy = _sequences(LONG, 30)
    # The label, without gradwatch: the first step's gradient is a tiny share of the last's.
    g = _input_grad(model, xy[0][:BATCH], xy[1][:BATCH])
    assert _rms(g[:, 0]) / _rms(g[:, -1]) < THRESHOLD
    cb = _watch()
    _fit(model, xy, [cb])
    found = _by_rule(cb)
    assert set(found) == {"vanishing_gradient"}, cb.report.findings
    finding = found["vanishing_gradient"]
    assert finding.layers == ("seq/rnn/simple_rnn_cell",)
    assert finding.fixes[0].id == "gated_recurrence"
    assert finding.evidence["through_time_ratio"] < THRESHOLD
    assert finding.evidence["time_steps"] == LONG
    # Keras spellings in a Keras report, not torch's.
    shown = finding.fixes[0].spelled(cb.report.framework).text
    assert "keras.layers.LSTM" in shown and "nn.LSTM" not in shown


@pytest.mark.parametrize("go_backwards", [False, True], ids=["forward", "go_backwards"])
def test_the_time_rows_are_the_input_gradient_at_the_first_and_last_processed_step(
    go_backwards: bool,
) -> None:
    # lr 0: every step sees the same weights, so the last sample is comparable exactly.
    model = _model(
        keras.layers.SimpleRNN(HIDDEN, go_backwards=go_backwards, name="rnn"), SHORT, lr=0.0
    )
    x, y = _sequences(SHORT, 3)
    cb = _watch(sample_every=1)
    _fit(model, (x, y), [cb])
    stats = cb.last_step_stats
    g = _input_grad(model, x[-BATCH:], y[-BATCH:])
    # go_backwards reads the last input step first: its "first" is the far end in time.
    first, last = (g[:, -1], g[:, 0]) if go_backwards else (g[:, 0], g[:, -1])
    assert stats.time_layers == ("seq/rnn/simple_rnn_cell",)
    assert stats.time_length == (SHORT,)
    np.testing.assert_allclose(stats.time_grad_first, [_rms(first)], rtol=1e-4)
    np.testing.assert_allclose(stats.time_grad_last, [_rms(last)], rtol=1e-4)


def test_each_half_of_a_bidirectional_layer_is_measured_under_its_own_name() -> None:
    model = _model(keras.layers.Bidirectional(keras.layers.SimpleRNN(HIDDEN), name="bi"), SHORT)
    cb = _watch(sample_every=1)
    _fit(model, _sequences(SHORT, 4), [cb])
    stats = cb.last_step_stats
    assert stats.time_layers == (
        "seq/bi/forward_simple_rnn/simple_rnn_cell",
        "seq/bi/backward_simple_rnn/simple_rnn_cell",
    )
    assert all(v > 0 for v in stats.time_grad_first + stats.time_grad_last)


def test_a_short_plain_rnn_and_a_long_lstm_stay_quiet_but_are_measured() -> None:
    for layer, length in ((keras.layers.SimpleRNN(HIDDEN), SHORT), (keras.layers.LSTM(8), 60)):
        model = _model(layer, length)
        cb = _watch()
        _fit(model, _sequences(length, 24), [cb])
        assert not cb.report.findings, (type(layer).__name__, cb.report.findings)
        assert cb.last_step_stats.time_length == (length,)
        # The LSTM is measured but never judged through time: its gates learn to forget.
        info = cb.analyzer._groups_info()[cb.last_step_stats.time_layers[0]]
        assert info.kind == type(layer).__name__ and info.recurrent


def test_a_masked_input_is_named_as_not_measured() -> None:
    tokens = keras.Input((SHORT,), dtype="int32")
    h = keras.layers.Embedding(20, FEATURES, mask_zero=True)(tokens)
    h = keras.layers.SimpleRNN(HIDDEN)(h)
    model = keras.Model(tokens, keras.layers.Dense(2)(h))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(BATCH * 3, SHORT)).astype(np.int32)
    y = (x[:, -1] > 9).astype(np.int32)
    cb = _watch(sample_every=1)
    _fit(model, (x, y), [cb])
    assert cb.last_step_stats.time_layers == ()
    assert any("is not measured: its input is masked" in n for n in cb.report.notes)


def _weights(model: Any) -> list[np.ndarray]:
    return [np.asarray(ops.convert_to_numpy(v.value)) for v in model.weights]


def test_outputs_and_gradients_are_bit_identical_and_the_layer_is_restored() -> None:
    watched = _model(keras.layers.SimpleRNN(HIDDEN), SHORT)
    plain = _model(keras.layers.SimpleRNN(HIDDEN), SHORT)
    plain.set_weights(watched.get_weights())
    xy = _sequences(SHORT, 6)
    history_watched = _fit(watched, xy, [_watch(sample_every=1)])
    history_plain = _fit(plain, xy, [])
    assert history_watched.history["loss"] == history_plain.history["loss"]
    for a, b in zip(_weights(watched), _weights(plain), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "call" not in vars(watched.layers[0])

"""The gradient through time of Keras recurrent layers (issue #14): a plain SimpleRNN over
a long sequence reports ``vanishing_gradient`` with ``gated_recurrence`` first, the time
rows are the real dL/d(initial state) and dL/d(last output) (checked by the backend's
own autograd), gated and short layers stay quiet, a masked input counts its real steps,
and the taps change no output or gradient. Runs on whatever backend ``KERAS_BACKEND``
selects."""

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
    return _grads(model, x, y, of_input=True)[0]


def _state_and_output_grads(model: Any, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """dL/d(initial state) and dL/d(the recurrent layer's output) of one batch, by the
    backend's own autograd (no gradwatch): the layers called in turn, with an explicit
    zero initial state and a zero added to the output."""
    return _grads(model, x, y, of_input=False)


def _grads(model: Any, x: np.ndarray, y: np.ndarray, of_input: bool) -> list[np.ndarray]:
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rnn, head = model.layers
    zeros = np.zeros((len(x), HIDDEN), np.float32)

    def loss_of(*wrt: Any) -> Any:
        if of_input:
            return loss_fn(y, model(wrt[0], training=True))
        h0, p = wrt
        return loss_fn(y, head(rnn(x, initial_state=h0, training=True) + p, training=True))

    start = [x] if of_input else [zeros, zeros]
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        wrt = [tf.constant(a) for a in start]
        with tf.GradientTape() as tape:
            tape.watch(wrt)
            loss = loss_of(*wrt)
        return [np.asarray(g) for g in tape.gradient(loss, wrt)]
    if backend == "torch":
        import torch

        wrt = [torch.tensor(a, requires_grad=True) for a in start]
        grads = torch.autograd.grad(loss_of(*wrt), wrt)
        return [g.detach().cpu().numpy() for g in grads]
    import jax

    argnums = tuple(range(len(start)))
    return [np.asarray(g) for g in jax.grad(loss_of, argnums=argnums)(*start)]


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
def test_the_time_rows_are_the_initial_state_and_last_output_gradients(
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
    # The output is the last processed step's, with go_backwards too.
    first, last = _state_and_output_grads(model, x[-BATCH:], y[-BATCH:])
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


def test_a_masked_input_counts_its_real_steps() -> None:
    tokens = keras.Input((LONG,), dtype="int32")
    h = keras.layers.Embedding(20, FEATURES, mask_zero=True)(tokens)
    h = keras.layers.SimpleRNN(HIDDEN)(h)
    model = keras.Model(tokens, keras.layers.Dense(2)(h))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(0)
    x = rng.integers(1, 20, size=(BATCH * 24, LONG)).astype(np.int32)
    x[:, : LONG - 10] = 0  # pre-padding: 10 real steps of LONG
    y = (x[:, -1] > 9).astype(np.int32)
    cb = _watch()
    _fit(model, (x, y), [cb])
    stats = cb.last_step_stats
    assert stats.time_length == (10,)
    # The state is carried through the padding: only the 10 real steps decay it.
    assert stats.time_grad_first[0] / stats.time_grad_last[0] > THRESHOLD
    assert "vanishing_gradient" not in _by_rule(cb)


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


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a nested tf.function")
def test_a_gradient_out_of_the_train_steps_reach_turns_only_through_time_off() -> None:
    import tensorflow as tf

    class NestedTape(keras.Model):
        """A custom train_step that differentiates inside a nested tf.function."""

        @tf.function
        def _loss_and_grads(self, x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            return loss, tape.gradient(loss, self.trainable_variables)

        def train_step(self, data: Any) -> Any:
            x, y = data
            loss, grads = self._loss_and_grads(x, y)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": loss}

    inputs = keras.Input((SHORT, FEATURES))
    model = NestedTape(inputs, keras.layers.Dense(2)(keras.layers.SimpleRNN(HIDDEN)(inputs)))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    cb = _watch(sample_every=1)
    _fit(model, _sequences(SHORT, 4), [cb])
    assert cb.enabled
    assert cb.last_step_stats.grad_layers  # the gradients are still watched
    assert cb.last_step_stats.time_layers == ()
    assert any("out of the train step's reach" in n for n in cb.report.notes), cb.report.notes

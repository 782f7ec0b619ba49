"""Activations computed with ``keras.ops`` inside custom layers, per-variable depth inside
one layer, the LayerInfo of Keras layers, and what the report says was not observed.

Runs on the backend ``KERAS_BACKEND`` selects (the keras-tf, keras-torch and keras-jax
tox envs). Every label is measured here first with the framework alone: gradient norms
by the backend's own autograd (``tf.GradientTape``, ``torch.autograd.grad``,
``jax.grad`` over ``model.stateless_call``), tail fractions by a numpy forward pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.keras.keras_helpers import compile_classifier, data, fit

keras = pytest.importorskip("keras")
ops = keras.ops

from gradwatch.adapters.keras.layers import layer_info  # noqa: E402

import gradwatch  # noqa: E402


class DenseStack(keras.layers.Layer):
    """``depth`` times ``act(x @ w_i + b_i)``, all in one layer's ``call``."""

    def __init__(
        self,
        depth: int,
        width: int,
        act: str = "sigmoid",
        init: Any = "glorot_uniform",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.depth, self.width, self.act, self.init = depth, width, act, init

    def build(self, shape: Any) -> None:
        fan_in = int(shape[-1])
        self.ws, self.bs = [], []
        for i in range(self.depth):
            self.ws.append(
                self.add_weight(shape=(fan_in, self.width), initializer=self.init, name=f"w{i}")
            )
            self.bs.append(self.add_weight(shape=(self.width,), initializer="zeros", name=f"b{i}"))
            fan_in = self.width

    def call(self, x: Any) -> Any:
        act = getattr(ops, self.act)
        for w, b in zip(self.ws, self.bs, strict=True):
            x = act(ops.matmul(x, w) + b)
        return x


def _stack_model(depth: int, width: int, act: str = "sigmoid", init: Any = "glorot_uniform"):
    return compile_classifier(
        keras.Sequential(
            [
                keras.Input((16,)),
                DenseStack(depth, width, act, init, name="stack"),
                keras.layers.Dense(4),
            ],
            name="net",
        )
    )


def _watch(**kw: Any) -> Any:
    return gradwatch.GradWatchCallback(sample_every=1, verbose=0, on_finding="ignore", **kw)


def _grad_norms(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Per-variable gradient L2 norms of one batch, by the backend's own autograd."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = [g.numpy() for g in tape.gradient(loss, [v.value for v in variables])]
    elif backend == "torch":
        import torch

        loss = loss_fn(y, model(x, training=True))
        raw = torch.autograd.grad(loss, [v.value for v in variables])
        grads = [g.detach().cpu().numpy() for g in raw]
    else:
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable: list[Any]) -> Any:
            out, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, out)

        grads = [np.asarray(g) for g in jax.grad(loss_of)([v.value for v in variables])]
    return {v.path: float(np.linalg.norm(g)) for v, g in zip(variables, grads, strict=True)}


def _numpy_tail_fractions(model: Any, x: np.ndarray) -> list[float]:
    """Per sigmoid of the stack, the fraction of outputs where s (1 - s) < 1% of its
    peak 1/4, from a numpy forward pass."""
    stack = model.get_layer("stack")
    h = x.astype(np.float64)
    fractions = []
    for w, b in zip(stack.ws, stack.bs, strict=True):
        z = h @ ops.convert_to_numpy(w.value) + ops.convert_to_numpy(b.value)
        h = 1.0 / (1.0 + np.exp(-z))
        fractions.append(float(np.mean(h * (1.0 - h) < 0.01 * 0.25)))
    return fractions


def _findings(cb: Any) -> dict[str, Any]:
    return {f.rule: f for f in cb.report.findings}


def test_a_custom_layer_sigmoid_stack_reports_vanishing_by_kernel() -> None:
    model = _stack_model(depth=16, width=32)
    x, y = data(n=512)
    norms = _grad_norms(model, x[:64], y[:64])
    first, last = norms["net/stack/w0"], norms["net/stack/w15"]
    assert first / last < 1e-6  # the label, measured without gradwatch

    cb = _watch()
    fit(model, [cb], epochs=2, xy=(x, y))

    vanishing = _findings(cb).get("vanishing_gradient")
    assert vanishing is not None, cb.report.findings
    # Judged per kernel of the one layer: its first kernels are named, each a group.
    assert "net/stack/w0" in vanishing.layers
    assert "net/stack/w15" not in vanishing.layers
    groups = [ls.name for ls in cb.report.layers]
    assert "net/stack/w0" in groups and "net/stack/b0" not in groups
    # The 16 sigmoids were seen as sites of the layer, so the report knows it is sigmoid.
    sites = cb.report.coverage.activation_sites
    assert sites == {"sigmoid": 16}
    assert cb.last_step_stats.act_layers[0] == "net/stack#sigmoid:0"


def test_a_custom_layer_sigmoid_stack_at_unit_normal_init_reports_saturation() -> None:
    model = _stack_model(depth=8, width=512, init=keras.initializers.RandomNormal(0.0, 1.0))
    x, y = data(n=512)
    tails = _numpy_tail_fractions(model, x[:64])
    assert np.median(tails[1:]) > 0.5  # the label: most hidden sigmoids in their tails

    cb = _watch()
    fit(model, [cb], epochs=2, xy=(x, y))

    saturation = _findings(cb).get("saturation")
    assert saturation is not None, cb.report.findings
    assert all("#sigmoid:" in name for name in saturation.layers)
    # The layers whose measured tail fraction is clearly above the rule's 0.5 are named.
    clearly = [i for i, t in enumerate(tails) if t > 0.6]
    assert clearly
    for i in clearly:
        assert f"net/stack#sigmoid:{i}" in saturation.layers


def test_a_healthy_custom_layer_stays_quiet() -> None:
    model = _stack_model(depth=2, width=32, act="relu", init="he_normal")
    cb = _watch()
    fit(model, [cb], epochs=2)
    assert cb.report.findings == ()
    assert cb.report.healthy
    assert cb.report.coverage.activation_sites == {"relu": 2}


class Inner(keras.layers.Layer):
    def call(self, x: Any) -> Any:
        return keras.activations.gelu(x)


class Block(keras.layers.Layer):
    """A Dense with its own activation (already watched), an inner custom layer, and
    two functional activations of its own."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(16, activation="relu", name="dense")
        self.inner = Inner(name="inner")

    def call(self, x: Any) -> Any:
        h = self.inner(self.dense(x))
        return ops.tanh(h) + keras.activations.relu(h)


def test_sites_are_named_by_the_innermost_layer_and_not_counted_twice() -> None:
    inputs = keras.Input((16,))
    h = Block(name="block")(inputs)
    h = keras.layers.Reshape((4, 4))(h)
    h = keras.layers.LSTM(8, name="lstm")(h)
    outputs = keras.layers.Dense(4)(h)
    model = compile_classifier(keras.Model(inputs, outputs))
    cb = _watch()
    fit(model, [cb], xy=data(n=64))

    stats = cb.last_step_stats
    kinds = dict(zip(stats.act_layers, stats.act_kinds, strict=True))
    assert kinds == {
        "block/dense": "relu",  # the Dense's own activation=: its layer row, once
        "block/inner#gelu:0": "gelu",
        "block#tanh:0": "tanh",
        "block#relu:0": "relu",
    }
    # The LSTM's activations run in the backend's recurrent loop: said, not judged.
    coverage = cb.report.coverage
    assert "lstm" in coverage.activation_modules_not_observed
    assert any("lstm" in note and "recurrent" in note for note in cb.report.notes)


def test_backend_functions_are_restored_after_the_step_even_when_it_raises() -> None:
    from keras.src import backend

    before = (backend.nn.sigmoid, backend.numpy.tanh, backend.nn.gelu)

    class Boom(DenseStack):
        def call(self, x: Any) -> Any:
            if backend.nn.sigmoid is not before[0]:  # inside the (traced) train step
                raise ValueError("boom in the train step")
            return super().call(x)  # building, and the torch trainer's symbolic pass

    model = compile_classifier(
        keras.Sequential([keras.Input((16,)), Boom(2, 8, name="stack"), keras.layers.Dense(4)])
    )
    with pytest.raises(ValueError, match="boom in the train step"):
        fit(model, [_watch(strict=True)], xy=data(n=32))
    assert (backend.nn.sigmoid, backend.numpy.tanh, backend.nn.gelu) == before

    # Never during evaluate or predict.
    model = _stack_model(depth=2, width=8)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_predict_batch_begin(self, batch: int, logs: Any = None) -> None:
            seen.append(backend.nn.sigmoid is before[0])

        def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
            seen.append(backend.nn.sigmoid is before[0])

    x, y = data(n=64)
    cb = _watch()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb], validation_data=(x, y))
    model.predict(x, verbose=0, callbacks=[Spy()])
    model.evaluate(x, y, verbose=0, callbacks=[Spy()])
    assert seen and all(seen)
    assert backend.nn.sigmoid is before[0]


def _weights(model: Any) -> list[np.ndarray]:
    return [np.asarray(ops.convert_to_numpy(v.value)) for v in model.weights]


def test_outputs_and_gradients_are_bit_identical_with_and_without_the_callback() -> None:
    watched = _stack_model(depth=6, width=16, act="tanh")
    plain = _stack_model(depth=6, width=16, act="tanh")
    plain.set_weights(watched.get_weights())
    x, y = data(n=128)
    norms = list(_grad_norms(watched, x[:32], y[:32]).values())
    assert norms == list(_grad_norms(plain, x[:32], y[:32]).values())

    history_watched = fit(watched, [_watch()], xy=(x, y))
    history_plain = fit(plain, [], xy=(x, y))

    # Every step's update is the gradient's: equal weights after 8 SGD steps mean equal
    # gradients at each of them; the losses are the model's outputs.
    assert history_watched.history["loss"] == history_plain.history["loss"]
    for a, b in zip(_weights(watched), _weights(plain), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(watched.predict(x, verbose=0), plain.predict(x, verbose=0))


def test_layer_info_of_keras_layers() -> None:
    inputs = keras.Input((6, 8))
    h = keras.layers.Bidirectional(keras.layers.LSTM(4, name="lstm"), name="bi")(inputs)
    h = keras.layers.Dense(12, name="fc1")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="act")(h)
    h = keras.layers.Dense(10, activation="tanh", name="fc2")(h)
    h = DenseStack(3, 5, name="stack")(h)
    outputs = keras.layers.Dense(2, name="out")(h)
    model = keras.Model(inputs, outputs)
    info = layer_info(model)
    assert set(info) == {v.path for v in model.trainable_variables}

    lstm = info["bi/forward_lstm/lstm_cell/kernel"]
    assert lstm.recurrent and lstm.kind == "LSTM" and lstm.fan_in == 8 and lstm.group is None
    assert info["bi/forward_lstm/lstm_cell/recurrent_kernel"].fan_in == 4
    # Through BatchNormalization to the ReLU layer; a Dense's own activation.
    assert info["fc1/kernel"].feeds == "relu" and info["fc1/kernel"].fan_in == 8
    assert info["fc1/bias"].fan_in is None
    assert info["fc2/kernel"].feeds == "tanh" and info["fc2/kernel"].kind == "Dense"
    assert info["out/kernel"].feeds is None and not info["out/kernel"].recurrent
    # A stack of kernels in one layer: a group per kernel, each bias with its kernel.
    assert [info[f"stack/w{i}"].group for i in range(3)] == [f"stack/w{i}" for i in range(3)]
    assert [info[f"stack/b{i}"].group for i in range(3)] == [f"stack/w{i}" for i in range(3)]
    assert info["stack/w1"].fan_in == 5 and info["stack/w1"].kind == "DenseStack"
    assert info["fc1/kernel"].group is None
    # What a custom layer feeds is what its keras.ops sites were seen to be, if one kind.
    assert info["stack/w0"].feeds is None
    seen = layer_info(model, {"stack#sigmoid:0": "sigmoid", "stack#sigmoid:1": "sigmoid"})
    assert seen["stack/w0"].feeds == seen["stack/b2"].feeds == "sigmoid"
    mixed = layer_info(model, {"stack#sigmoid:0": "sigmoid", "stack#relu:0": "relu"})
    assert mixed["stack/w0"].feeds is None

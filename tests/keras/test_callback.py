"""The callback's contract: real gradients, lifecycle, model kinds, on_finding, errors."""

from __future__ import annotations

import math
import warnings

import pytest

keras = pytest.importorskip("keras")

import gradwatch.adapters.keras.probe as gw_probe  # noqa: E402
import numpy as np  # noqa: E402
from gradwatch.adapters.keras.callback import RingReader  # noqa: E402
from keras_helpers import compile_classifier, data, fit, mlp  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import FindingError, GradWatchCallback, GradwatchWarning  # noqa: E402
from gradwatch.activations import nonfinite_entries  # noqa: E402

BACKEND = keras.backend.backend()


def _cb(**kw):
    kw.setdefault("sample_every", 1)
    kw.setdefault("verbose", 0)
    kw.setdefault("on_finding", "ignore")
    return GradWatchCallback(**kw)


def _small_model():
    return compile_classifier(
        keras.Sequential(
            [keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(4)]
        ),
        keras.optimizers.SGD(0.1),
    )


def _reference_grads(model, x, y):
    """Gradients of the same loss on the same batch, by the backend's own autodiff."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    if BACKEND == "jax":
        import jax

        def loss_of(trainable):
            non_trainable = [v.value for v in model.non_trainable_variables]
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, y_pred)

        grads = jax.grad(loss_of)([v.value for v in model.trainable_variables])
        return [np.asarray(g) for g in grads]
    import torch

    for v in model.trainable_variables:
        v.value.grad = None
    loss = loss_fn(torch.as_tensor(y), model(torch.as_tensor(x), training=True))
    loss.backward()
    return [v.value.grad.detach().cpu().numpy() for v in model.trainable_variables]


def _stats(g):
    g = np.asarray(g, dtype=np.float64).ravel()
    return (np.sqrt((g * g).sum()), np.abs(g).max(), np.abs(g).mean(), np.mean(g == 0.0))


# --- the gradients are the real training signal ----------------------------------------


def test_reads_the_gradients_the_optimizer_applies() -> None:
    x, y = data(n=32)
    model = _small_model()
    before = [keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables]
    reference = _reference_grads(model, x, y)
    cb = _cb()
    fit(model, [cb], batch_size=32, xy=(x, y))  # exactly one step on exactly this batch
    after = [keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables]
    stats = cb.last_step_stats
    assert stats is not None and stats.step == 0
    assert stats.grad_layers == tuple(v.path for v in model.trainable_variables)
    for i, (b, a, ref) in enumerate(zip(before, after, reference, strict=True)):
        applied = (b - a) / 0.1  # plain SGD: w <- w - lr * g
        seen = (
            stats.grad_norm[i],
            stats.grad_max_abs[i],
            stats.grad_mean_abs[i],
            stats.grad_zero_frac[i],
        )
        np.testing.assert_allclose(seen[:3], _stats(applied)[:3], rtol=1e-3)
        np.testing.assert_allclose(seen, _stats(ref), rtol=1e-4, atol=1e-7)
        assert stats.grad_numel[i] == ref.size
        assert stats.grad_nonfinite[i] == 0
        # The weights the step started from (the first samples always have them).
        np.testing.assert_allclose(stats.param_norm[i], np.linalg.norm(b), rtol=1e-5)


def test_relu_activation_statistics_match_the_batch() -> None:
    x, y = data(n=32)
    model = _small_model()
    hidden = keras.Model(model.inputs, model.layers[0].output)
    h = hidden.predict(x, verbose=0)  # weights before the single step = those of the forward pass
    cb = _cb()
    fit(model, [cb], batch_size=32, xy=(x, y))
    stats = cb.last_step_stats
    assert stats.act_layers == (model.layers[0].path,)
    assert stats.act_kinds == ("relu",)
    assert stats.act_is_output == (False,)
    np.testing.assert_allclose(stats.act_inactive_frac[0], np.mean(h <= 0), atol=1e-6)
    np.testing.assert_allclose(stats.act_dead_frac[0], np.mean((h <= 0).all(axis=0)), atol=1e-6)
    assert stats.act_tail_frac[0] == 0.0


def test_an_exponential_layer_is_watched_and_counts_its_overflow() -> None:
    # Biases 100 and 89 overflow exp in float32 (> 3.4e38 from 88.73), 88 does not; the
    # weights are zero so every sample overflows the same units.
    x, y = data(n=32)
    bias = np.array([100.0, 0.0, 88.0, 89.0], "float32")
    dense = keras.layers.Dense(
        4,
        activation="exponential",
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant(bias),
    )
    model = compile_classifier(
        keras.Sequential([keras.Input((16,)), dense, keras.layers.Dense(4)]),
        keras.optimizers.SGD(0.1),
    )
    cb = _cb()
    fit(model, [cb], batch_size=32, xy=(x, y))
    stats = cb.last_step_stats
    assert stats.act_layers == (dense.path,)
    assert stats.act_kinds == ("exp",)
    with np.errstate(over="ignore"):
        want = nonfinite_entries(np.exp(np.tile(bias, (32, 1))))
    assert stats.act_nonfinite == (want,) == (2 * 32,)
    assert stats.act_inactive_frac[0] == 0.0  # over the finite entries: exp is never <= 0
    finding = next(f for f in cb.report.findings if f.rule == "nonfinite_gradient")
    assert finding.fixes[0].id == "stable_activation"
    assert f"{dense.path} (exp)" in finding.message


def test_loss_scale_optimizer_reports_unscaled_gradients() -> None:
    x, y = data(n=32)
    plain = _small_model()
    weights = plain.get_weights()
    reference = _reference_grads(plain, x, y)
    model = _small_model()
    model.set_weights(weights)
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**10)
    compile_classifier(model, opt)
    cb = _cb()
    fit(model, [cb], batch_size=32, xy=(x, y))
    stats = cb.last_step_stats
    assert not stats.skipped_step
    expected = [_stats(g)[0] for g in reference]
    np.testing.assert_allclose(stats.grad_norm, expected, rtol=1e-4)
    assert "apply" not in vars(opt) and "apply" not in vars(opt.inner_optimizer)


def test_sample_every_reads_every_nth_real_step() -> None:
    model = _small_model()
    seen = []
    # norm_every=0: the samples alone (the steps between them are test_between_samples')
    cb = _cb(sample_every=4, flush_every=3, dense_until=0, norm_every=0)
    cb_steps = _StepRecorder(cb, seen)
    fit(model, [cb, cb_steps])  # 512 / 16 = 32 steps
    assert cb.report.steps_observed == 8
    assert (cb.report.first_step, cb.report.last_step) == (0, 28)
    assert seen == list(range(0, 32, 4))


def test_dense_start_reads_every_step_then_every_nth() -> None:
    model = _small_model()
    cb = _cb(sample_every=4, flush_every=5, dense_until=10, norm_every=0)
    fit(model, [cb])  # 32 steps: 0..9, then 12, 16, ..., 28
    assert cb.report.steps_observed == 10 + 5
    assert cb.report.last_step == 28
    assert not [n for n in cb.report.notes if "overwritten" in n]


class _StepRecorder(keras.callbacks.Callback):
    """Records the steps of the StepStats the watched callback has read so far."""

    def __init__(self, watched, out):
        super().__init__()
        self.watched, self.out = watched, out

    def on_train_batch_end(self, batch, logs=None):
        s = self.watched.last_step_stats
        if s is not None and (not self.out or self.out[-1] != s.step):
            self.out.append(s.step)

    def on_train_end(self, logs=None):
        self.on_train_batch_end(0)


# --- lifecycle ------------------------------------------------------------------------------


def _patched(model):
    objs = [model, model.optimizer, *model._flatten_layers(include_self=False)]
    return [
        (type(o).__name__, n) for o in objs for n in ("apply", "call", "train_step") if n in vars(o)
    ]


def _optimizer_state(model):
    return [id(v) for v in model.optimizer.variables]


def test_everything_is_restored_after_fit_and_a_later_fit_runs_unwatched() -> None:
    model = _small_model()
    model.optimizer.build(model.trainable_variables)
    state = _optimizer_state(model)
    cb = _cb()
    fit(model, [cb])
    assert _patched(model) == []
    assert _optimizer_state(model) == state
    probe = cb._probe
    assert int(keras.ops.convert_to_numpy(probe.counter.value)) == 32
    fit(model, [])  # runs the original graph: the old probe is never written again
    assert int(keras.ops.convert_to_numpy(probe.counter.value)) == 32


def test_reusable_across_fits_with_fresh_state() -> None:
    cb = _cb()
    _fit_doomed(_doomed(), [cb])
    assert cb.report.by_rule("nonfinite_gradient") is not None
    first = cb.report
    model2 = _small_model()
    model2.fit(*data(n=64), batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    assert cb.report is not first
    assert cb.report.steps_observed == 8
    assert cb.report.findings == ()
    # The same model again: the train function traced in the first fit is rebuilt.
    fit(model2, [cb])
    assert cb.report.steps_observed == 32


def test_functional_model_names_and_output_activation() -> None:
    inputs = keras.Input((16,))
    h = keras.layers.Dense(8, name="hidden")(inputs)
    h = keras.layers.LeakyReLU(negative_slope=0.1, name="leaky")(h)
    h2 = keras.layers.Dense(8, activation="tanh", name="branch")(inputs)
    merged = keras.layers.Concatenate()([h, h2])
    out = keras.layers.Dense(1, activation="sigmoid", name="out")(merged)
    model = keras.Model(inputs, out)
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    x, y = data(n=64)
    cb = _cb()
    model.fit(x, (y > 1).astype("float32"), batch_size=16, verbose=0, callbacks=[cb])
    s = cb.last_step_stats
    assert s.grad_layers == tuple(v.path for v in model.trainable_variables)
    kinds = dict(zip(s.act_layers, s.act_kinds, strict=True))
    assert kinds == {"leaky": "leaky_relu", "branch": "tanh", "out": "sigmoid"}
    assert dict(zip(s.act_layers, s.act_is_output, strict=True)) == {
        "leaky": False,
        "branch": False,
        "out": True,
    }


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.block = keras.Sequential([keras.layers.Dense(8), keras.layers.Activation("tanh")])
        self.head = keras.layers.Dense(4, activation="softmax")

    def call(self, x):
        return self.head(self.block(self.hidden(x)))


def test_subclassed_model_with_nested_layers() -> None:
    model = SubclassedNet()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    cb = _cb()
    fit(model, [cb])
    assert cb.report.steps_observed == 32
    s = cb.last_step_stats
    assert s.grad_layers == tuple(v.path for v in model.trainable_variables)
    assert s.act_kinds == ("relu", "tanh", "softmax")
    # No Functional graph to ask: the output is found by identity inside the train step.
    assert s.act_is_output == (False, False, True)
    assert _patched(model) == []


def test_checkpoint_saved_during_fit_holds_no_gradwatch_state(tmp_path) -> None:
    model = compile_classifier(mlp(depth=1, width=8), keras.optimizers.Adam(0.01))
    path = tmp_path / "model.keras"
    checkpoint = keras.callbacks.ModelCheckpoint(str(path), save_freq=5)
    fit(model, [_cb(), checkpoint], xy=data(n=128))
    with warnings.catch_warnings():
        # Keras warns (and skips the optimizer) when the saved variable count differs.
        warnings.filterwarnings("error", message=".*Skipping variable loading")
        loaded = keras.models.load_model(path)
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    assert not any("gradwatch" in v.path for v in loaded.optimizer.variables)


def test_validation_during_fit() -> None:
    model = _small_model()
    x, y = data(n=128)
    cb = _cb(sample_every=2, dense_until=0, norm_every=0)
    history = model.fit(
        x, y, validation_data=(x, y), epochs=3, batch_size=16, verbose=0, callbacks=[cb]
    )
    assert len(history.history["val_loss"]) == 3
    assert cb.report.steps_observed == 12  # 24 training steps, every 2nd


class OwnTrainStep(keras.Sequential):
    def train_step(self, *args, **kwargs):
        return super().train_step(*args, **kwargs)


def test_model_with_its_own_train_step() -> None:
    model = compile_classifier(
        OwnTrainStep(
            [keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(4)]
        )
    )
    cb = _cb()
    fit(model, [cb], xy=data(n=64))
    assert cb.report.steps_observed == 4
    assert cb.last_step_stats.grad_layers == tuple(v.path for v in model.trainable_variables)
    if BACKEND == "jax":
        # JAX reads activations inside Keras' own train_step only: said, not guessed.
        assert cb.last_step_stats.act_layers == ()
        assert any("overrides" in note for note in cb.report.notes)
    else:
        assert cb.last_step_stats.act_layers == (model.layers[0].path,)


_COMPILE_OPTIONS = {
    # torch rejects steps_per_execution > 1, and its jit_compile is torch.compile.
    "tensorflow": [{"steps_per_execution": 5}, {"jit_compile": True}],
    "jax": [{"steps_per_execution": 5}, {"jit_compile": False}, {"run_eagerly": True}],
}


@pytest.mark.skipif(BACKEND not in _COMPILE_OPTIONS, reason="no such options on this backend")
@pytest.mark.parametrize("kw", _COMPILE_OPTIONS.get(BACKEND, [{}]))
def test_compile_options(kw) -> None:
    x, y = data(n=32)
    model = _small_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kw,
    )
    cb = _cb(flush_every=2)
    seen = []
    fit(model, [cb, _StepRecorder(cb, seen)], epochs=8, xy=(x, y))  # 16 steps
    assert cb.report.steps_observed == 16
    assert (cb.report.first_step, cb.report.last_step) == (0, 15)
    assert seen[-1] == 15
    assert _patched(model) == []


# --- on_finding ------------------------------------------------------------------------------


def _doomed():
    return compile_classifier(mlp(depth=4), keras.optimizers.SGD(1e4))


def _fit_doomed(model, callbacks, epochs=1):
    # 8 steps: NaN arithmetic is slow on CPU and the finding opens by step 3.
    return fit(model, callbacks, epochs=epochs, xy=data(n=128))


def test_on_finding_warn() -> None:
    with pytest.warns(GradwatchWarning, match="nonfinite_gradient"):
        _fit_doomed(_doomed(), [_cb(on_finding="warn")])


def test_on_finding_ignore_is_silent_but_reports() -> None:
    cb = _cb(on_finding="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        _fit_doomed(_doomed(), [cb])
    assert cb.report.by_rule("nonfinite_gradient") is not None
    # A gradient with NaN/Inf entries has no meaningful zero fraction: unknown.
    stats = cb.last_step_stats
    bad = [i for i, n in enumerate(stats.grad_nonfinite) if n > 0]
    assert bad
    assert all(math.isnan(stats.grad_zero_frac[i]) for i in bad)


def test_on_finding_stop_ends_training_early() -> None:
    cb = _cb(on_finding="stop", flush_every=1)
    model = _doomed()
    with pytest.warns(GradwatchWarning, match="Stopping"):
        history = _fit_doomed(model, [cb], epochs=3)
    assert model.stop_training
    assert len(history.history["loss"]) == 1
    assert cb.report.last_step < 7
    assert _patched(model) == []


def test_on_finding_raise_raises_finding_error_and_restores() -> None:
    cb = _cb(on_finding="raise", flush_every=1)
    model = _doomed()
    model.optimizer.build(model.trainable_variables)
    state = _optimizer_state(model)
    with pytest.raises(FindingError) as info:
        _fit_doomed(model, [cb], epochs=3)
    assert info.value.finding.rule == "nonfinite_gradient"
    assert _patched(model) == []
    assert _optimizer_state(model) == state
    # Restored mid-epoch, the optimizer trains a later fit as before.
    assert len(_fit_doomed(model, []).history["loss"]) == 1


def test_on_finding_callable_receives_findings() -> None:
    got = []
    _fit_doomed(_doomed(), [_cb(on_finding=got.append)])
    assert [f.rule for f in got] == ["nonfinite_gradient"]


# --- errors never kill fit ------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_internal_error_in_the_train_step_does_not_kill_fit(monkeypatch) -> None:
    monkeypatch.setattr(gw_probe, "_grad_row", _boom)
    model = _small_model()
    cb = _cb()
    with pytest.warns(GradwatchWarning, match="boom"):
        history = fit(model, [cb], epochs=2)
    assert len(history.history["loss"]) == 2
    assert not cb.enabled
    assert any("boom" in note for note in cb.report.notes)
    assert _patched(model) == []


def test_internal_error_on_the_host_does_not_kill_fit(monkeypatch) -> None:
    monkeypatch.setattr(RingReader, "_step_stats", _boom)
    cb = _cb()
    with pytest.warns(GradwatchWarning, match="boom"):
        history = fit(_small_model(), [cb])
    assert len(history.history["loss"]) == 1
    assert any("boom" in note for note in cb.report.notes)


def test_strict_reraises_internal_errors(monkeypatch) -> None:
    monkeypatch.setattr(gw_probe, "_grad_row", _boom)
    model = _small_model()
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, [_cb(strict=True)])


# --- configuration and output ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"flush_every": 0}, "flush_every"),
        ({"sample_every": 0}, "sample_every"),
        ({"sample_every": 1.5}, "sample_every"),
        ({"window": 0}, "window"),
        ({"on_finding": "explode"}, "on_finding"),
        ({"verbose": 2}, "verbose"),
        ({"activations": "yes"}, "activations"),
        ({"tail_derivative_fraction": 1.0}, "tail_derivative_fraction"),
        ({"strict": 1}, "strict"),
        ({"window": 4}, "window"),  # smaller than a rule's window: the Analyzer says so
    ],
)
def test_bad_configuration_raises_value_error_naming_the_parameter(kw, name) -> None:
    with pytest.raises(ValueError, match=name):
        GradWatchCallback(**kw)


def test_lazy_reexport_and_report_printed_at_train_end(capsys) -> None:
    assert gradwatch.GradWatchCallback is GradWatchCallback
    cb = GradWatchCallback(sample_every=1)
    fit(_small_model(), [cb])
    out = capsys.readouterr().out
    assert cb.report is not None
    assert "gradwatch" in out
    assert out.rstrip().endswith(cb.report.render(width=80).rstrip().splitlines()[-1].rstrip())


def test_loss_scale_overflow_counts_skipped_steps_not_nan_gradients() -> None:
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    # A loss of ~1e6 times the largest float32 power of two overflows: the scaler skips
    # those steps and halves its scale each time (~20 times before the loss fits).
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1e-9), initial_scale=2.0**127)
    model.compile(optimizer=opt, loss="mse")
    x, _ = data(n=256)
    y = np.full((256, 1), 1e3, "float32")
    cb = _cb()
    fit(model, [cb], xy=(x, y))  # 16 steps
    finding = cb.report.by_rule("nonfinite_gradient")
    assert finding is not None, cb.report.render()
    assert finding.evidence["skipped_steps_in_window"] >= 8
    assert finding.evidence["nonfinite_entries"] == 0
    # Exactly the steps the scaler skipped: it halved its scale once per skip.
    halvings = 127 - np.log2(float(keras.ops.convert_to_numpy(opt.dynamic_scale.value)))
    assert finding.evidence["skipped_steps_in_window"] == halvings
    assert all(layer.nonfinite == 0 for layer in cb.report.layers)

"""Real Keras training stacks (issue #12): a keras.io Transformer block on a tf.data
pipeline with a partial last batch and ragged lengths, the keras.io GAN with its own
optimizers, and setups that cannot be watched saying so instead of "healthy"."""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402
from keras_helpers import compile_classifier, data, fit, mlp  # noqa: E402

from gradwatch import GradWatchCallback  # noqa: E402

BACKEND = keras.backend.backend()


def _cb(**kw):
    kw.setdefault("sample_every", 1)
    kw.setdefault("verbose", 0)
    kw.setdefault("on_finding", "ignore")
    return GradWatchCallback(**kw)


def _watched_to_the_end(cb, steps):
    report = cb.report
    assert cb.enabled, report.notes
    assert report.stopped_at is None, report.notes
    assert not any("internal error" in n or "Nothing monitored" in n for n in report.notes)
    assert report.steps_observed == steps, report.notes


# --- a keras.io Transformer block on tf.data ---------------------------------------------


class TransformerBlock(layers.Layer):
    """keras.io "Text classification with Transformer", dropout off for a reference."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.0):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)]
        )
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.dropout1(self.att(inputs, inputs))
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.dropout2(self.ffn(out1))
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        positions = self.pos_emb(ops.arange(start=0, stop=ops.shape(x)[-1], step=1))
        return self.token_emb(x) + positions


VOCAB, MAXLEN, EMBED = 40, 10, 8


def _transformer(seq_len):
    inputs = layers.Input(shape=(seq_len,), dtype="int32")
    x = TokenAndPositionEmbedding(MAXLEN, VOCAB, EMBED)(inputs)
    x = TransformerBlock(EMBED, num_heads=2, ff_dim=16)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dense(12, activation="relu")(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    return model


def _tokens(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(n, MAXLEN)).astype("int32")
    return x, (x[:, 0] > VOCAB // 2).astype("int32")


def _grad_stats(g):
    g = np.asarray(g, np.float64).ravel()
    return [np.sqrt((g * g).sum()), np.abs(g).max(), np.abs(g).mean(), np.mean(g == 0.0)]


class _TapeReference(keras.callbacks.Callback):
    """Gradients of the compiled loss on one batch, by tf.GradientTape, with the
    weights that batch's step starts from."""

    def __init__(self, batch, x, y):
        super().__init__()
        self.batch, self.x, self.y, self.grads = batch, x, y, None

    def on_train_batch_begin(self, batch, logs=None):
        if batch != self.batch:
            return
        import tensorflow as tf

        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        with tf.GradientTape() as tape:
            loss = loss_fn(self.y, self.model(self.x, training=True))
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.grads = [tf.convert_to_tensor(g).numpy() for g in grads]


def _needs_tf_data():
    if BACKEND != "tensorflow":
        pytest.skip("tf.data pipelines with unknown shapes are the TensorFlow backend's")
    return pytest.importorskip("tensorflow")


def test_transformer_on_tf_data_with_a_partial_last_batch_matches_a_gradient_tape() -> None:
    tf = _needs_tf_data()
    x, y = _tokens(40)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)  # 32, then 8: shapes (None, 10)
    model = _transformer(MAXLEN)
    reference = _TapeReference(1, x[32:], y[32:])
    cb = _cb()
    model.fit(ds, epochs=3, verbose=0, callbacks=[cb, reference])
    _watched_to_the_end(cb, 6)
    # The reference was taken at batch 1 of each epoch: the last is step 5.
    stats = cb.last_step_stats
    assert stats.step == 5
    assert stats.grad_layers == tuple(v.path for v in model.trainable_variables)
    for i, ref in enumerate(reference.grads):
        assert stats.grad_numel[i] == ref.size
        if np.linalg.norm(ref) < 1e-7:
            # Attention's key bias: its gradient is zero in exact arithmetic (softmax
            # ignores a shift shared by all keys); what is left is rounding noise, and
            # which entries round to exactly 0 depends on oneDNN and the vector width.
            assert stats.grad_norm[i] < 1e-6
            continue
        seen = [
            stats.grad_norm[i],
            stats.grad_max_abs[i],
            stats.grad_mean_abs[i],
            stats.grad_zero_frac[i],
        ]
        np.testing.assert_allclose(seen, _grad_stats(ref), rtol=1e-4, atol=1e-7)
    # The activation layers run on the partial batch too: FFN relu, head relu, softmaxes.
    kinds = dict(zip(stats.act_layers, stats.act_kinds, strict=True))
    assert sorted(set(kinds.values())) == ["relu", "softmax"]
    assert all(0.0 <= v <= 1.0 for v in stats.act_inactive_frac + stats.act_dead_frac)
    assert cb.report.healthy, cb.report.render()


def test_transformer_with_a_partial_last_batch_on_any_backend() -> None:
    x, y = _tokens(40)
    model = _transformer(MAXLEN)
    cb = _cb()
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    _watched_to_the_end(cb, 4)
    assert cb.last_step_stats.grad_layers == tuple(v.path for v in model.trainable_variables)
    assert cb.last_step_stats.act_layers


def test_transformer_on_ragged_sequence_lengths() -> None:
    tf = _needs_tf_data()
    rng = np.random.default_rng(2)
    lengths = rng.integers(3, MAXLEN + 1, size=70)
    sequences = [rng.integers(1, VOCAB, size=n).astype("int32") for n in lengths]
    labels = np.array([int(s[0] > VOCAB // 2) for s in sequences], "int32")
    ragged = tf.data.Dataset.from_tensor_slices(tf.ragged.constant(sequences))
    ds = tf.data.Dataset.zip(ragged, tf.data.Dataset.from_tensor_slices(labels))
    # Batches of (None, None), each padded to its own longest sequence.
    ds = ds.ragged_batch(16).map(lambda x, y: (x.to_tensor(), y))
    model = _transformer(None)
    cb = _cb()
    model.fit(ds, epochs=2, verbose=0, callbacks=[cb])
    _watched_to_the_end(cb, 10)  # 70 sequences in batches of 16: 5 a epoch
    assert int(model.optimizer.iterations.numpy()) == 10
    assert cb.last_step_stats.act_layers
    assert np.all(np.isfinite(cb.last_step_stats.grad_norm))


# --- the keras.io GAN: optimizers held as model attributes --------------------------------

LATENT, FEATURES = 4, 8


class GAN(keras.Model):
    """keras.io "Customizing what happens in fit()" GAN, on small Dense nets."""

    def __init__(self, discriminator, generator):
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def call(self, x):
        # The torch trainer builds a model by calling it before the first step.
        return self.discriminator(x)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    def _batch(self, real):
        n = ops.shape(real)[0]
        z = keras.random.normal((n, LATENT), seed=self.seed_generator)
        combined = ops.concatenate([self.generator(z), real], axis=0)
        labels = ops.concatenate([ops.ones((n, 1)), ops.zeros((n, 1))], axis=0)
        labels += 0.05 * keras.random.uniform(ops.shape(labels), seed=self.seed_generator)
        z = keras.random.normal((n, LATENT), seed=self.seed_generator)
        return combined, labels, z, ops.zeros((n, 1))

    def train_step(self, real):
        if isinstance(real, tuple):
            real = real[0]
        combined, labels, z, misleading = self._batch(real)
        if BACKEND == "torch":
            import torch

            self.zero_grad()
            d_loss = self.loss_fn(labels, self.discriminator(combined))
            d_loss.backward()
            grads = [v.value.grad for v in self.discriminator.trainable_weights]
            with torch.no_grad():
                self.d_optimizer.apply(grads, self.discriminator.trainable_weights)
            self.zero_grad()
            g_loss = self.loss_fn(misleading, self.discriminator(self.generator(z)))
            g_loss.backward()
            grads = [v.value.grad for v in self.generator.trainable_weights]
            with torch.no_grad():
                self.g_optimizer.apply(grads, self.generator.trainable_weights)
        else:
            import tensorflow as tf

            with tf.GradientTape() as tape:
                d_loss = self.loss_fn(labels, self.discriminator(combined))
            grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
            pairs = zip(grads, self.discriminator.trainable_weights, strict=True)
            self.d_optimizer.apply_gradients(pairs)
            with tf.GradientTape() as tape:
                g_loss = self.loss_fn(misleading, self.discriminator(self.generator(z)))
            grads = tape.gradient(g_loss, self.generator.trainable_weights)
            self.g_optimizer.apply(grads, self.generator.trainable_weights)
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {"d_loss": self.d_loss_tracker.result(), "g_loss": self.g_loss_tracker.result()}


def _gan():
    discriminator = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            layers.Dense(32),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Dense(1),
        ],
        name="discriminator",
    )
    generator = keras.Sequential(
        [
            keras.Input((LATENT,)),
            layers.Dense(32),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Dense(FEATURES),
        ],
        name="generator",
    )
    gan = GAN(discriminator, generator)
    gan.compile(
        d_optimizer=keras.optimizers.Adam(1e-3),
        g_optimizer=keras.optimizers.Adam(1e-3),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    return gan


def _real_samples(n=640):
    rng = np.random.default_rng(3)
    return (rng.normal(size=(n, FEATURES)) * 0.5 + 1.0).astype("float32")


@pytest.mark.skipif(BACKEND == "jax", reason="a JAX GAN train_step is stateless (see below)")
def test_keras_io_gan_watches_both_optimizers_under_their_own_names() -> None:
    gan = _gan()
    cb = _cb(on_finding="warn")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false finding on a healthy run
        gan.fit(_real_samples(), batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    _watched_to_the_end(cb, 40)  # one step per train step, not per optimizer
    d_names = tuple(v.path for v in gan.discriminator.trainable_weights)
    g_names = tuple(v.path for v in gan.generator.trainable_weights)
    stats = cb.last_step_stats
    assert stats.grad_layers == d_names + g_names
    assert all(n > 0 and np.isfinite(n) for n in stats.grad_norm)
    assert cb.report.findings == ()
    assert cb.report.healthy
    assert "apply" not in vars(gan.d_optimizer) and "apply" not in vars(gan.g_optimizer)


@pytest.mark.skipif(BACKEND == "jax", reason="the JAX path reads model.optimizer only")
def test_gan_sampled_every_fourth_step_counts_train_steps() -> None:
    gan = _gan()
    cb = _cb(sample_every=4, dense_until=0, flush_every=3)
    gan.fit(_real_samples(320), batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    # 20 train steps: samples 0, 4, ..., 16; total norms (both optimizers') 3, 6, 9, 15, 18
    _watched_to_the_end(cb, 5 + 5)
    assert (cb.report.first_step, cb.report.last_step) == (0, 18)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX only")
def test_jax_says_which_attribute_optimizers_it_cannot_watch() -> None:
    model = compile_classifier(mlp(depth=1, width=8))
    model.d_optimizer = keras.optimizers.Adam(1e-3)
    cb = _cb()
    fit(model, [cb], xy=data(n=64))
    assert any("JAX" in n and "d_optimizer" in n for n in cb.report.notes), cb.report.notes


# --- what cannot be watched is said, never called healthy ------------------------------------


class ClosureOptimizer(keras.Sequential):
    """A custom train_step applying gradients through an optimizer gradwatch cannot see."""

    def train_step(self, data):
        x, y = data
        optimizer = type(self)._hidden_optimizer
        if BACKEND == "torch":
            import torch

            self.zero_grad()
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            loss.backward()
            grads = [v.value.grad for v in self.trainable_weights]
            with torch.no_grad():
                type(optimizer).apply(optimizer, grads, self.trainable_weights)
        else:
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            grads = tape.gradient(loss, self.trainable_weights)
            type(optimizer).apply(optimizer, grads, self.trainable_weights)
        return {"loss": loss}


@pytest.mark.skipif(BACKEND == "jax", reason="a JAX train_step is stateless")
def test_steps_applied_past_every_watched_optimizer_are_said_not_healthy() -> None:
    model = ClosureOptimizer(
        [keras.Input((16,)), layers.Dense(8, activation="relu"), layers.Dense(4)]
    )
    ClosureOptimizer._hidden_optimizer = keras.optimizers.SGD(0.05)
    compile_classifier(model)
    cb = _cb()
    fit(model, [cb], xy=data(n=64))
    report = cb.report
    assert report.steps_observed == 0
    assert not report.healthy
    assert any("Nothing monitored: 4 training steps ran" in n for n in report.notes)
    assert "healthy" not in report.render(width=80).splitlines()[0]


def test_an_internal_error_is_never_reported_healthy(monkeypatch) -> None:
    import gradwatch.adapters.keras.probe as gw_probe

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gw_probe, "_grad_row", boom)
    cb = _cb()
    with pytest.warns(UserWarning, match="boom"):
        fit(compile_classifier(mlp(depth=1, width=8)), [cb], xy=data(n=64))
    report = cb.report
    assert report.stopped_at == 0
    assert not report.healthy
    assert "healthy" not in report.render(width=80).splitlines()[0]

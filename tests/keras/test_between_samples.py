"""Steps between the callback's samples take their total gradient norm (issue #14): a
late explosion to NaN is caught within its window, the healthy twin stays quiet, the
norms are the real gradients' and reach the host only at the flush. Runs on whatever
backend ``KERAS_BACKEND`` selects."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("sklearn")

import gradwatch.adapters.keras.capture as gw_capture  # noqa: E402
import gradwatch.adapters.keras.reader as gw_reader  # noqa: E402
import numpy as np  # noqa: E402
from gradwatch.adapters.keras.reductions import norm_due  # noqa: E402

from gradwatch import GradWatchCallback, GradwatchWarning  # noqa: E402
from gradwatch.sinks import TOTAL_NORM_TAG  # noqa: E402

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scenarios import keras_scenarios  # noqa: E402
from benchmarks.scenarios.keras_late import ONSET, SCENARIOS  # noqa: E402

_BY_NAME = {s.name: s for s in SCENARIOS}
# The explosion reaches NaN within 10 steps of the onset on every backend (measured);
# "within its window" is the issue's: 25 steps.
_WINDOW = 25


def _cb(**kw):
    kw.setdefault("verbose", 0)
    kw.setdefault("on_finding", "ignore")
    return GradWatchCallback(**kw)


class _BatchLoss(keras.callbacks.Callback):
    """Plain Keras, no gradwatch: the first step whose running loss is not finite."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.first_nonfinite: int | None = None

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", math.nan))
        if self.first_nonfinite is None and not math.isfinite(loss):
            self.first_nonfinite = self.step
        self.step += 1


def _opened(report):
    return {f.rule: f.first_step for f in report.findings if f.severity in ("warning", "error")}


def _schedule_counts(steps: int, sample_every: int, dense_until: int, norm_every: int):
    sampled = sum(s < dense_until or s % sample_every == 0 for s in range(steps))
    norms = sum(norm_due(s, sample_every, dense_until, norm_every) for s in range(steps))
    return sampled, norms


def test_the_late_scenarios_are_registered() -> None:
    names = {s.name for s in keras_scenarios()}
    assert set(_BY_NAME) <= names


def test_late_explosion_between_samples_is_reported_within_its_window() -> None:
    scn = _BY_NAME["exploding_late_lr_jump"]
    loss = _BatchLoss()
    logged: dict[int, float] = {}

    def log(step, scalars):
        logged[step] = scalars.get(TOTAL_NORM_TAG, math.nan)

    cb = _cb(log_to=log)
    scn.build(0).fit([loss, cb])
    # The label on this backend, without gradwatch: finite until the onset, NaN soon after.
    assert loss.first_nonfinite is not None and ONSET < loss.first_nonfinite < ONSET + _WINDOW
    opened = _opened(cb.report)
    assert set(opened) == scn.expected_rules, cb.report.findings
    for rule, first in opened.items():
        assert ONSET <= first < ONSET + _WINDOW, (rule, first)
    # The growth was seen on a step between samples: a norm step after the onset over 10x
    # the typical norm before it (the nonfinite rule's explosion_factor).
    before = np.nanmedian([v for step, v in logged.items() if step < ONSET])
    grown = [
        s for s, v in logged.items() if s >= ONSET and norm_due(s, 8, 50, 3) and v > 10 * before
    ]
    assert grown, {s: v for s, v in logged.items() if s >= ONSET}


def test_samples_alone_miss_the_explosion() -> None:
    # The same run watched per sample only: the growth lies between two samples.
    scn = _BY_NAME["exploding_late_lr_jump"]
    cb = _cb(norm_every=0)
    scn.build(0).fit([cb])
    assert "exploding_gradient" not in _opened(cb.report)


def test_healthy_twin_stays_quiet_and_every_norm_step_is_observed() -> None:
    scn = _BY_NAME["healthy_late_lr_decay"]
    run = scn.build(0)
    cb = _cb()
    run.fit([cb])
    assert _opened(cb.report) == {}, cb.report.findings
    sampled, norms = _schedule_counts(run.steps, 8, 50, 3)
    assert norms > 0
    assert cb.report.steps_observed == sampled + norms
    assert cb.report.steps_observed > sampled  # the norm steps, on top of the samples


# --- the values: the real gradients' norms, on the schedule ---------------------------------

_N, _FEATURES, _BATCH = 512, 8, 16


def _linear_run(optimizer):
    """A linear least-squares model that does not learn (lr 0): every step's gradient
    is known in closed form, ``2/B X^T (X w - y)``, on any backend."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(_N, _FEATURES)).astype("float32")
    y = rng.normal(size=(_N, 1)).astype("float32")
    w = rng.normal(size=(_FEATURES, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((_FEATURES,)),
            keras.layers.Dense(
                1, use_bias=False, kernel_initializer=keras.initializers.Constant(w)
            ),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse")
    reference = {}
    for step, start in enumerate(range(0, _N, _BATCH)):
        xb, yb = x[start : start + _BATCH].astype(np.float64), y[start : start + _BATCH]
        grad = 2.0 / _BATCH * xb.T @ (xb @ w.astype(np.float64) - yb)
        reference[step] = float(np.linalg.norm(grad))
    return model, x, y, reference


def _optimizer(kind: str):
    if kind == "loss_scaled":
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=2.0**10)
    return keras.optimizers.SGD(0.0)


@pytest.mark.parametrize("kind", ["sgd", "loss_scaled"])
def test_norm_steps_are_the_real_gradient_norms_on_the_schedule(kind) -> None:
    model, x, y, reference = _linear_run(_optimizer(kind))
    logged: dict[int, float] = {}

    def log(step, scalars):
        if TOTAL_NORM_TAG in scalars:
            logged[step] = scalars[TOTAL_NORM_TAG]

    cb = _cb(sample_every=4, dense_until=2, norm_every=3, flush_every=5, log_to=log)
    model.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    steps = len(reference)
    due = [s for s in range(steps) if norm_due(s, 4, 2, 3)]
    sampled = [s for s in range(steps) if s < 2 or s % 4 == 0]
    assert due == [3, 6, 9, 15, 18, 21, 27, 30]
    assert sorted(logged) == sorted(due + sampled)
    np.testing.assert_allclose([logged[s] for s in due], [reference[s] for s in due], rtol=1e-4)
    assert cb.report.steps_observed == len(due) + len(sampled)
    # last_step_stats stays the newest sample per variable.
    assert cb.last_step_stats.step == max(sampled)
    assert cb.last_step_stats.grad_layers


def test_no_norm_steps_when_every_step_is_sampled_or_norm_every_is_0() -> None:
    for kw in ({"sample_every": 1}, {"norm_every": 0}):
        model, x, y, reference = _linear_run(_optimizer("sgd"))
        cb = _cb(
            dense_until=0,
            sample_every=kw.get("sample_every", 4),
            **{k: v for k, v in kw.items() if k != "sample_every"},
        )
        model.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        assert cb._probe.norms is None
        every = kw.get("sample_every", 4)
        assert cb.report.steps_observed == len(range(0, len(reference), every))


def test_norms_reach_the_host_only_at_the_flush(monkeypatch) -> None:
    # Host copies of the probe happen at the reads, a fixed number per flush, however
    # many steps took their norm in between (none inside the train step).
    reads = []
    copy = gw_reader.to_host
    monkeypatch.setattr(gw_reader, "to_host", lambda v: reads.append(v.name) or copy(v))
    model, x, y, reference = _linear_run(_optimizer("sgd"))
    flushes = []
    cb = _cb(sample_every=8, dense_until=0, norm_every=1, flush_every=8)
    real_flush = cb._flush
    monkeypatch.setattr(cb, "_flush", lambda m: flushes.append(1) or real_flush(m))
    model.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    steps = len(reference)
    assert cb.report.steps_observed == steps  # every step: a sample or its norm
    assert len(flushes) == steps // 8 + 1  # every 8 batches, and at the end of fit
    per_read = {"gradwatch_steps", "gradwatch_grads", "gradwatch_norm_steps", "gradwatch_norms"}
    assert set(reads) <= per_read | {"gradwatch_acts"}
    assert len(reads) <= len(flushes) * (len(per_read) + 1)


def test_an_internal_error_in_the_norm_step_switches_monitoring_off(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gw_capture, "_grad_norms", boom)
    monkeypatch.setattr("gradwatch.adapters.keras.capture_jax._grad_norms", boom)
    model, x, y, _ = _linear_run(_optimizer("sgd"))
    cb = _cb(sample_every=4, dense_until=0)
    with pytest.warns(GradwatchWarning, match="boom"):
        history = model.fit(x, y, batch_size=_BATCH, epochs=2, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 2
    assert not cb.enabled
    assert any("boom" in note for note in cb.report.notes)


def test_norm_every_must_be_a_non_negative_integer() -> None:
    for bad in (-1, 1.5, True, "3", None):
        with pytest.raises(ValueError, match="norm_every"):
            GradWatchCallback(norm_every=bad)

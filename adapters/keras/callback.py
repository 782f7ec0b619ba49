"""The callback's lifecycle and host side: :class:`GradWatchCallback`.

Owns one :class:`gradwatch.monitor.Monitor` per ``fit`` (analyzer, guard, on_finding
policy, report), the choice of capture for the backend, and the host side: every
``flush_every`` batches one read of the probe rings, turned into
:class:`gradwatch.StepStats` by :func:`gradwatch.rows.step_stats_from_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from gradwatch.adapters.keras.capture import Capture, TensorCapture
from gradwatch.adapters.keras.capture_jax import JaxCapture
from gradwatch.adapters.keras.layers import ActivationLayers
from gradwatch.adapters.keras.probe import Probe, to_host

from gradwatch.activations import DEFAULT_TAIL_DERIVATIVE_FRACTION
from gradwatch.analyzer import Analyzer
from gradwatch.config import check_bool, check_int
from gradwatch.findings import Finding
from gradwatch.monitor import Monitor
from gradwatch.report import Report
from gradwatch.rows import step_stats_from_rows
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.schedules import every
from gradwatch.stats import StepStats


class GradWatchCallback(keras.callbacks.Callback):
    """Watches the gradients (and activations) of the batches ``fit`` trains on.

    Add it to ``fit``; at the end of training it prints a report of what is wrong with
    the gradient flow (vanishing, exploding or non-finite gradients, dead ReLUs,
    saturated sigmoid/tanh units) and what to change. ``cb.report`` holds the
    :class:`gradwatch.Report` of the last ``fit``.

    The statistics are those of the real gradients of each training batch, reduced
    inside the compiled train step: no batch is recomputed and the model code is not
    changed. Layer names are Keras variable paths (``"dense_3/kernel"``), grouped
    into layers (``"dense_3"``).

    Works on the TensorFlow, torch and JAX backends of Keras 3.

    Activation statistics cover Dense/Conv layers with an ``activation``, and
    ``Activation``, ``ReLU``, ``LeakyReLU``, ``PReLU``, ``ELU`` and ``Softmax``
    layers. Activations applied inside recurrent cells or inside a custom ``call``
    are not covered; the report lists such layers in its notes.

    Args:
        rules: the rules to apply. Defaults to :data:`gradwatch.DEFAULT_RULES`.
        window: steps the analyzer keeps for its rules. Defaults to ``64``.
        flush_every: read the statistics back to the host every this many batches
            (one small transfer). Defaults to ``16``.
        sample_every: reduce gradient (and activation) statistics on every this many
            training steps; the other steps cost a comparison. Each sample is the full
            statistics of that step's real gradients. Defaults to ``8`` (under 5%
            overhead on a 12x512 MLP on CPU, see ``benchmarks/overhead_keras.py``);
            use ``1`` for short runs.
        dense_until: sample every step before this step, so every rule can fire within
            the first 50 steps (warm-up 10 + persistence 10) and an explosion that
            turns NaN within a few steps is seen growing. Defaults to ``50``.
        activations: also sample activation statistics (dead ReLUs, saturation).
            Defaults to ``True``.
        tail_derivative_fraction: a sigmoid/tanh output is in a flat tail when its
            local derivative is below this fraction of its peak. Defaults to
            ``gradwatch.activations.DEFAULT_TAIL_DERIVATIVE_FRACTION`` (``0.01``).
        on_finding: what to do when a finding of severity ``"warning"`` or
            ``"error"`` opens: ``"warn"`` (a :class:`gradwatch.GradwatchWarning`),
            ``"raise"`` (raise :class:`gradwatch.FindingError` out of ``fit``),
            ``"stop"`` (set ``model.stop_training = True``, like
            ``keras.callbacks.TerminateOnNaN``), ``"ignore"``, or a callable that
            receives every new :class:`gradwatch.Finding`. Defaults to ``"warn"``.
        verbose: ``1`` prints the report when training ends, ``0`` stays silent.
            Defaults to ``1``.
        strict: re-raise errors inside gradwatch instead of warning once and
            switching monitoring off. Defaults to ``False``.

    Attributes:
        report: the :class:`gradwatch.Report` of the last ``fit`` (``None`` before).
        analyzer: the :class:`gradwatch.Analyzer` of the current or last ``fit``.
        last_step_stats: the newest :class:`gradwatch.StepStats` read, per variable.

    Raises:
        ValueError: at construction, naming the bad parameter.

    Example:
        >>> import numpy as np, keras, gradwatch
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
        ...                           keras.layers.Dense(1)])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> cb = gradwatch.GradWatchCallback(sample_every=1, verbose=0)
        >>> x, y = np.random.rand(64, 4), np.random.rand(64, 1)
        >>> _ = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
        >>> cb.report.steps_observed, cb.report.healthy
        (8, True)
        >>> cb.last_step_stats.grad_layers[0]
        'sequential/dense/kernel'
    """

    def __init__(
        self,
        *,
        rules: Sequence[Rule] = DEFAULT_RULES,
        window: int = 64,
        flush_every: int = 16,
        sample_every: int = 8,
        dense_until: int = 50,
        activations: bool = True,
        tail_derivative_fraction: float = DEFAULT_TAIL_DERIVATIVE_FRACTION,
        on_finding: str | Callable[[Finding], Any] = "warn",
        verbose: int = 1,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.flush_every = check_int("flush_every", flush_every, 1)
        self.sample_every = check_int("sample_every", sample_every, 1)
        self.dense_until = check_int("dense_until", dense_until, 0)
        self.activations = check_bool("activations", activations)
        self.window = check_int("window", window, 1)
        if isinstance(verbose, bool) or verbose not in (0, 1):
            raise ValueError(f"verbose must be 0 or 1, got {verbose!r}")
        if not (
            isinstance(tail_derivative_fraction, (int, float))
            and 0.0 < float(tail_derivative_fraction) < 1.0
        ):
            raise ValueError(
                f"tail_derivative_fraction must be in (0, 1), got {tail_derivative_fraction!r}"
            )
        self.rules = tuple(rules)
        self.on_finding = on_finding
        self.verbose = verbose
        self.strict = strict
        # Validates rules, window, on_finding and strict now, not at the start of fit.
        self._new_monitor()
        # The host-side twin of the in-graph condition in Capture._is_sampled.
        self._schedule = every(sample_every, dense_until)
        self.tail_derivative_fraction = float(tail_derivative_fraction)
        self.report: Report | None = None
        self.last_step_stats: StepStats | None = None
        self._monitor: Monitor | None = None
        self._capture: Capture | None = None
        self._probe: Probe | None = None
        self._reader: RingReader | None = None
        self._batches_since_flush = 0
        self._flush_calls = 1

    def _new_monitor(self) -> Monitor:
        return Monitor(
            where="Keras callback",
            rules=self.rules,
            window=self.window,
            on_finding=self.on_finding,
            strict=self.strict,
            show=bool(self.verbose),
            width=80,
            stop=lambda: setattr(self.model, "stop_training", True),
            before_raise=self._before_raise,
        )

    def _before_raise(self) -> None:
        # fit will not reach on_train_end: restore and keep the report now.
        self.restore()
        if self._monitor is not None:
            self.report = self._monitor.analyzer.report()

    @property
    def analyzer(self) -> Analyzer | None:
        """The :class:`gradwatch.Analyzer` of the current or last ``fit``."""
        return None if self._monitor is None else self._monitor.analyzer

    @property
    def enabled(self) -> bool:
        """False once an internal error switched monitoring off for this ``fit``."""
        return self._monitor is None or self._monitor.guard.enabled

    # --- Keras hooks ---------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.restore()  # a previous fit that raised never reached on_train_end
        self._monitor = monitor = self._new_monitor()
        self._capture = self._probe = self._reader = None
        self.report = None
        self.last_step_stats = None
        self._batches_since_flush = 0
        self._flush_calls = 1
        with monitor.guard:
            self._install(monitor)
        if not monitor.guard.enabled:
            self.restore()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._probe is None or self._monitor is None:
            return
        if not self._monitor.guard.enabled:
            # An error (maybe while the step was traced) switched monitoring off: stop
            # paying for it too.
            self.restore()
            self._probe = None
            return
        self._batches_since_flush += 1
        if self._batches_since_flush < self._flush_calls:
            return
        self._batches_since_flush = 0
        self._flush(self._monitor)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        monitor = self._monitor
        if monitor is None:
            self.restore()
            return
        # At the end of fit a finding can no longer stop or raise out of it: it warns.
        monitor.final = True
        if self._probe is not None and monitor.guard.enabled:
            self._flush(monitor)
        self.restore()
        self.report = monitor.report()

    def restore(self) -> None:
        """Undo every patch and make Keras retrace its train function. Safe to call twice;
        ``on_train_end`` calls it."""
        if self._capture is not None:
            self._capture.uninstall(getattr(self, "_model", None))

    # --- installing ----------------------------------------------------------------------

    def _install(self, monitor: Monitor) -> None:
        model = self.model
        backend = keras.backend.backend()
        if backend not in ("tensorflow", "torch", "jax"):
            raise NotImplementedError(
                f"GradWatchCallback supports the tensorflow, torch and jax backends, not "
                f"{backend!r}"
            )
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("the model has no optimizer; call model.compile() before fit()")
        variables = list(model.trainable_variables)
        acts = ActivationLayers(model, self.activations)
        for note in acts.notes:
            monitor.note(note)
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        # on_train_batch_end runs once per execution of `spe` steps.
        self._flush_calls = max(1, math.ceil(self.flush_every / spe))
        # Samples that can land between two reads, with slack for the final partial one
        # (every step is a sample during the dense start).
        period = 1 if self.dense_until > 0 else self.sample_every
        ring = math.ceil((self._flush_calls * spe + spe) / period) + 2
        self._probe = Probe(len(variables), len(acts), ring)
        capture_type = JaxCapture if backend == "jax" else TensorCapture
        self._capture = capture_type(
            self._probe,
            monitor.guard,
            acts,
            sample_every=self.sample_every,
            dense_until=self.dense_until,
            tail_derivative_fraction=self.tail_derivative_fraction,
            note=monitor.note,
        )
        self._reader = RingReader(
            self._probe, self._capture, acts, self._schedule, self.flush_every
        )
        self._capture.install(model, optimizer)

    # --- host side ---------------------------------------------------------------------------

    def _flush(self, monitor: Monitor) -> None:
        """Read the rings and hand what is new to the monitor. Findings are dispatched
        outside the guard: ``on_finding`` errors are the user's, not internal ones."""
        batch: list[StepStats] = []
        with monitor.guard:
            if self._reader is not None:
                batch = self._reader.read(getattr(self, "_model", None), monitor)
        if batch:
            self.last_step_stats = batch[-1]
            monitor.observe(batch)


class RingReader:
    """The host side of one ``fit``: reads the probe rings and turns every slot written
    since the last read into :class:`StepStats`, oldest first.

    Args:
        probe: the rings the train step writes.
        capture: names the variables that had a gradient (known once traced).
        acts: the watched activation layers, one ring row each.
        schedule: the host twin of the in-graph sampling condition.
        flush_every: named in the note when a slot was overwritten before it was read.
    """

    def __init__(
        self,
        probe: Probe,
        capture: Capture,
        acts: ActivationLayers,
        schedule: Callable[[int], bool],
        flush_every: int,
    ) -> None:
        self.probe = probe
        self.capture = capture
        self.acts = acts
        self.schedule = schedule
        self.flush_every = flush_every
        self._last_read = -1

    def read(self, model: keras.Model | None, monitor: Monitor) -> list[StepStats]:
        """The new samples (one host transfer per ring); notes lost ones on ``monitor``."""
        probe = self.probe
        sync = getattr(model, "jax_state_sync", None)
        if callable(sync):
            # JAX keeps the live state outside the variables during an epoch.
            sync()
        steps = to_host(probe.steps)
        fresh = np.flatnonzero(steps[:, 0] > self._last_read)
        if fresh.size == 0:
            return []
        fresh = fresh[np.argsort(steps[fresh, 0])]
        if probe.grads is None:
            return []
        grads = to_host(probe.grads).astype(np.float64)
        act_rows = to_host(probe.acts).astype(np.float64) if probe.acts is not None else None
        first = int(steps[fresh[0], 0])
        expected = next(s for s in range(self._last_read + 1, first + 1) if self.schedule(s))
        if first != expected:
            monitor.note(
                f"Samples of steps {expected}..{first - 1} were overwritten before they "
                f"were read; lower flush_every (now {self.flush_every})."
            )
        self._last_read = int(steps[fresh[-1], 0])
        n = len(self.capture.grad_names)
        return [
            self._step_stats(
                int(steps[slot, 0]),
                bool(steps[slot, 1]),
                grads[slot, :n],
                None if act_rows is None else act_rows[slot],
            )
            for slot in fresh
        ]

    def _step_stats(
        self, step: int, skipped: bool, g: np.ndarray, a: np.ndarray | None
    ) -> StepStats:
        """One ring slot's :class:`StepStats`: ``g`` holds a row per variable, ``a`` a
        row per activation layer."""
        acts = self.acts
        return step_stats_from_rows(
            step,
            self.capture.grad_names,
            g.T,
            act_layers=acts.names,
            act_kinds=acts.kinds,
            act_is_output=acts.is_output,
            act_rows=a,
            skipped=skipped,
        )


__all__ = ["GradWatchCallback", "RingReader"]

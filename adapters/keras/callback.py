"""The callback's lifecycle: :class:`GradWatchCallback`.

Owns one :class:`gradwatch.monitor.Monitor` per ``fit`` (analyzer, guard, on_finding
policy, report), the choice of capture for the backend and of the optimizers to
watch, the :class:`~gradwatch.adapters.keras.lifecycle.FitScope` that undoes the
patches of a ``fit`` that died, and the reads: every ``flush_every`` batches one read
of the probe rings by :class:`~gradwatch.adapters.keras.reader.RingReader`. What it
could not watch, it says in the report's notes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
from gradwatch.adapters.keras.capture import Capture, TensorCapture
from gradwatch.adapters.keras.capture_jax import JaxCapture
from gradwatch.adapters.keras.layers import ActivationLayers, layer_info
from gradwatch.adapters.keras.lifecycle import FitScope, note_unseen_steps, watched_optimizers
from gradwatch.adapters.keras.ops_capture import tell_coverage
from gradwatch.adapters.keras.probe import Probe, norm_ring_size, ring_size, to_host
from gradwatch.adapters.keras.reader import RingReader
from gradwatch.adapters.keras.recurrence import RecurrentLayers

from gradwatch.activations import DEFAULT_TAIL_DERIVATIVE_FRACTION
from gradwatch.analyzer import Analyzer, resolve_rules
from gradwatch.config import check_bool, check_int
from gradwatch.findings import Finding
from gradwatch.monitor import Monitor
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.schedules import every
from gradwatch.stats import StepStats

# Batches between two reads at most (each sample between them holds a ring slot).
MAX_FLUSH_EVERY = 10_000


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
    layers, and the ``keras.ops`` / ``keras.activations`` calls (``ops.sigmoid``,
    ``ops.relu``, ``ops.gelu``...) inside a custom layer's or model's ``call``, as
    sites named ``<layer path>#<fn>:<n>``. Activations applied inside recurrent cells,
    inside control-flow bodies (TensorFlow, JAX) or the fused attention of
    ``MultiHeadAttention`` are not covered; the report lists such layers in its notes
    and in ``report.coverage``. A layer holding several kernels itself is judged per
    kernel (each with its bias), so depth inside it is visible.

    Recurrent layers (``SimpleRNN``, ``LSTM``, ``GRU``, any ``keras.layers.RNN``, also
    inside ``Bidirectional``) are measured through time on sampled steps: the RMS of
    the gradient reaching the initial state against the one at the last processed
    output (``StepStats.time_grad_first`` / ``time_grad_last``), by identity taps whose
    backward passes hand the gradients over. A plain ``SimpleRNN`` whose initial state
    gets under 1e-5 of the last output's gradient is reported as ``vanishing_gradient``.

    A custom ``train_step`` that applies its gradients with optimizers held as model
    attributes (the keras.io GAN's ``self.d_optimizer`` and ``self.g_optimizer``) is
    watched too on the TensorFlow and torch backends: each optimizer's variables
    under their own names, one step per train step. What cannot be watched (no
    optimizer step seen, an internal error, such optimizers on JAX) is said in the
    report's notes, and such a report is never called healthy.

    Args:
        rules: the rules to apply: :class:`gradwatch.Rule` instances or rule ids, or
            one of either (``rules="dead_relu"``). Defaults to
            :data:`gradwatch.DEFAULT_RULES`.
        window: steps the analyzer keeps for its rules. Defaults to ``64``.
        flush_every: read the statistics back to the host every this many batches
            (one small transfer), at most ``10_000``. Defaults to ``16``.
        sample_every: reduce gradient (and activation) statistics on every this many
            training steps; the other steps cost a comparison. Each sample is the full
            statistics of that step's real gradients. Defaults to ``8`` (under 5%
            overhead on a 12x512 MLP on CPU, see ``benchmarks/overhead_keras.py``);
            use ``1`` for short runs.
        dense_until: sample every step before this step, so every rule can fire within
            the first 50 steps (warm-up 10 + persistence 10) and an explosion that
            turns NaN within a few steps is seen growing. Defaults to ``50``.
        norm_every: a step not sampled takes its total gradient norm (one fused
            reduction, kept on the device until the flush) when it is a multiple of
            this, so a spike or a NaN between samples is seen; ``0`` turns it off.
            Defaults to ``3``, as the torch adapter's ``norm_schedule``.
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
        log_to: where the numbers of every sampled step also go, batched at each flush:
            a TensorBoard log directory, a ``SummaryWriter``, a wandb run, the ``mlflow``
            module or a callable ``(step, {tag: value})``; tags in ``docs/logging.md``.
            Defaults to ``None``.

    Attributes:
        report: the :class:`gradwatch.Report` of the last ``fit`` (``None`` before).
        analyzer: the :class:`gradwatch.Analyzer` of the current or last ``fit``.
        last_step_stats: the newest :class:`gradwatch.StepStats` read, per variable.

    Raises:
        ValueError: at construction, naming the bad parameter (a wrong type too).

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
        rules: Sequence[Rule | str] | Rule | str = DEFAULT_RULES,
        window: int = 64,
        flush_every: int = 16,
        sample_every: int = 8,
        dense_until: int = 50,
        norm_every: int = 3,
        activations: bool = True,
        tail_derivative_fraction: float = DEFAULT_TAIL_DERIVATIVE_FRACTION,
        on_finding: str | Callable[[Finding], Any] = "warn",
        verbose: int = 1,
        strict: bool = False,
        log_to: Any = None,
    ) -> None:
        super().__init__()
        self.flush_every = _check_at_most("flush_every", check_int("flush_every", flush_every, 1))
        self.sample_every = check_int("sample_every", sample_every, 1)
        self.dense_until = check_int("dense_until", dense_until, 0)
        self.norm_every = check_int("norm_every", norm_every, 0)
        self.activations = check_bool("activations", activations)
        self.window = check_int("window", window, 1)
        self.verbose = _check_verbose(verbose)
        self.tail_derivative_fraction = _check_fraction(tail_derivative_fraction)
        self.rules = resolve_rules(rules)
        self.on_finding = on_finding
        self.strict = strict
        self.log_to = log_to
        # Validates rules, window, on_finding, strict and log_to now, not in fit.
        self._new_monitor()
        # The host-side twin of the in-graph condition in Capture._is_sampled.
        self._schedule = every(sample_every, dense_until)
        self.report: Report | None = None
        self.last_step_stats: StepStats | None = None
        self._monitor: Monitor | None = None
        self._capture: Capture | None = None
        self._probe: Probe | None = None
        self._reader: RingReader | None = None
        self._scope: FitScope | None = None
        self._batches_since_flush = 0
        self._flush_calls = 1
        self._steps_per_batch = 1
        self._steps_run = 0
        self._acts: ActivationLayers | None = None
        self._layer_info_given = True
        self._sites_given = 0

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
            log_to=self.log_to,
            framework="keras",
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
        self._acts = None
        self.report = None
        self.last_step_stats = None
        self._batches_since_flush = 0
        self._flush_calls = 1
        self._steps_run = 0
        # If this fit dies before on_train_end, the model's next fit, evaluate or
        # predict (without this callback) undoes the patches first.
        self._scope = FitScope(self.model, self.restore)
        with monitor.guard:
            self._install(monitor, self._scope)
        if not monitor.guard.enabled:
            monitor.error_step = 0
            self.restore()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps_run += self._steps_per_batch
        if self._probe is None or self._monitor is None:
            return
        if not self._monitor.guard.enabled:
            # An error (maybe while the step was traced) switched monitoring off: stop
            # paying for it too.
            if self._monitor.error_step is None:
                self._monitor.error_step = max(0, self._steps_run - self._steps_per_batch)
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
            with monitor.guard:
                steps_seen = int(to_host(self._probe.counter))
                note_unseen_steps(self.model, self._steps_run, steps_seen, monitor.note)
        if self._acts is not None:
            with monitor.guard:
                tell_coverage(monitor, self.model, self._acts)
        self.restore()
        self.report = monitor.report()
        monitor.close()  # flushes the sinks and closes the writers gradwatch opened

    def restore(self) -> None:
        """Undo every patch and make Keras retrace its train function. Safe to call twice;
        ``on_train_end`` calls it, and so does the model's next ``fit``, ``evaluate`` or
        ``predict`` when this ``fit`` died before it."""
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.remove_guards()
        if self._capture is not None:
            self._capture.uninstall(getattr(self, "_model", None))

    # --- installing ----------------------------------------------------------------------

    def _install(self, monitor: Monitor, scope: FitScope) -> None:
        model = self.model
        backend = keras.backend.backend()
        capture_type = _capture_type(backend)
        optimizers = watched_optimizers(model, backend, monitor.note)
        if not optimizers:
            return
        variables = list(model.trainable_variables)
        acts = ActivationLayers(model, self.activations)
        for note in acts.notes:
            monitor.note(note)
        self._acts = acts
        # What each variable's layer is (activation fed, fan-in, recurrence, per-kernel
        # groups); a model built inside its first step gets it at the first read.
        self._layer_info_given = self._give_layer_info(monitor)
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        self._steps_per_batch = spe
        # on_train_batch_end runs once per execution of `spe` steps.
        self._flush_calls = max(1, math.ceil(self.flush_every / spe))
        ring = ring_size(self._flush_calls * spe, spe, self.dense_until, self.sample_every)
        norms = norm_ring_size(self._flush_calls * spe, spe, self.sample_every, self.norm_every)
        rnns = RecurrentLayers(model)
        self._probe = Probe(len(variables), len(acts), ring, norms, self.norm_every, len(rnns))
        self._capture = capture_type(
            self._probe,
            monitor.guard,
            acts,
            sample_every=self.sample_every,
            dense_until=self.dense_until,
            tail_derivative_fraction=self.tail_derivative_fraction,
            note=monitor.note,
            live=scope.live,
            rnns=rnns,
        )
        self._reader = RingReader(
            self._probe, self._capture, acts, self._schedule, self.flush_every, rnns.names
        )
        self._capture.install(model, optimizers)
        scope.guard_entry_points()

    def _give_layer_info(self, monitor: Monitor) -> bool:
        sites = {} if self._acts is None else self._acts.sites
        info = layer_info(self.model, sites)
        if info:
            monitor.set_layer_info(info)
        self._sites_given = len(sites)
        return bool(info)

    def _flush(self, monitor: Monitor) -> None:
        sites = 0 if self._acts is None else len(self._acts.sites)
        if not self._layer_info_given or sites != self._sites_given:
            # Built inside its first step, or keras.ops sites seen since: what they feed.
            with monitor.guard:
                self._layer_info_given = self._give_layer_info(monitor)
        if self._reader is not None:
            newest = self._reader.flush(getattr(self, "_model", None), monitor)
            self.last_step_stats = newest or self.last_step_stats


def _capture_type(backend: str) -> type[Capture]:
    if backend not in ("tensorflow", "torch", "jax"):
        raise NotImplementedError(
            f"GradWatchCallback supports the tensorflow, torch and jax backends, not {backend!r}"
        )
    return JaxCapture if backend == "jax" else TensorCapture


def _check_at_most(name: str, value: int, maximum: int = MAX_FLUSH_EVERY) -> int:
    # The probe holds a ring slot per sample between two reads: bounded memory.
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return value


def _check_verbose(verbose: Any) -> int:
    if isinstance(verbose, bool) or not isinstance(verbose, int) or verbose not in (0, 1):
        raise ValueError(f"verbose must be 0 or 1, got {verbose!r}")
    return verbose


def _check_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"tail_derivative_fraction must be in (0, 1), got {value!r}")
    return float(value)


__all__ = ["GradWatchCallback", "RingReader"]

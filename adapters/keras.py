"""The Keras 3 adapter: :class:`GradWatchCallback`, a ``model.fit`` callback.

A Keras callback is never handed gradients, and recomputing them on a side batch
(the usual workaround) would watch a different signal from the one that trains the
model. Instead, for the duration of ``fit`` this callback:

* wraps the optimizer's ``apply`` (instance attribute, removed after ``fit``) so that
  *inside the compiled train step* the per-variable statistics of the very gradients
  being applied are reduced with ``keras.ops`` and written into a small ring of
  non-trainable variables owned by the callback;
* wraps the ``call`` of every activation layer (Dense/Conv with an activation,
  ``Activation``, ``ReLU``, ``LeakyReLU``, ``PReLU``, ``ELU``, ``Softmax``) so that
  its output is remembered during the traced step and, on sampled steps, reduced to
  inactive/dead/tail fractions in the same conditional branch as the gradients;
* reads the ring every ``flush_every`` batches in ``on_train_batch_end`` (one host
  transfer per ring) and hands :class:`gradwatch.StepStats` to the
  :class:`gradwatch.Analyzer`.

Because the wrappers are Python, they act when the train function is traced; the
callback forces a retrace when ``fit`` starts and when it ends, so a later ``fit``
without the callback runs the original graph.

On the JAX backend the train step is a pure function of the state Keras passes in, so
the callback's variables travel as extra optimizer variables during ``fit`` (removed
after it, and left out of checkpoints saved during it): ``optimizer.stateless_apply``
is wrapped instead of ``apply``, and activation outputs are reduced inside
``compute_loss_and_updates`` (see ``GradWatchCallback._install_jax``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch.activations import (
    CAN_DIE,
    CAN_SATURATE,
    DEFAULT_TAIL_DERIVATIVE_FRACTION,
    SQUASHING,
    ActivationKind,
    kind_from_name,
    tail_bounds,
)
from gradwatch.analyzer import Analyzer
from gradwatch.findings import SEVERITY_RANK, Finding
from gradwatch.guard import FindingError, GradwatchWarning, Guard
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.schedules import every
from gradwatch.stats import StepStats

__all__ = ["GradWatchCallback"]

_ON_FINDING_MODES = ("warn", "raise", "stop", "ignore")
# Columns of the per-variable gradient statistics row.
_NORM, _MAX_ABS, _MEAN_ABS, _ZERO_FRAC, _NONFINITE, _NUMEL, _PARAM_NORM = range(7)
_GRAD_COLUMNS = 7
# Layers whose `call` returns `self.activation(...)` as its last operation.
_ACTIVATION_ATTR_LAYERS: tuple[type, ...] = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.Activation,
)
# Layers with an activation applied inside a recurrence or a custom call: not covered.
_UNCOVERED_ACTIVATION_LAYERS: tuple[type, ...] = (
    keras.layers.SimpleRNN,
    keras.layers.LSTM,
    keras.layers.GRU,
    keras.layers.ConvLSTM1D,
    keras.layers.ConvLSTM2D,
    keras.layers.ConvLSTM3D,
    keras.layers.Lambda,
)


def _activation_kind(layer: keras.layers.Layer) -> str | None:
    """The activation kind a layer's output has, or ``None`` if it has none we track."""
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) > 0.0:
            return ActivationKind.LEAKY_RELU.value
        if layer.max_value is not None and float(layer.max_value) == 6.0:
            return ActivationKind.RELU6.value
        return ActivationKind.RELU.value
    if isinstance(layer, (keras.layers.LeakyReLU, keras.layers.PReLU)):
        return ActivationKind.LEAKY_RELU.value
    if isinstance(layer, keras.layers.ELU):
        return ActivationKind.ELU.value
    if isinstance(layer, keras.layers.Softmax):
        return ActivationKind.SOFTMAX.value
    if isinstance(layer, _ACTIVATION_ATTR_LAYERS):
        fn = getattr(layer, "activation", None)
        if fn is None:
            return None
        name = getattr(fn, "__name__", type(fn).__name__)
        if name == "linear":
            return None
        return kind_from_name(name)
    return None


def _unit_axis(layer: keras.layers.Layer) -> int:
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1


def _grad_row(grad: Any) -> Any:
    """``[norm, max_abs, mean_abs, zero_frac, nonfinite, numel]`` of one gradient,
    in-graph (the parameter norm, the seventh column, comes from :func:`_param_norms`).

    Six passes over the data, the fewest that give every statistic with plain ops: a
    dot product (squared norm), ``|g|``, its max and sum, and ``sign(|g|)`` summed (the
    count of non-zero entries). As in the torch adapter, a gradient with Inf/NaN
    entries has an Inf/NaN norm, max and mean, a ``nonfinite`` flag of 1 (a lower
    bound of the count) and an unknown zero fraction (set on the host).
    """
    g = ops.reshape(ops.cast(grad, "float32"), (-1,))
    numel = max(int(np.prod(grad.shape)), 1)
    a = ops.abs(g)
    max_abs = ops.max(a)
    return ops.stack(
        [
            ops.sqrt(ops.vdot(g, g)),
            max_abs,
            ops.sum(a) / numel,
            1.0 - ops.sum(ops.sign(a)) / numel,
            ops.cast(ops.logical_not(ops.isfinite(max_abs)), "float32"),
            ops.convert_to_tensor(float(numel), "float32"),
        ]
    )


def _param_norms(variables: list[Any], sample: Any, sampled: Any = None) -> Any:
    """The L2 norm of each variable on the first 5 samples and every 5th after, NaN on
    the others: weights move slowly, and the rules take window medians of them (the
    torch adapter does the same), so four passes over the weights in five are saved."""

    def norms() -> Any:
        flats = [ops.reshape(ops.cast(v, "float32"), (-1,)) for v in variables]
        return ops.stack([ops.sqrt(ops.vdot(f, f)) for f in flats])

    def unknown() -> Any:
        return ops.full((len(variables),), math.nan, "float32")

    due = ops.logical_or(ops.less(sample, 5), ops.equal(ops.mod(sample, 5), 0))
    if sampled is not None:
        due = ops.logical_and(sampled, due)
    return ops.cond(due, norms, unknown)


def _activation_row(y: Any, kind: str, unit_axis: int, derivative_fraction: float) -> Any:
    """``[inactive, dead, tail]`` fractions of one activation output, in-graph.

    Mirrors :func:`gradwatch.activations.activation_stats_from_array` (NaN is neither
    inactive nor in a tail). For the ReLU family one pass counts each unit's inactive
    outputs, and both fractions follow from those counts.
    """
    y = ops.cast(ops.stop_gradient(y), "float32")
    zero = ops.convert_to_tensor(0.0, "float32")
    inactive_frac = dead_frac = tail_frac = zero
    if kind in CAN_DIE:
        inactive = ops.cast(ops.less_equal(y, 0.0), "float32")
        moved = ops.moveaxis(inactive, unit_axis, -1) if unit_axis != -1 else inactive
        per_unit = ops.sum(ops.reshape(moved, (-1, moved.shape[-1])), axis=0)
        rows = ops.cast(ops.size(inactive), "float32") / float(moved.shape[-1])
        inactive_frac = ops.sum(per_unit) / (rows * float(moved.shape[-1]))
        dead_frac = ops.mean(ops.cast(ops.greater_equal(per_unit, rows), "float32"))
    elif kind not in SQUASHING:  # tanh is negative half the time: "inactive" means nothing
        inactive_frac = ops.mean(ops.cast(ops.less_equal(y, 0.0), "float32"))
    if kind in CAN_SATURATE:
        lo, hi = tail_bounds(kind, derivative_fraction)
        tails = ops.logical_or(ops.less_equal(y, lo), ops.greater_equal(y, hi))
        tail_frac = ops.mean(ops.cast(tails, "float32"))
    return ops.stack([inactive_frac, dead_frac, tail_frac])


def _one_hot_where(index: Any, size: int, new: Any, old: Any) -> Any:
    """``old`` with entry ``index`` along axis 0 replaced by ``new`` (no scatter needed)."""
    mask = ops.equal(ops.arange(size, dtype="int32"), ops.cast(index, "int32"))
    mask = ops.reshape(mask, (size,) + (1,) * (len(old.shape) - 1))
    return ops.where(mask, ops.expand_dims(new, 0), old)


class _Probe:
    """The callback-owned variables the train step writes into, and their layout."""

    def ensure_grads(self, n_vars: int) -> keras.Variable:
        """The gradient ring, created on first use when the model was not built before
        fit (a subclassed model builds inside the first traced step; Keras creates
        variables there under ``tf.init_scope``, as the optimizer does)."""
        if self.grads is None:
            self.n_vars = n_vars
            self.grads = keras.Variable(
                np.zeros((self.ring, max(n_vars, 1), _GRAD_COLUMNS), np.float32),
                trainable=False,
                name="gradwatch_grads",
            )
        if n_vars > self.n_vars:
            raise RuntimeError(
                f"the optimizer applies {n_vars} gradients but the model listed "
                f"{self.n_vars} trainable variables at the start of fit"
            )
        return self.grads

    def __init__(self, n_vars: int, n_acts: int, ring: int) -> None:
        self.ring = ring
        self.n_vars = n_vars
        self.n_acts = n_acts
        kw: dict[str, Any] = {"trainable": False}
        # Optimizer steps seen in this fit.
        self.counter = keras.Variable(0, dtype="int32", name="gradwatch_counter", **kw)
        # Samples written in this fit; the ring slot of a sample is `samples % ring`.
        self.samples = keras.Variable(0, dtype="int32", name="gradwatch_samples", **kw)
        # Per slot: the step written there (-1 = never) and whether it was skipped.
        self.steps = keras.Variable(
            np.full((ring, 2), -1, np.int32), dtype="int32", name="gradwatch_steps", **kw
        )
        self.grads: keras.Variable | None = None
        if n_vars:
            self.ensure_grads(n_vars)
        self.acts: keras.Variable | None = None
        if n_acts:
            self.acts = keras.Variable(
                np.full((ring, n_acts, 3), np.nan, np.float32), name="gradwatch_acts", **kw
            )

    def state(self) -> list[tuple[str, keras.Variable]]:
        """The variables by attribute name, in the order the JAX path threads them."""
        names = ("counter", "samples", "steps", "grads", "acts")
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]


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
        _check_int("flush_every", flush_every, 1)
        _check_int("sample_every", sample_every, 1)
        _check_int("dense_until", dense_until, 0)
        if not isinstance(activations, bool):
            raise ValueError(f"activations must be True or False, got {activations!r}")
        _check_int("window", window, 1)
        if not (isinstance(on_finding, str) and on_finding in _ON_FINDING_MODES) and not (
            callable(on_finding) and not isinstance(on_finding, str)
        ):
            raise ValueError(
                f"on_finding must be one of {list(_ON_FINDING_MODES)} or a callable, "
                f"got {on_finding!r}"
            )
        if isinstance(verbose, bool) or verbose not in (0, 1):
            raise ValueError(f"verbose must be 0 or 1, got {verbose!r}")
        if not (
            isinstance(tail_derivative_fraction, (int, float))
            and 0.0 < float(tail_derivative_fraction) < 1.0
        ):
            raise ValueError(
                f"tail_derivative_fraction must be in (0, 1), got {tail_derivative_fraction!r}"
            )
        if not isinstance(strict, bool):
            raise ValueError(f"strict must be True or False, got {strict!r}")
        # Let the Analyzer validate rules and window now, not at the start of fit.
        Analyzer(rules, window=window)
        self.rules = tuple(rules)
        self.window = window
        self.flush_every = flush_every
        self.sample_every = sample_every
        self.dense_until = dense_until
        # The host-side twin of the in-graph condition in _when_sampled.
        self._schedule = every(sample_every, dense_until)
        self.activations = activations
        self.tail_derivative_fraction = float(tail_derivative_fraction)
        self.on_finding = on_finding
        self.verbose = verbose
        self.strict = strict
        self.report: Report | None = None
        self.analyzer: Analyzer | None = None
        self.last_step_stats: StepStats | None = None
        self._guard = Guard("gradwatch Keras callback", strict=strict)
        self._reset()

    # --- state -------------------------------------------------------------------------

    def _reset(self) -> None:
        self._probe: _Probe | None = None
        self._patches: list[tuple[Any, str]] = []
        # JAX: the optimizer whose `_variables` list carries the probe, and the probe.
        self._attached: tuple[Any, list[keras.Variable]] | None = None
        self._grad_names: tuple[str, ...] = ()
        self._act_layers: list[keras.layers.Layer] = []
        self._act_names: tuple[str, ...] = ()
        self._act_kinds: tuple[str, ...] = ()
        self._act_is_output: list[bool] = []
        self._act_last_out: dict[int, Any] = {}
        self._in_train_step = False
        self._last_read = -1
        self._batches_since_flush = 0
        self._flush_calls = 1
        self._pending: list[Finding] = []

    @property
    def enabled(self) -> bool:
        """False once an internal error switched monitoring off for this ``fit``."""
        return self._guard.enabled

    # --- Keras hooks ---------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.restore()  # a previous fit that raised never reached on_train_end
        self._reset()
        self._guard = Guard("gradwatch Keras callback", strict=self.strict)
        self.report = None
        self.last_step_stats = None
        self.analyzer = Analyzer(
            self.rules, window=self.window, on_finding=self._pending.append, strict=self.strict
        )
        with self._guard:
            self._install()
        if not self._guard.enabled:
            self._uninstall()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._probe is None:
            return
        if not self._guard.enabled:
            # An error (maybe while the step was traced) switched monitoring off: stop
            # paying for it too.
            self.restore()
            self._probe = None
            return
        self._batches_since_flush += 1
        if self._batches_since_flush < self._flush_calls:
            return
        self._batches_since_flush = 0
        with self._guard:
            self._flush()
        self._after_flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._probe is not None and self._guard.enabled:
            with self._guard:
                self._flush()
        self._after_flush(final=True)
        self.restore()
        if self.analyzer is None:
            return
        if self._guard.error is not None:
            self.analyzer.add_note(
                f"Monitoring stopped early after an internal error in the Keras callback: "
                f"{type(self._guard.error).__name__}: {self._guard.error}"
            )
        self.report = self.analyzer.report()
        if self.verbose:
            print(_render(self.report))

    def restore(self) -> None:
        """Undo every patch and make Keras retrace its train function. Safe to call twice;
        ``on_train_end`` calls it."""
        self._uninstall()

    # --- installing ----------------------------------------------------------------------

    def _install(self) -> None:
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
        layers = _leaf_layers(model)
        uncovered: list[str] = []
        if self.activations:
            for layer in layers:
                kind = _activation_kind(layer)
                if kind is not None and kind != ActivationKind.OTHER.value:
                    self._act_layers.append(layer)
                elif kind == ActivationKind.OTHER.value or isinstance(
                    layer, _UNCOVERED_ACTIVATION_LAYERS
                ):
                    uncovered.append(layer.name)
        else:
            self.analyzer_note("Activation monitoring is off (activations=False).")
        self._act_names = tuple(_layer_name(layer) for layer in self._act_layers)
        self._act_kinds = tuple(_activation_kind(layer) or "other" for layer in self._act_layers)
        output_layers = _functional_output_layers(model)
        self._act_is_output = [id(layer) in output_layers for layer in self._act_layers]
        if uncovered:
            self.analyzer_note(
                "Activations not monitored (applied inside recurrent cells, Lambda layers or "
                f"an unknown function): {', '.join(uncovered)}."
            )
        if self.activations and not self._act_layers:
            self.analyzer_note(
                "No activation layer found. Activations computed inside a custom call() "
                "(e.g. keras.ops.relu) are not monitored; only activation layers and "
                "`activation=` arguments are."
            )
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        # on_train_batch_end runs once per execution of `spe` steps.
        self._flush_calls = max(1, math.ceil(self.flush_every / spe))
        # Samples that can land between two reads, with slack for the final partial one
        # (every step is a sample during the dense start).
        period = 1 if self.dense_until > 0 else self.sample_every
        ring = math.ceil((self._flush_calls * spe + spe) / period) + 2
        self._probe = _Probe(len(variables), len(self._act_layers), ring)

        if backend == "jax":
            self._install_jax(model, optimizer, self._probe)
        else:
            self._patch(model, "train_step", self._wrap_train_step(model.train_step))
            self._patch(optimizer, "apply", self._wrap_apply(optimizer.apply, optimizer))
        self._patch(model, "call", self._wrap_model_call(model.call))
        for i, layer in enumerate(self._act_layers):
            self._patch(layer, "call", self._wrap_layer_call(layer.call, i))
        # The train function was built (and maybe traced) before on_train_begin: rebuild
        # it so the next trace goes through the wrappers.
        model.make_train_function(force=True)

    def _install_jax(self, model: keras.Model, optimizer: Any, probe: _Probe) -> None:
        """Thread the probe through the JAX trainer's pure train step.

        The JAX trainer passes every variable in as state and takes the new values back
        out; a variable outside that state is a constant to ``jax.jit`` and writes to it
        are lost. So for the duration of ``fit`` the probe variables are appended to the
        optimizer's variables (the innermost optimizer's, so they come last in
        ``optimizer.variables``), and ``optimizer.stateless_apply`` is wrapped to
        return their new values next to the optimizer's own. Activation outputs exist
        only inside ``jax.value_and_grad``: ``compute_loss_and_updates`` reduces them
        there and hands the table out as one extra entry of its non-trainable-variable
        output, which the ``train_step`` wrapper removes and writes into the probe.
        """
        if getattr(keras.config, "is_nnx_enabled", lambda: False)():
            # NNX's jit calls type(model).train_step, past the instance wrapper.
            raise NotImplementedError("GradWatchCallback does not support Flax NNX mode")
        if probe.grads is None:
            raise RuntimeError("the model has no trainable variables at the start of fit")
        if not optimizer.built:
            raise RuntimeError("the optimizer was not built before fit started")
        # The optimizer and its wrapped ones (LossScaleOptimizer), outermost first.
        chain = [optimizer]
        while getattr(chain[-1], "inner_optimizer", None) is not None:
            chain.append(chain[-1].inner_optimizer)
        owner = chain[-1]
        names = [name for name, _ in probe.state()]
        ours = [v for _, v in probe.state()]
        owner._variables.extend(ours)
        self._attached = (owner, ours)
        tail = list(optimizer.variables)[-len(ours) :]
        if len(tail) != len(ours) or any(a is not b for a, b in zip(tail, ours, strict=True)):
            raise RuntimeError(
                f"{type(optimizer).__name__}.variables does not end with the variables "
                f"appended to {type(owner).__name__}; its state cannot carry the probe"
            )
        for opt in chain:
            # A checkpoint saved (or restored) during fit must not see the probe.
            for method in ("save_own_variables", "load_own_variables"):
                self._patch(opt, method, self._without_probe(getattr(opt, method)))
        self._patch(
            optimizer,
            "stateless_apply",
            self._wrap_stateless_apply(optimizer.stateless_apply, optimizer, probe, names),
        )
        acts = probe.acts is not None
        if acts and type(model).train_step is not keras.Model.train_step:
            acts = False
            self.analyzer_note(
                "Activations not monitored: on the JAX backend they are read through "
                "Keras' own train_step, which this model overrides."
            )
        if acts:
            self._patch(
                model,
                "compute_loss_and_updates",
                self._wrap_compute_loss(model.compute_loss_and_updates, probe, len(names)),
            )
        self._patch(
            model,
            "train_step",
            self._wrap_jax_train_step(model.train_step, model, probe, names, acts),
        )

    def analyzer_note(self, note: str) -> None:
        if self.analyzer is not None:
            self.analyzer.add_note(note)

    def _patch(self, obj: Any, name: str, fn: Callable[..., Any]) -> None:
        # Straight into the instance __dict__: bypasses Keras' attribute tracking and
        # torch.nn.Module.__setattr__, and `pop` restores the class method exactly.
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on the instance")
        vars(obj)[name] = fn
        self._patches.append((obj, name))

    def _uninstall(self) -> None:
        patches, self._patches = self._patches, []
        attached, self._attached = self._attached, None
        model = getattr(self, "_model", None)
        sync = getattr(model, "jax_state_sync", None)
        if attached is not None and callable(sync):
            # Mid-fit (an error, on_finding="raise"): write the live state back to the
            # variables, so the next step rebuilds its state without the probe.
            sync()
        for obj, name in reversed(patches):
            vars(obj).pop(name, None)
        if attached is not None:
            owner, ours = attached
            owner._variables[:] = [v for v in owner._variables if not _is_any(v, ours)]
        if patches and model is not None:
            # Drop the traced graph that contains our statistics; fit rebuilds it.
            model.train_function = None
            if getattr(model, "make_train_function", None) is not None:
                model.make_train_function(force=True)

    # --- in-graph wrappers -----------------------------------------------------------------

    def _wrap_train_step(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
        def train_step_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            self._in_train_step = True
            try:
                return train_step(*args, **kwargs)
            finally:
                self._in_train_step = False
                self._act_last_out.clear()

        return train_step_with_gradwatch

    def _wrap_model_call(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def model_call_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            outputs = call(*args, **kwargs)
            if self._in_train_step and self._act_last_out and self._guard.enabled:
                with self._guard:
                    flat = {id(t) for t in keras.tree.flatten(outputs)}
                    for i, y in self._act_last_out.items():
                        if id(y) in flat:
                            self._act_is_output[i] = True
            return outputs

        return model_call_with_gradwatch

    def _wrap_layer_call(self, call: Callable[..., Any], index: int) -> Callable[..., Any]:
        def layer_call_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            y = call(*args, **kwargs)
            if self._in_train_step and self._probe is not None and self._guard.enabled:
                # Only remembered here; reduced in the optimizer step's one sampled
                # branch (see _record_gradients), so an unsampled step runs one
                # condition in all, not one per activation layer.
                self._act_last_out[index] = y
            return y

        return layer_call_with_gradwatch

    def _wrap_apply(self, apply: Callable[..., Any], optimizer: Any) -> Callable[..., Any]:
        def apply_with_gradwatch(grads: Any, trainable_variables: Any = None) -> Any:
            probe = self._probe
            if probe is not None and self._guard.enabled:
                with self._guard:
                    tvs = (
                        optimizer._trainable_variables
                        if trainable_variables is None
                        else trainable_variables
                    )
                    self._record_gradients(probe, optimizer, list(grads), list(tvs))
            return apply(grads, trainable_variables)

        return apply_with_gradwatch

    def _without_probe(self, method: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def without_gradwatch(store: Any) -> Any:
            attached = self._attached
            if attached is None:
                return method(store)
            owner, ours = attached
            kept = list(owner._variables)
            owner._variables[:] = [v for v in kept if not _is_any(v, ours)]
            try:
                return method(store)
            finally:
                owner._variables[:] = kept

        return without_gradwatch

    def _wrap_stateless_apply(
        self, stateless_apply: Callable[..., Any], optimizer: Any, probe: _Probe, names: list[str]
    ) -> Callable[..., Any]:
        def stateless_apply_with_gradwatch(
            optimizer_variables: Any, grads: Any, trainable_variables: Any
        ) -> Any:
            new = None
            if self._guard.enabled:
                with self._guard:
                    new = self._record_gradients_jax(
                        probe,
                        optimizer,
                        names,
                        list(optimizer_variables),
                        list(grads),
                        list(trainable_variables),
                    )
                    import jax

                    # Statistics first, then the update (which overwrites the donated
                    # weights in place): without this order XLA on CPU took ~20% longer
                    # per MLP step, unsampled steps included.
                    new, grads, trainable_variables = jax.lax.optimization_barrier(
                        (new, list(grads), list(trainable_variables))
                    )
            new_trainable, new_optimizer = stateless_apply(
                optimizer_variables, grads, trainable_variables
            )
            if new is not None:
                new_optimizer = list(new_optimizer)
                base = len(new_optimizer) - len(names)
                for i, name in enumerate(names):
                    if name in new:
                        new_optimizer[base + i] = new[name]
            return new_trainable, new_optimizer

        return stateless_apply_with_gradwatch

    def _record_gradients_jax(
        self,
        probe: _Probe,
        optimizer: Any,
        names: list[str],
        values: list[Any],
        grads: list[Any],
        params: list[Any],
    ) -> dict[str, Any]:
        """JAX: the probe's values after this step by name, from ``values`` (this step's
        optimizer state, whose last ``len(names)`` entries are the probe's)."""
        base = len(values) - len(names)
        current = dict(zip(names, values[base:], strict=True))
        scale = _loss_scale(optimizer)
        if isinstance(scale, keras.Variable):
            # The value in this step's state; the variable itself holds no value now.
            index = next(i for i, v in enumerate(optimizer.variables) if v is scale)
            scale = values[index]
        dynamic = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        refs = list(optimizer._trainable_variables)
        present = [
            (g, p, ref) for g, p, ref in zip(grads, params, refs, strict=True) if g is not None
        ]
        probe.ensure_grads(len(present))
        self._grad_names = tuple(_var_name(ref) for _, _, ref in present)
        step = current["counter"]
        written = ("grads", "steps", "samples")
        weights = [p for _, p, _ in present]
        # Not nested in the sampled branch: there XLA on CPU made unsampled MLP steps ~1.6x.
        sampled = None if self.sample_every == 1 else self._is_sampled(step)
        norms = _param_norms(weights, current["samples"], sampled) if present else None
        new = self._if_sampled(
            step,
            lambda: self._sample(
                probe,
                current,
                step,
                [g for g, _, _ in present],
                weights,
                scale,
                dynamic,
                None,
                norms,
            ),
            lambda: {name: current[name] for name in written},
        )
        new["counter"] = step + 1
        return new

    def _wrap_compute_loss(
        self, compute_loss_and_updates: Callable[..., Any], probe: _Probe, n_probe: int
    ) -> Callable[..., Any]:
        def compute_loss_and_updates_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            loss, aux = compute_loss_and_updates(*args, **kwargs)
            optimizer_variables = kwargs.get("optimizer_variables")
            if not (self._in_train_step and kwargs.get("training") and optimizer_variables):
                return loss, aux
            outputs = dict(self._act_last_out)

            def missing() -> Any:
                return ops.full((probe.n_acts, 3), math.nan, "float32")

            table = None
            if self._guard.enabled:
                with self._guard:
                    # The outputs are tracers of jax.value_and_grad: reduced in here, on
                    # sampled steps only (the probe's counter is in the optimizer state).
                    step = optimizer_variables[len(optimizer_variables) - n_probe]
                    table = self._if_sampled(
                        step, lambda: self._activation_table(probe.n_acts, outputs), missing
                    )
            if table is None:
                table = missing()
            unscaled_loss, y_pred, non_trainable, metrics = aux
            return loss, (unscaled_loss, y_pred, [*non_trainable, table], metrics)

        return compute_loss_and_updates_with_gradwatch

    def _wrap_jax_train_step(
        self,
        train_step: Callable[..., Any],
        model: keras.Model,
        probe: _Probe,
        names: list[str],
        acts: bool,
    ) -> Callable[..., Any]:
        def train_step_with_gradwatch(state: Any, data: Any) -> Any:
            self._in_train_step = True
            try:
                logs, new_state = train_step(state, data)
            finally:
                self._in_train_step = False
                self._act_last_out.clear()
            if not acts:
                return logs, new_state
            trainable, non_trainable, optimizer_state, metrics = new_state
            if len(non_trainable) != len(model.non_trainable_variables) + 1:
                return logs, new_state
            # The activation table compute_loss_and_updates appended: not model state.
            table = non_trainable[-1]
            non_trainable = list(non_trainable[:-1])
            if self._guard.enabled:
                with self._guard:
                    before = dict(zip(names, state[2][len(state[2]) - len(names) :], strict=True))
                    index = len(optimizer_state) - len(names) + names.index("acts")
                    optimizer_state = list(optimizer_state)
                    old = optimizer_state[index]
                    slot = ops.mod(before["samples"], probe.ring)
                    written = _one_hot_where(slot, probe.ring, table, old)
                    if self.sample_every > 1:
                        written = ops.where(self._is_sampled(before["counter"]), written, old)
                    optimizer_state[index] = written
            return logs, (trainable, non_trainable, optimizer_state, metrics)

        return train_step_with_gradwatch

    def _record_gradients(
        self, probe: _Probe, optimizer: Any, grads: list[Any], variables: list[Any]
    ) -> None:
        """TensorFlow and torch: reduce this step's gradients into the probe variables,
        assigned in place inside the sampled branch."""
        # Read before `apply`, which may change LossScaleOptimizer's dynamic scale.
        scale = _loss_scale(optimizer)
        dynamic = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        present = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        grad_ring = probe.ensure_grads(len(present))
        # A variable the loss does not depend on has no gradient to judge: left out.
        self._grad_names = tuple(_var_name(v) for _, v in present)
        step = probe.counter.value
        # This step's activation outputs, recorded by the layer wrappers during its
        # forward pass (the same traced step, so they can be used here).
        outputs = dict(self._act_last_out)
        acts = probe.acts

        def write() -> None:
            current = {"grads": grad_ring.value, "steps": probe.steps.value}
            current["samples"] = probe.samples.value
            if acts is not None:
                current["acts"] = acts.value
            new = self._sample(
                probe,
                current,
                step,
                [g for g, _ in present],
                [v for _, v in present],
                scale,
                dynamic,
                None if acts is None else lambda: self._activation_table(probe.n_acts, outputs),
            )
            for name, value in new.items():
                getattr(probe, name).assign(value)

        self._when_sampled(step, write)
        probe.counter.assign(step + 1)

    def _sample(
        self,
        probe: _Probe,
        current: dict[str, Any],
        step: Any,
        grads: list[Any],
        params: list[Any],
        scale: Any,
        dynamic: bool,
        activation_table: Callable[[], Any] | None,
        param_norms: Any = None,
    ) -> dict[str, Any]:
        """New values of the rings (``grads``, ``steps``, ``acts``) and of ``samples``
        after writing one sample, from their ``current`` values. Pure, so the TensorFlow
        and torch path assigns the result and the JAX path returns it as state."""
        rows = []
        for g in grads:
            if scale is not None:
                g = ops.divide(ops.cast(g, "float32"), ops.cast(scale, "float32"))
            rows.append(_grad_row(g))
        samples = current["samples"]
        table = (
            ops.zeros((0, _GRAD_COLUMNS), "float32")
            if not rows
            else ops.concatenate(
                [
                    ops.stack(rows),
                    ops.expand_dims(
                        _param_norms(params, samples) if param_norms is None else param_norms, -1
                    ),
                ],
                axis=1,
            )
        )
        # Rows in call order (model order), zero-padded to the probe's fixed shape.
        padding = probe.n_vars - len(rows)
        if padding:
            table = ops.concatenate([table, ops.zeros((padding, _GRAD_COLUMNS), "float32")], axis=0)
        slot = ops.mod(samples, probe.ring)
        if dynamic and rows:
            skipped = ops.cast(ops.greater(ops.sum(table[:, _NONFINITE]), 0.0), "int32")
        else:
            skipped = ops.convert_to_tensor(0, "int32")
        new = {
            "grads": _one_hot_where(slot, probe.ring, table, current["grads"]),
            "steps": _one_hot_where(slot, probe.ring, ops.stack([step, skipped]), current["steps"]),
        }
        if activation_table is not None:
            new["acts"] = _one_hot_where(slot, probe.ring, activation_table(), current["acts"])
        new["samples"] = samples + 1
        return new

    def _activation_table(self, n_acts: int, outputs: dict[int, Any]) -> Any:
        """``(n_acts, 3)`` activation fractions of this step; NaN rows for layers that
        did not run in it."""
        frac = self.tail_derivative_fraction
        missing = ops.full((3,), math.nan, "float32")
        rows = []
        for i in range(n_acts):
            y = outputs.get(i)
            if y is None:
                rows.append(missing)
                continue
            layer = self._act_layers[i]
            rows.append(_activation_row(y, self._act_kinds[i], _unit_axis(layer), frac))
        return ops.stack(rows)

    def _sampled(self, step: int) -> bool:
        """The schedule on the host: is ``step`` one of the sampled steps?"""
        return self._schedule(step)

    def _is_sampled(self, step: Any) -> Any:
        """The in-graph twin of :meth:`_sampled`."""
        return ops.logical_or(
            ops.less(step, self.dense_until), ops.equal(ops.mod(step, self.sample_every), 0)
        )

    def _when_sampled(self, step: Any, write: Callable[[], None]) -> None:
        """Run ``write`` in the traced step only on sampled steps (see :meth:`_sampled`)."""
        if self.sample_every == 1:
            write()
            return
        ops.cond(self._is_sampled(step), write, lambda: None)

    def _if_sampled(self, step: Any, compute: Callable[[], Any], keep: Callable[[], Any]) -> Any:
        """``compute()`` on sampled steps, ``keep()`` on the others: the pure form of
        :meth:`_when_sampled` for JAX, where a branch may not assign variables."""
        if self.sample_every == 1:
            return compute()
        return ops.cond(self._is_sampled(step), compute, keep)

    # --- host side ---------------------------------------------------------------------------

    def _flush(self) -> None:
        probe, analyzer = self._probe, self.analyzer
        if probe is None or analyzer is None:
            return
        sync = getattr(self._model, "jax_state_sync", None)
        if callable(sync):
            # JAX keeps the live state outside the variables during an epoch.
            sync()
        steps = _to_host(probe.steps)
        fresh = np.flatnonzero(steps[:, 0] > self._last_read)
        if fresh.size == 0:
            return
        fresh = fresh[np.argsort(steps[fresh, 0])]
        if probe.grads is None:
            return
        grads = _to_host(probe.grads).astype(np.float64)
        acts = _to_host(probe.acts).astype(np.float64) if probe.acts is not None else None
        first = int(steps[fresh[0], 0])
        expected = next(s for s in range(self._last_read + 1, first + 1) if self._sampled(s))
        if first != expected:
            analyzer.add_note(
                f"Samples of steps {expected}..{first - 1} were overwritten before they "
                f"were read; lower flush_every (now {self.flush_every})."
            )
        self._last_read = int(steps[fresh[-1], 0])
        n = len(self._grad_names)
        batch = []
        for slot in fresh:
            batch.append(
                self._step_stats(
                    int(steps[slot, 0]),
                    bool(steps[slot, 1]),
                    grads[slot, :n],
                    None if acts is None else acts[slot],
                )
            )
        self.last_step_stats = batch[-1]
        analyzer.observe_stats(batch)

    def _step_stats(
        self, step: int, skipped: bool, g: np.ndarray, a: np.ndarray | None
    ) -> StepStats:
        if skipped:
            return StepStats(step=step, skipped_step=True)
        act_fields: dict[str, Any] = {}
        if a is not None:
            seen = np.flatnonzero(~np.isnan(a).any(axis=1))
            if seen.size:
                act_fields = {
                    "act_layers": tuple(self._act_names[i] for i in seen),
                    "act_kinds": tuple(self._act_kinds[i] for i in seen),
                    "act_inactive_frac": tuple(float(v) for v in a[seen, 0]),
                    "act_dead_frac": tuple(float(v) for v in a[seen, 1]),
                    "act_tail_frac": tuple(float(v) for v in a[seen, 2]),
                    "act_is_output": tuple(bool(self._act_is_output[i]) for i in seen),
                }
        return StepStats(
            step=step,
            grad_layers=self._grad_names,
            grad_norm=tuple(float(v) for v in g[:, _NORM]),
            grad_max_abs=tuple(float(v) for v in g[:, _MAX_ABS]),
            grad_mean_abs=tuple(float(v) for v in g[:, _MEAN_ABS]),
            # With Inf/NaN entries the zero fraction means nothing: unknown.
            grad_zero_frac=tuple(
                math.nan if bad > 0 else float(v)
                for v, bad in zip(g[:, _ZERO_FRAC], g[:, _NONFINITE], strict=True)
            ),
            grad_nonfinite=tuple(round(v) for v in g[:, _NONFINITE]),
            grad_numel=tuple(round(v) for v in g[:, _NUMEL]),
            param_norm=tuple(float(v) for v in g[:, _PARAM_NORM]),
            **act_fields,
        )

    def _after_flush(self, final: bool = False) -> None:
        pending, self._pending[:] = list(self._pending), []
        for finding in pending:
            self._dispatch(finding, final)

    def _dispatch(self, finding: Finding, final: bool) -> None:
        mode = self.on_finding
        if callable(mode):
            mode(finding)
            return
        serious = SEVERITY_RANK[finding.severity] >= SEVERITY_RANK["warning"]
        if mode == "ignore" or not serious:
            return
        text = f"gradwatch {finding.rule} (step {finding.first_step}): {finding.message}"
        if mode == "raise" and not final:
            # fit will not reach on_train_end: restore and keep the report now.
            self.restore()
            if self.analyzer is not None:
                self.report = self.analyzer.report()
            raise FindingError(finding)
        if mode == "stop" and not final:
            self.model.stop_training = True
            text += " Stopping training (on_finding='stop')."
        warnings.warn(text, GradwatchWarning, stacklevel=2)


def _loss_scale(optimizer: Any) -> Any:
    """What ``optimizer`` divides the gradients by: LossScaleOptimizer's dynamic scale
    (a variable), a fixed ``loss_scale_factor``, or ``None``."""
    scale = getattr(optimizer, "dynamic_scale", None)
    if scale is None:
        scale = getattr(optimizer, "loss_scale_factor", None)
    return scale


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _to_host(variable: keras.Variable) -> np.ndarray:
    """One device-to-host copy of a probe variable (tf.Tensor, torch.Tensor or a JAX
    array)."""
    value = variable.value
    detach = getattr(value, "detach", None)
    if callable(detach):  # torch
        value = detach().cpu()
    numpy = getattr(value, "numpy", None)
    return np.asarray(numpy() if callable(numpy) else value)


def _is_any(variable: Any, candidates: list[Any]) -> bool:
    # By identity: `==` on Keras variables compares their values elementwise.
    return any(variable is c for c in candidates)


def _layer_name(layer: keras.layers.Layer) -> str:
    # Same naming as the variables (`sequential/dense`), so activations and gradients match.
    return str(getattr(layer, "path", None) or layer.name)


def _var_name(variable: Any) -> str:
    return str(getattr(variable, "path", None) or getattr(variable, "name", "variable"))


def _leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer inside ``model``, depth first in model order, without the containers."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        layers = list(flatten(include_self=False, recursive=True))
    else:  # pragma: no cover - every Keras 3 layer has _flatten_layers
        layers = list(model.layers)
    return [layer for layer in layers if not isinstance(layer, keras.Model)]


def _functional_output_layers(model: keras.Model) -> set[int]:
    """ids of the layers producing a Functional/Sequential model's outputs."""
    found: set[int] = set()
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return found
    for tensor in keras.tree.flatten(outputs or []):
        history = getattr(tensor, "_keras_history", None)
        operation = getattr(history, "operation", None)
        if operation is not None:
            found.add(id(operation))
    return found


def _render(report: Report) -> str:
    try:
        return report.render(width=80)
    except Exception:  # the renderer is optional for the callback: never lose the report
        lines = [f"gradwatch: {report.steps_observed} steps observed"]
        if report.healthy:
            lines.append("  gradient flow looks healthy")
        for f in report.findings:
            lines.append(f"  [{f.severity}] {f.rule}: {f.message}")
            lines.extend(f"      fix: {fix.text}" for fix in f.fixes[:2])
        lines.extend(f"  note: {note}" for note in report.notes)
        return "\n".join(lines)

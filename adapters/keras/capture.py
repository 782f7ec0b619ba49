"""In-graph capture: the patches that reduce a train step's gradients into the probe.

Owns the patches of one ``fit`` and their removal. :class:`Capture` holds what every
backend shares: instance-attribute patching, the layer wrappers that remember
activation outputs during the traced step, and the sampled branch.
:class:`TensorCapture` is the TensorFlow and torch path: it wraps the ``apply`` of
every optimizer the model holds and assigns the probe variables in place (the JAX
path, which must thread them as state, is :mod:`gradwatch.adapters.keras.capture_jax`).
Steps not sampled that are due (every ``norm_every``-th) take only their total
gradient norm, one fused reduction per gradient in a branch of their own, kept in the
probe's norm ring until the flush.

Because the wrappers are Python, they act when the train function is traced;
installing and uninstalling both force a retrace, so a later ``fit`` without the
callback runs the original graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
from gradwatch.adapters.keras.layers import ActivationLayers, var_name
from gradwatch.adapters.keras.ops_capture import OpsCapture, activation_table
from gradwatch.adapters.keras.probe import Probe, grad_table, loss_scale, write_norm
from gradwatch.adapters.keras.recurrence import (
    RecurrentLayers,
    TimeGrads,
    backend_tap,
    measurable,
    time_table,
)
from gradwatch.adapters.keras.reductions import (
    _combined_norm,
    _grad_norms,
    _is_norm_due,
    _is_sampled,
    _one_hot_rows_where,
    _one_hot_where,
    norm_due,
)
from keras import ops

from gradwatch.guard import Guard
from gradwatch.rows import NONFINITE


class Capture:
    """The patches of one ``fit`` on one model, and the state they share while traced.

    Args:
        probe: the variables the sampled branch writes.
        guard: switches capture off after an internal error (the run's guard).
        acts: the watched activation layers; ``acts.is_output`` is completed here.
        sample_every, dense_until: the sampling schedule (see
            :class:`gradwatch.every`).
        tail_derivative_fraction: passed to the activation reductions.
        note: adds a coverage note to the report.
        live: whether the ``fit`` that installed the patches is still running; a
            wrapper reached outside it (that ``fit`` raised) records nothing.
        rnns: the recurrent layers measured through time (the gradients reaching their
            initial state and their last output). Defaults to none.
    """

    def __init__(
        self,
        probe: Probe,
        guard: Guard,
        acts: ActivationLayers,
        *,
        sample_every: int,
        dense_until: int,
        tail_derivative_fraction: float,
        note: Callable[[str], None],
        live: Callable[[], bool] = lambda: True,
        rnns: RecurrentLayers | None = None,
    ) -> None:
        self.probe = probe
        self.guard = guard
        self.acts = acts
        self.sample_every = sample_every
        self.dense_until = dense_until
        self.tail_derivative_fraction = tail_derivative_fraction
        self.note = note
        self.live = live
        # Names of the variables that had a gradient, in row order (set when traced).
        self.grad_names: tuple[str, ...] = ()
        self._patches: list[tuple[Any, str]] = []
        self._act_last_out: dict[int, Any] = {}
        self._in_train_step = False
        # Through time: what each recurrent layer's taps handed over in this step (a
        # shared layer is tapped at its first call).
        self.rnns = rnns
        self._tap = backend_tap(keras.backend.backend()) if rnns else None
        self._time_grads: dict[int, TimeGrads] = {}
        # keras.ops activations inside custom calls: only when the model may have some.
        self.ops: OpsCapture | None = None
        if acts.site_capacity:
            self.ops = OpsCapture(acts, guard, self._act_last_out, tail_derivative_fraction)

    # --- installing ------------------------------------------------------------------

    def install(self, model: keras.Model, optimizers: Sequence[Any]) -> None:
        """Patch ``model``, the ``optimizers`` that apply its gradients
        (``model.optimizer`` first) and its activation layers; force a retrace."""
        self._install_backend(model, optimizers)
        self.patch(model, "call", self._wrap_model_call(model.call))
        for i, layer in enumerate(self.acts.layers):
            self.patch(layer, "call", self._wrap_layer_call(layer.call, i))
        for i, layer in enumerate(self.rnns.layers if self.rnns else ()):
            self.patch(layer, "call", self._wrap_rnn_call(layer.call, i))
        # The train function was built (and maybe traced) before on_train_begin: rebuild
        # it so the next trace goes through the wrappers.
        model.make_train_function(force=True)

    def _install_backend(self, model: keras.Model, optimizers: Sequence[Any]) -> None:
        raise NotImplementedError

    def patch(self, obj: Any, name: str, fn: Callable[..., Any]) -> None:
        # Straight into the instance __dict__: bypasses Keras' attribute tracking and
        # torch.nn.Module.__setattr__, and `pop` restores the class method exactly.
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on the instance")
        vars(obj)[name] = fn
        self._patches.append((obj, name))

    def uninstall(self, model: keras.Model | None) -> None:
        """Undo every patch and drop the traced graph. Safe to call twice."""
        patches, self._patches = self._patches, []
        for obj, name in reversed(patches):
            vars(obj).pop(name, None)
        if patches and model is not None:
            # Drop the traced graph that contains our statistics; fit rebuilds it.
            model.train_function = None
            if getattr(model, "make_train_function", None) is not None:
                model.make_train_function(force=True)

    # --- shared wrappers -------------------------------------------------------------

    @contextlib.contextmanager
    def _train_step(self) -> Iterator[None]:
        """Marks the traced train step, so layer calls outside it (validation) are ignored;
        so is a train step of a later ``fit`` that runs after this one died."""
        self._in_train_step = self.live()
        self._time_grads.clear()
        try:
            yield
        finally:
            self._in_train_step = False
            self._act_last_out.clear()
            self._time_grads.clear()

    def _ops_scope(self, sampled: Any) -> contextlib.AbstractContextManager[None]:
        """Intercept ``keras.ops`` activations while the step runs or is traced, unless it
        is known on the host to be unsampled (torch), where it costs nothing."""
        if self.ops is None or sampled is False or not (self._in_train_step and self.guard.enabled):
            return contextlib.nullcontext()
        scope: contextlib.AbstractContextManager[None] = self.ops.active()
        return scope

    def _wrap_model_call(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def model_call_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            outputs = call(*args, **kwargs)
            if self._in_train_step and self._act_last_out and self.guard.enabled:
                with self.guard:
                    flat = {id(t) for t in keras.tree.flatten(outputs)}
                    for i, y in self._act_last_out.items():
                        if id(y) in flat:
                            self.acts.is_output[i] = True
            return outputs

        return model_call_with_gradwatch

    def _wrap_layer_call(self, call: Callable[..., Any], index: int) -> Callable[..., Any]:
        def layer_call_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            y = call(*args, **kwargs)
            if self._in_train_step and self.guard.enabled:
                # Only remembered here; reduced in the one sampled branch at the end
                # of the step (TensorCapture._end_step; JAX: compute_loss_and_updates),
                # so an unsampled step runs no condition per activation layer.
                self._act_last_out[index] = y
            return y

        return layer_call_with_gradwatch

    def _wrap_rnn_call(self, call: Callable[..., Any], index: int) -> Callable[..., Any]:
        def rnn_call_with_gradwatch(sequences: Any, *args: Any, **kwargs: Any) -> Any:
            tapped = None
            if self._in_train_step and self.guard.enabled and self._tap_due():
                with self.guard:
                    tapped = self._tap_state(index, sequences, args, dict(kwargs))
            record = None
            if tapped is not None:
                # All by keyword now, the initial state through its tap.
                record, kwargs, args = tapped[0], tapped[1], ()
            outputs = call(sequences, *args, **kwargs)
            if record is not None and self.guard.enabled:
                with self.guard:
                    outputs = self._tap_output(index, record, outputs)
            return outputs

        return rnn_call_with_gradwatch

    def _tap_due(self) -> bool:
        """Whether this train step's recurrent layers are tapped (TensorFlow, JAX: every
        traced step, the reduction being in the sampled branch)."""
        return True

    def _tap_state(
        self, index: int, sequences: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[TimeGrads, dict[str, Any]] | None:
        """The record the taps fill and the call's keyword arguments, the initial state
        through the backend's tap; ``None`` when the call is not measured."""
        rnns, tap = self.rnns, self._tap
        if rnns is None or tap is None or index in self._time_grads:
            return None
        layer = rnns.layers[index]
        if not measurable(layer, sequences) or len(args) > len(_RNN_CALL_ARGS):
            return None
        kwargs.update(zip(_RNN_CALL_ARGS, args, strict=False))  # RNN.call's order
        state = kwargs.get("initial_state")
        if state is None:
            state = layer.get_initial_state(batch_size=ops.shape(sequences)[0])
        mask = kwargs.get("mask")
        record = self._time_grads[index] = TimeGrads(sequences, mask)
        anchor = rnns.anchors[index].value
        kwargs["initial_state"] = keras.tree.map_structure(
            lambda s: tap(s, anchor, record.first.append), state
        )
        return record, kwargs

    def _tap_output(self, index: int, record: TimeGrads, outputs: Any) -> Any:
        """The layer's ``outputs`` with the output (not the returned states) tapped."""
        assert self.rnns is not None and self._tap is not None
        anchor = self.rnns.anchors[index].value

        def report(grad: Any) -> None:
            if record.last is None:
                record.last = grad

        if isinstance(outputs, (list, tuple)):
            return type(outputs)([self._tap(outputs[0], anchor, report), *outputs[1:]])
        return self._tap(outputs, anchor, report)

    def _time_table(self, grads: dict[int, TimeGrads]) -> Any:
        """``(n_rnns, TIME_ROWS + 1)`` through-time rows of this step (NaN: not seen).

        A gradient the step cannot reach (a custom ``train_step`` that differentiates
        inside a nested ``tf.function`` or ``jax.jit``, whose tensors stay there) turns
        the through-time measurement off with a note; the rest of monitoring goes on."""
        assert self.rnns is not None
        try:
            return time_table(grads, len(self.rnns))
        except Exception as error:
            if self.guard.strict:
                raise
            self._tap = None
            self.note(
                "The gradient through time of recurrent layers is not measured: their "
                f"state and output gradients are out of the train step's reach "
                f"({type(error).__name__})."
            )
            return time_table({}, len(self.rnns))

    def _activation_table(self, outputs: dict[int, Any]) -> Any:
        """``(n_acts, 3)`` activation fractions of this step; NaN rows for layers that
        did not run in it."""
        return activation_table(outputs, self.acts, self.tail_derivative_fraction)

    # --- the sampled branch ------------------------------------------------------------

    def _is_sampled(self, step: Any) -> Any:
        """In-graph: is ``step`` sampled (the host twin is :class:`gradwatch.every`)?"""
        return _is_sampled(step, self.sample_every, self.dense_until)

    def _if_sampled(self, step: Any, compute: Callable[[], Any], keep: Callable[[], Any]) -> Any:
        """``compute()`` on sampled steps, ``keep()`` on the others (JAX: a branch may
        not assign variables, it returns their new values)."""
        if self.sample_every == 1:
            return compute()
        return ops.cond(self._is_sampled(step), compute, keep)

    def _is_norm_due(self, step: Any) -> Any:
        """In-graph: does ``step`` take only its total norm (see :func:`_is_norm_due`)?"""
        return _is_norm_due(step, self.sample_every, self.dense_until, self.probe.norm_every)


# keras.layers.RNN.call(sequences, initial_state=None, mask=None, training=False).
_RNN_CALL_ARGS = ("initial_state", "mask", "training")


class _StepState:
    """What the train step being run (or traced) has read and written so far."""

    def __init__(self, step: Any, samples: Any, sampled: Any, ring: int, due: Any) -> None:
        self.step = step
        self.samples = samples
        self.slot = ops.mod(samples, ring)
        # In-graph conditions, or Python bools when known on the host (torch): sampled
        # per variable, or due for the total norm only (None: no norm steps).
        self.sampled = sampled
        self.due = due
        self.names: list[str] = []
        self.skips: list[Any] = []
        self.applies = 0
        # Per apply: its gradients' norms (unscaled) and whether its scaler skips the step.
        self.norm_parts: list[Any] = []
        self.norm_skips: list[Any] = []


class TensorCapture(Capture):
    """TensorFlow and torch: each optimizer's ``apply`` reduces the gradients it is
    handed into its own rows of the probe, assigned in place inside the sampled
    branch. A custom ``train_step`` may call several (a GAN's ``d_optimizer`` and
    ``g_optimizer``): each writes the rows of the variables it applies, under their
    own names, and the end of the train step writes the step, the activations and
    advances the counters. One train step is one step, however many optimizers it calls.
    """

    _step_state: _StepState | None = None
    _model: keras.Model | None = None

    def _install_backend(self, model: keras.Model, optimizers: Sequence[Any]) -> None:
        self._model = model
        self.patch(model, "train_step", self._wrap_train_step(model.train_step))
        for optimizer in optimizers:
            self.patch(optimizer, "apply", self._wrap_apply(optimizer.apply, optimizer))

    def uninstall(self, model: keras.Model | None) -> None:
        super().uninstall(model)
        self._model = None

    def _wrap_train_step(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
        def train_step_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            with self._train_step():
                state = None
                if self._in_train_step and self.guard.enabled:
                    with self.guard:
                        state = self._begin_step()
                self._step_state = state
                try:
                    with self._ops_scope(False if state is None else state.sampled):
                        outputs = train_step(*args, **kwargs)
                finally:
                    self._step_state = None
                if state is not None and self.guard.enabled:
                    with self.guard:
                        self._end_step(state)
                return outputs

        return train_step_with_gradwatch

    def _wrap_apply(self, apply: Callable[..., Any], optimizer: Any) -> Callable[..., Any]:
        def apply_with_gradwatch(grads: Any, trainable_variables: Any = None) -> Any:
            state = self._step_state
            grads = list(grads)  # read twice: once here, once by `apply`
            if trainable_variables is not None:
                trainable_variables = list(trainable_variables)
            if state is not None and self.guard.enabled:
                with self.guard:
                    tvs = (
                        optimizer._trainable_variables
                        if trainable_variables is None
                        else trainable_variables
                    )
                    self._record_gradients(state, optimizer, grads, list(tvs))
            return apply(grads, trainable_variables)

        return apply_with_gradwatch

    def _tap_due(self) -> bool:
        state = self._step_state
        return state is not None and state.sampled is not False

    def _begin_step(self) -> _StepState:
        probe = self.probe
        step = probe.counter.value
        sampled: Any = True if self.sample_every == 1 else self._is_sampled(step)
        due: Any = None if probe.norms is None else self._is_norm_due(step)
        if keras.backend.backend() == "torch" and not isinstance(sampled, bool):
            # Eager: one host read per step, not one per optimizer and one at the end.
            at = int(ops.convert_to_numpy(step))
            sampled = at < self.dense_until or at % self.sample_every == 0
            if due is not None:
                due = norm_due(at, self.sample_every, self.dense_until, probe.norm_every)
        return _StepState(step, probe.samples.value, sampled, probe.ring, due)

    def _when(self, sampled: Any, compute: Callable[[], Any], keep: Callable[[], Any]) -> Any:
        if isinstance(sampled, bool):
            return compute() if sampled else keep()
        return ops.cond(sampled, compute, keep)

    def _record_gradients(
        self, state: _StepState, optimizer: Any, grads: list[Any], variables: list[Any]
    ) -> None:
        """Reduce the gradients of one ``apply`` into their rows of this step's slot."""
        probe = self.probe
        # Read before `apply`, which may change LossScaleOptimizer's dynamic scale.
        scale = loss_scale(optimizer)
        dynamic = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # A variable the loss does not depend on has no gradient to judge: left out.
        present = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        offset = len(state.names)
        state.names.extend(var_name(v) for _, v in present)
        state.applies += 1
        if not present:
            return
        model = self._model
        capacity = 0 if model is None else len(model.trainable_variables)
        ring = probe.ensure_grads(len(state.names), capacity)

        def write() -> Any:
            table = grad_table(
                [g for g, _ in present], [v for _, v in present], scale, state.samples
            )
            ring.assign(_one_hot_rows_where(state.slot, probe.ring, offset, table, ring.value))
            if dynamic:
                return ops.cast(ops.greater(ops.sum(table[:, NONFINITE]), 0.0), "int32")
            return ops.zeros((), "int32")

        state.skips.append(self._when(state.sampled, write, lambda: ops.zeros((), "int32")))
        if state.due is not None:
            self._record_norms(state, [g for g, _ in present], scale, dynamic)

    def _record_norms(self, state: _StepState, grads: list[Any], scale: Any, dynamic: bool) -> None:
        """On a step due for its total norm only: one fused norm per gradient of this
        ``apply`` (combined at the end of the step), nothing on the other steps."""
        if state.due is False:
            return  # known on the host (torch): not even a condition
        zeros = ops.zeros((len(grads),), "float32")
        norms = self._when(state.due, lambda: _grad_norms(grads, scale), lambda: zeros)
        state.norm_parts.append(norms)
        if dynamic:  # the scaler skips a step whose scaled gradients overflowed
            state.norm_skips.append(ops.logical_not(ops.isfinite(ops.sum(norms))))

    def _end_step(self, state: _StepState) -> None:
        """Write the step, whether it was skipped and the activations; count it."""
        probe = self.probe
        if not state.applies:
            return  # no optimizer of ours applied anything: not a step (noted at the end)
        self.grad_names = tuple(state.names)
        outputs = dict(self._act_last_out)
        acts = probe.acts
        times, time_grads = probe.time, dict(self._time_grads)

        def write() -> None:
            skipped = ops.max(ops.stack(state.skips)) if state.skips else ops.zeros((), "int32")
            entry = ops.stack([ops.cast(state.step, "int32"), skipped])
            probe.steps.assign(_one_hot_where(state.slot, probe.ring, entry, probe.steps.value))
            if acts is not None:
                table = self._activation_table(outputs)
                acts.assign(_one_hot_where(state.slot, probe.ring, table, acts.value))
            if times is not None:
                rows = self._time_table(time_grads)
                times.assign(_one_hot_where(state.slot, probe.ring, rows, times.value))
            probe.samples.assign(state.samples + 1)

        self._when(state.sampled, write, lambda: None)
        if state.due is not None and state.norm_parts:
            self._write_norm(state)
        probe.counter.assign(state.step + 1)

    def _write_norm(self, state: _StepState) -> None:
        """On a step due for its total norm only, write it (and the scaler's skip)."""
        probe = self.probe
        norm_steps, norms = probe.norm_steps, probe.norms
        if norm_steps is None or norms is None:
            return

        def write() -> None:
            total = _combined_norm(ops.concatenate(state.norm_parts))
            skipped = ops.any(ops.stack(state.norm_skips)) if state.norm_skips else False
            current = {"norm_steps": norm_steps.value, "norms": norms.value}
            new = write_norm(probe, current, state.step, total, skipped)
            norm_steps.assign(new["norm_steps"])
            norms.assign(new["norms"])

        self._when(state.due, write, lambda: None)


__all__ = ["Capture", "TensorCapture"]

"""In-graph capture on the JAX backend: :class:`JaxCapture` threads the probe as state.

The JAX trainer's train step is a pure function of the state Keras passes in, so
the probe variables travel as extra optimizer variables during ``fit`` (removed
after it, and left out of checkpoints saved during it): ``optimizer.stateless_apply``
is wrapped instead of ``apply``, and activation outputs are reduced inside
``compute_loss_and_updates``. Owns that attachment and its removal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
from gradwatch.adapters.keras.capture import Capture
from gradwatch.adapters.keras.layers import var_name
from gradwatch.adapters.keras.probe import loss_scale, write_norm, write_sample
from gradwatch.adapters.keras.reductions import (
    _combined_norm,
    _grad_norms,
    _one_hot_where,
    _param_norms,
)
from keras import ops

from gradwatch.rows import ACT_ROWS


class JaxCapture(Capture):
    """Thread the probe through the JAX trainer's pure train step.

    The JAX trainer passes every variable in as state and takes the new values back
    out; a variable outside that state is a constant to ``jax.jit`` and writes to it
    are lost. So for the duration of ``fit`` the probe variables are appended to the
    optimizer's variables (the innermost optimizer's, so they come last in
    ``optimizer.variables``), and ``optimizer.stateless_apply`` is wrapped to
    return their new values next to the optimizer's own. Activation outputs exist
    only inside ``jax.value_and_grad``: ``compute_loss_and_updates`` reduces them
    there and hands the table out as one extra entry of its non-trainable-variable
    output, which the ``train_step`` wrapper removes and writes into the probe. A step
    not sampled that is due for its total norm computes it in a branch of its own
    (``lax.cond``) and returns the probe's norm ring with it written.
    """

    # The optimizer whose `_variables` list carries the probe, and the probe variables.
    _attached: tuple[Any, list[keras.Variable]] | None = None

    def _install_backend(self, model: keras.Model, optimizers: Sequence[Any]) -> None:
        # Only model.optimizer: its variables are the state Keras threads through the
        # step (the callback notes the optimizers a custom train_step holds itself).
        optimizer = optimizers[0]
        probe = self.probe
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
                self.patch(opt, method, self._without_probe(getattr(opt, method)))
        self.patch(
            optimizer,
            "stateless_apply",
            self._wrap_stateless_apply(optimizer.stateless_apply, optimizer, names),
        )
        acts = probe.acts is not None
        if acts and type(model).train_step is not keras.Model.train_step:
            acts = False
            self.note(
                "Activations not monitored: on the JAX backend they are read through "
                "Keras' own train_step, which this model overrides."
            )
        if acts:
            self.patch(
                model,
                "compute_loss_and_updates",
                self._wrap_compute_loss(model.compute_loss_and_updates, len(names)),
            )
        self.patch(model, "train_step", self._wrap_train_step(model.train_step, model, names, acts))

    def uninstall(self, model: keras.Model | None) -> None:
        attached, self._attached = self._attached, None
        if attached is not None:
            sync = getattr(model, "jax_state_sync", None)
            if callable(sync):
                # Mid-fit (an error, on_finding="raise"): write the live state back to
                # the variables, so the next step rebuilds its state without the probe.
                sync()
            owner, ours = attached
            owner._variables[:] = [v for v in owner._variables if not _is_any(v, ours)]
        super().uninstall(model)

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
        self, stateless_apply: Callable[..., Any], optimizer: Any, names: list[str]
    ) -> Callable[..., Any]:
        def stateless_apply_with_gradwatch(
            optimizer_variables: Any, grads: Any, trainable_variables: Any
        ) -> Any:
            new = None
            if self.guard.enabled:
                with self.guard:
                    new = self._record_gradients(
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

    def _record_gradients(
        self,
        optimizer: Any,
        names: list[str],
        values: list[Any],
        grads: list[Any],
        params: list[Any],
    ) -> dict[str, Any]:
        """The probe's values after this step by name, from ``values`` (this step's
        optimizer state, whose last ``len(names)`` entries are the probe's)."""
        probe = self.probe
        base = len(values) - len(names)
        current = dict(zip(names, values[base:], strict=True))
        scale = loss_scale(optimizer)
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
        self.grad_names = tuple(var_name(ref) for _, _, ref in present)
        step = current["counter"]
        written = ("grads", "steps", "samples")
        weights = [p for _, p, _ in present]
        # Not nested in the sampled branch: there XLA on CPU made unsampled MLP steps ~1.6x.
        sampled = None if self.sample_every == 1 else self._is_sampled(step)
        norms = _param_norms(weights, current["samples"], sampled) if present else None
        new = self._if_sampled(
            step,
            lambda: write_sample(
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
        if probe.norms is not None and present:
            new.update(self._record_norm(current, step, [g for g, _, _ in present], scale, dynamic))
        new["counter"] = step + 1
        return new

    def _record_norm(
        self, current: dict[str, Any], step: Any, grads: list[Any], scale: Any, dynamic: bool
    ) -> dict[str, Any]:
        """The norm rings after this step: its total norm written when the step is due
        for it only (one fused norm per gradient, computed in that branch alone)."""
        due = self._is_norm_due(step)
        total = ops.cond(
            due,
            lambda: _combined_norm(_grad_norms(grads, scale)),
            lambda: ops.zeros((), "float32"),
        )
        # The scaler skips a step whose scaled gradients overflowed.
        skipped = ops.logical_not(ops.isfinite(total)) if dynamic else False
        new = write_norm(self.probe, current, step, total, skipped)
        return {name: ops.where(due, value, current[name]) for name, value in new.items()}

    def _wrap_compute_loss(
        self, compute_loss_and_updates: Callable[..., Any], n_probe: int
    ) -> Callable[..., Any]:
        n_acts = self.probe.n_acts

        def compute_loss_and_updates_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            loss, aux = compute_loss_and_updates(*args, **kwargs)
            optimizer_variables = kwargs.get("optimizer_variables")
            if not (self._in_train_step and kwargs.get("training") and optimizer_variables):
                return loss, aux
            outputs = dict(self._act_last_out)

            def missing() -> Any:
                return ops.full((n_acts, ACT_ROWS), math.nan, "float32")

            table = None
            if self.guard.enabled:
                with self.guard:
                    # The outputs are tracers of jax.value_and_grad: reduced in here, on
                    # sampled steps only (the probe's counter is in the optimizer state).
                    step = optimizer_variables[len(optimizer_variables) - n_probe]
                    table = self._if_sampled(step, lambda: self._activation_table(outputs), missing)
            if table is None:
                table = missing()
            unscaled_loss, y_pred, non_trainable, metrics = aux
            return loss, (unscaled_loss, y_pred, [*non_trainable, table], metrics)

        return compute_loss_and_updates_with_gradwatch

    def _wrap_train_step(
        self, train_step: Callable[..., Any], model: keras.Model, names: list[str], acts: bool
    ) -> Callable[..., Any]:
        probe = self.probe

        def train_step_with_gradwatch(state: Any, data: Any) -> Any:
            with self._train_step(), self._ops_scope(True):
                logs, new_state = train_step(state, data)
                # What the recurrent layers' taps handed over in the backward pass.
                time_grads = dict(self._time_grads)
            trainable, non_trainable, optimizer_state, metrics = new_state
            table = None
            if acts and len(non_trainable) == len(model.non_trainable_variables) + 1:
                # The activation table compute_loss_and_updates appended: not model state.
                table = non_trainable[-1]
                non_trainable = list(non_trainable[:-1])
            if (table is None and not time_grads) or not self.guard.enabled:
                return logs, (trainable, non_trainable, optimizer_state, metrics)
            with self.guard:
                before = dict(zip(names, state[2][len(state[2]) - len(names) :], strict=True))
                optimizer_state = list(optimizer_state)
                slot = ops.mod(before["samples"], probe.ring)
                base = len(optimizer_state) - len(names)
                if table is not None:
                    index = base + names.index("acts")
                    old = optimizer_state[index]
                    written = _one_hot_where(slot, probe.ring, table, old)
                    if self.sample_every > 1:
                        written = ops.where(self._is_sampled(before["counter"]), written, old)
                    optimizer_state[index] = written
                if time_grads and "time" in names:
                    index = base + names.index("time")
                    old = optimizer_state[index]
                    optimizer_state[index] = self._if_sampled(
                        before["counter"],
                        lambda: _one_hot_where(slot, probe.ring, self._time_table(time_grads), old),
                        lambda: old,
                    )
            return logs, (trainable, non_trainable, optimizer_state, metrics)

        return train_step_with_gradwatch


def _is_any(variable: Any, candidates: list[Any]) -> bool:
    # By identity: `==` on Keras variables compares their values elementwise.
    return any(variable is c for c in candidates)


__all__ = ["JaxCapture"]

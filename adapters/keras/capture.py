"""In-graph capture: the patches that reduce a train step's gradients into the probe.

Owns the patches of one ``fit`` and their removal. :class:`Capture` holds what every
backend shares: instance-attribute patching, the layer wrappers that remember
activation outputs during the traced step, and the sampled branch.
:class:`TensorCapture` is the TensorFlow and torch path: it wraps ``optimizer.apply``
and assigns the probe variables in place (the JAX path, which must thread them as
state, is :mod:`gradwatch.adapters.keras.capture_jax`).

Because the wrappers are Python, they act when the train function is traced;
installing and uninstalling both force a retrace, so a later ``fit`` without the
callback runs the original graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
from gradwatch.adapters.keras.layers import ActivationLayers, var_name
from gradwatch.adapters.keras.probe import Probe, loss_scale, write_sample
from gradwatch.adapters.keras.reductions import _activation_table, _is_sampled
from keras import ops

from gradwatch.guard import Guard


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
    ) -> None:
        self.probe = probe
        self.guard = guard
        self.acts = acts
        self.sample_every = sample_every
        self.dense_until = dense_until
        self.tail_derivative_fraction = tail_derivative_fraction
        self.note = note
        # Names of the variables that had a gradient, in row order (set when traced).
        self.grad_names: tuple[str, ...] = ()
        self._patches: list[tuple[Any, str]] = []
        self._act_last_out: dict[int, Any] = {}
        self._in_train_step = False

    # --- installing ------------------------------------------------------------------

    def install(self, model: keras.Model, optimizer: Any) -> None:
        """Patch ``model``, its optimizer and its activation layers; force a retrace."""
        self._install_backend(model, optimizer)
        self.patch(model, "call", self._wrap_model_call(model.call))
        for i, layer in enumerate(self.acts.layers):
            self.patch(layer, "call", self._wrap_layer_call(layer.call, i))
        # The train function was built (and maybe traced) before on_train_begin: rebuild
        # it so the next trace goes through the wrappers.
        model.make_train_function(force=True)

    def _install_backend(self, model: keras.Model, optimizer: Any) -> None:
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
        """Marks the traced train step, so layer calls outside it (validation) are ignored."""
        self._in_train_step = True
        try:
            yield
        finally:
            self._in_train_step = False
            self._act_last_out.clear()

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
                # Only remembered here; reduced in the optimizer step's one sampled
                # branch (see TensorCapture._record_gradients), so an unsampled step
                # runs one condition in all, not one per activation layer.
                self._act_last_out[index] = y
            return y

        return layer_call_with_gradwatch

    def _activation_table(self, outputs: dict[int, Any]) -> Any:
        """``(n_acts, 3)`` activation fractions of this step; NaN rows for layers that
        did not run in it."""
        return _activation_table(
            outputs, self.acts.kinds, self.acts.unit_axes, self.tail_derivative_fraction
        )

    # --- the sampled branch ------------------------------------------------------------

    def _is_sampled(self, step: Any) -> Any:
        """In-graph: is ``step`` sampled (the host twin is :class:`gradwatch.every`)?"""
        return _is_sampled(step, self.sample_every, self.dense_until)

    def _when_sampled(self, step: Any, write: Callable[[], None]) -> None:
        """Run ``write`` in the traced step only on sampled steps."""
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


class TensorCapture(Capture):
    """TensorFlow and torch: ``optimizer.apply`` reduces the gradients it is handed and
    assigns the probe variables in place, inside the sampled branch."""

    def _install_backend(self, model: keras.Model, optimizer: Any) -> None:
        self.patch(model, "train_step", self._wrap_train_step(model.train_step))
        self.patch(optimizer, "apply", self._wrap_apply(optimizer.apply, optimizer))

    def _wrap_train_step(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
        def train_step_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            with self._train_step():
                return train_step(*args, **kwargs)

        return train_step_with_gradwatch

    def _wrap_apply(self, apply: Callable[..., Any], optimizer: Any) -> Callable[..., Any]:
        def apply_with_gradwatch(grads: Any, trainable_variables: Any = None) -> Any:
            if self.guard.enabled:
                with self.guard:
                    tvs = (
                        optimizer._trainable_variables
                        if trainable_variables is None
                        else trainable_variables
                    )
                    self._record_gradients(optimizer, list(grads), list(tvs))
            return apply(grads, trainable_variables)

        return apply_with_gradwatch

    def _record_gradients(self, optimizer: Any, grads: list[Any], variables: list[Any]) -> None:
        """Reduce this step's gradients into the probe variables, assigned in place
        inside the sampled branch."""
        probe = self.probe
        # Read before `apply`, which may change LossScaleOptimizer's dynamic scale.
        scale = loss_scale(optimizer)
        dynamic = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        present = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        grad_ring = probe.ensure_grads(len(present))
        # A variable the loss does not depend on has no gradient to judge: left out.
        self.grad_names = tuple(var_name(v) for _, v in present)
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
            new = write_sample(
                probe,
                current,
                step,
                [g for g, _ in present],
                [v for _, v in present],
                scale,
                dynamic,
                None if acts is None else lambda: self._activation_table(outputs),
            )
            for name, value in new.items():
                getattr(probe, name).assign(value)

        self._when_sampled(step, write)
        probe.counter.assign(step + 1)


__all__ = ["Capture", "TensorCapture"]

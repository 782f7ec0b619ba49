"""Which ``fit`` the patches belong to, and what they patch: :class:`FitScope`,
:func:`model_optimizers`.

Keras calls ``on_train_end`` only when ``fit`` returns: when another callback (or
the data pipeline) raises mid-``fit``, the patches would stay on the model, its
optimizers and its layers, and the cached train function would keep the probe.
:class:`FitScope` makes that harmless. It knows the running ``fit`` (its frame on
the call stack), so the wrappers can tell whether they run inside it, and it guards
the model's entry points (``fit``, ``evaluate``, ``predict`` and their ``*_on_batch``
forms, as instance attributes): called after that ``fit`` has died, they first undo
every patch and drop the cached train, test and predict functions, then run as if
gradwatch had never been there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import keras

# The model's entry points that run a cached train/test/predict function.
ENTRY_POINTS = (
    "fit",
    "evaluate",
    "predict",
    "train_on_batch",
    "test_on_batch",
    "predict_on_batch",
)


class FitScope:
    """The ``fit`` call that installed the patches, found on the stack at
    ``on_train_begin``, and the guards on the model's entry points.

    Args:
        model: the model being fit.
        restore: undoes every gradwatch patch (the callback's ``restore``).
    """

    def __init__(self, model: keras.Model, restore: Callable[[], None]) -> None:
        self.model = model
        self._restore = restore
        # Identity of the frame, not the frame: holding it would keep the dataset and
        # the whole fit alive after it raised.
        frame = _running_fit(model)
        self._frame: tuple[int, Any] | None = None if frame is None else (id(frame), frame.f_code)
        self._guarded: list[str] = []

    def live(self) -> bool:
        """Whether the ``fit`` that installed the patches is still running (``True`` when
        it could not be found, e.g. callbacks driven by hand)."""
        if self._frame is None:
            return True
        frames = [sys._getframe()]
        if _on_stack(frames[0], self._frame):
            return True
        # Another thread (a distribution strategy's replica) may be running it.
        return any(_on_stack(f, self._frame) for f in sys._current_frames().values())

    def guard_entry_points(self) -> None:
        """Put a guard on each entry point of the model, as an instance attribute."""
        state = vars(self.model)
        for name in ENTRY_POINTS:
            if name in state or not callable(getattr(self.model, name, None)):
                continue  # the user's own override: left alone
            state[name] = self._guard(name)
            self._guarded.append(name)

    def remove_guards(self) -> None:
        """Remove the guards. Safe to call twice."""
        state = vars(self.model)
        guarded, self._guarded = self._guarded, []
        for name in guarded:
            state.pop(name, None)

    def _guard(self, name: str) -> Callable[..., Any]:
        method = getattr(type(self.model), name)

        def entry_point_with_gradwatch_guard(*args: Any, **kwargs: Any) -> Any:
            if not self.live():
                # The fit that installed the patches died without on_train_end.
                self._restore()
                drop_compiled_functions(self.model)
            return method(self.model, *args, **kwargs)

        entry_point_with_gradwatch_guard.__name__ = name
        return entry_point_with_gradwatch_guard


def drop_compiled_functions(model: keras.Model) -> None:
    """Forget the cached train, test and predict functions: the next call retraces."""
    for attribute in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)


def model_optimizers(model: keras.Model) -> list[Any]:
    """The Keras optimizers that can apply this model's gradients, ``model.optimizer``
    first: also those a custom ``train_step`` holds as model attributes (the keras.io
    GAN's ``self.d_optimizer`` and ``self.g_optimizer``), directly or in a list, tuple
    or dict. The inner optimizer of a ``LossScaleOptimizer`` is left out: the outer
    one applies it."""
    found: list[Any] = []

    def add(value: Any) -> None:
        if isinstance(value, keras.optimizers.Optimizer) and not any(value is f for f in found):
            found.append(value)

    add(getattr(model, "optimizer", None))
    for value in list(vars(model).values()):
        if isinstance(value, dict):
            for item in list(value.values()):
                add(item)
        elif isinstance(value, (list, tuple)):
            for item in list(value):
                add(item)
        else:
            add(value)
    inner = [getattr(o, "inner_optimizer", None) for o in found]
    return [o for o in found if not any(o is i for i in inner)]


def optimizer_attribute_names(model: keras.Model, optimizers: list[Any]) -> list[str]:
    """The attribute names under which ``model`` holds ``optimizers`` (for messages)."""
    names = []
    for name, value in vars(model).items():
        if not name.startswith("_") and any(value is o for o in optimizers):
            names.append(name)
    return names


def watched_optimizers(model: keras.Model, backend: str, note: Callable[[str], None]) -> list[Any]:
    """The optimizers to watch on ``backend`` (``model.optimizer`` first); ``note``
    says what is not watched. Empty when there is nothing to watch."""
    optimizers = model_optimizers(model)
    compiled = getattr(model, "optimizer", None)
    if backend == "jax" and optimizers and optimizers[0] is not compiled:
        optimizers.insert(0, compiled)
    if backend == "jax" and len(optimizers) > 1:
        # The JAX train step is pure: Keras threads model.optimizer's state only.
        held = optimizer_attribute_names(model, optimizers[1:])
        note(
            "Not monitored on the JAX backend: the gradients applied by optimizers the "
            f"model holds itself ({', '.join(held) or 'attributes'}); only "
            "model.optimizer's are read. Use the TensorFlow or torch backend for them."
        )
        optimizers = optimizers[:1]
    if not optimizers or optimizers[0] is None:
        note(
            "Nothing monitored: the model has no Keras optimizer (model.optimizer is "
            "None and no model attribute is a keras.optimizers.Optimizer); compile the "
            "model with one, or hold the train step's optimizers as model attributes."
        )
        return []
    return optimizers


def note_unseen_steps(
    model: keras.Model, steps_run: int, steps_seen: int, note: Callable[[str], None]
) -> None:
    """Tells the user when ``steps_run`` training steps ran but the train step applied
    no gradients through a watched optimizer (``steps_seen`` is 0)."""
    if steps_run == 0 or steps_seen > 0:
        return
    names = optimizer_attribute_names(model, model_optimizers(model))
    held = f": {', '.join(names)}" if names else ""
    note(
        f"Nothing monitored: {steps_run} training steps ran but none applied its "
        "gradients through an optimizer gradwatch watches (model.optimizer or a model "
        f"attribute{held}). A custom train_step must call apply or apply_gradients on "
        "one of those."
    )


def _running_fit(model: keras.Model) -> FrameType | None:
    """The innermost frame of ``fit`` running on ``model``, from the current stack."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            return frame
        frame = frame.f_back
    return None


def _on_stack(frame: FrameType | None, target: tuple[int, Any]) -> bool:
    target_id, code = target
    while frame is not None:
        if frame.f_code is code and id(frame) == target_id:
            return True
        frame = frame.f_back
    return False


__all__ = [
    "ENTRY_POINTS",
    "FitScope",
    "drop_compiled_functions",
    "model_optimizers",
    "note_unseen_steps",
    "optimizer_attribute_names",
    "watched_optimizers",
]

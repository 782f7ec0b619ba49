"""Activations computed with ``keras.ops`` inside a layer's ``call``: :class:`OpsCapture`.

``keras.ops.sigmoid(x)`` and ``keras.activations.sigmoid(x)`` both end in the active
backend's ``keras.src.backend.nn.sigmoid``, looked up at call time (``tanh``:
``backend.numpy.tanh``; ``keras.activations.relu`` and ``mish`` through
``ReLU.static_call`` / ``Mish.static_call``). That is the narrowest point that catches
both, so those entry points are wrapped, and only while the train step is traced
(TensorFlow, JAX: once per trace) or run (torch: sampled steps only). Each call is
attributed to the innermost layer whose ``call`` is running (the top of Keras'
name-scope stack, which ``Layer.__call__`` pushes) and becomes a site named
``<layer path>#<fn>:<n>`` (``sigmoid_stack#sigmoid:3``: the fourth sigmoid that layer
computed in the step). Its output (its input, for the kinds judged on it) is kept with
the layer activations and reduced with them in the one sampled branch, by the same
:mod:`~gradwatch.adapters.keras.reductions` arithmetic. The backend functions are put
back at the end of the step, also when it raises: ``evaluate`` and ``predict`` never
meet a wrapper, and the wrappers return the backend's own result untouched.

Not captured, and named in the report's notes: a call inside a watched activation
layer (its ``activation=`` is already a row), inside a recurrent layer or cell (it runs
in the backend's loop), inside a control-flow body (``tf.cond``/``tf.while_loop``
branches, ``lax.scan``/``lax.cond`` on JAX), whose tensors cannot leave it, and sites
beyond the rows kept. Backend-native calls (``tf.nn.relu``, ``torch.relu``,
``jax.nn.relu``) do not pass through Keras and are not seen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from gradwatch.adapters.keras.layers import (
    ActivationLayers,
    activation_kind,
    is_recurrent,
    layer_name,
    var_name,
)
from gradwatch.adapters.keras.reductions import _activation_table
from keras import ops

from gradwatch.activations import input_tail_bound
from gradwatch.guard import Guard
from gradwatch.monitor import Monitor
from gradwatch.rows import ACT_NONFINITE


@dataclass(frozen=True)
class _Entry:
    """One backend entry point: where it lives, the activation kind its output has, and
    for the kinds judged on their input the name :func:`input_tail_bound` knows."""

    owner: str  # "nn" / "numpy": the backend module; else a class of keras.src.activations
    attr: str
    kind: str
    input_fn: str | None = None


_ENTRIES = (
    _Entry("nn", "relu", "relu"),
    _Entry("nn", "relu6", "relu6"),
    _Entry("nn", "leaky_relu", "leaky_relu"),
    _Entry("nn", "sigmoid", "sigmoid"),
    _Entry("nn", "hard_sigmoid", "hard_sigmoid"),
    _Entry("nn", "tanh", "tanh"),
    _Entry("numpy", "tanh", "tanh"),
    _Entry("nn", "hard_tanh", "hard_tanh"),
    _Entry("nn", "elu", "elu", "elu"),
    _Entry("nn", "selu", "elu", "selu"),
    _Entry("nn", "celu", "elu", "celu"),
    _Entry("nn", "gelu", "gelu", "gelu"),
    _Entry("nn", "silu", "silu", "silu"),
    _Entry("nn", "hard_silu", "silu", "hardswish"),
    _Entry("nn", "softplus", "softplus", "softplus"),
    # keras.activations.relu(x, negative_slope=..., max_value=...) calls the backend
    # (twice with a slope); mish is x * tanh(softplus(x)): each one site, not its parts.
    _Entry("ReLU", "static_call", "relu"),
    _Entry("Mish", "static_call", "silu", "mish"),
)


class OpsCapture:
    """The ``keras.ops`` activation sites of one ``fit``, found while a step is traced.

    Args:
        acts: the watched layers and the site rows; sites are added to it.
        guard: the run's guard: an error while recording switches monitoring off, the
            step itself goes on unchanged.
        store: where a site's tensor goes for this step, by row (the capture's dict of
            the layer outputs it reduces at the end of the step).
        derivative_fraction: the tail fraction the input bounds are computed at.

    Example:
        >>> capture = OpsCapture(acts, guard, outputs, 0.01)  # doctest: +SKIP
        >>> with capture.active():  # doctest: +SKIP
        ...     model.train_step(data)  # sites land in `outputs` and in `acts.sites`
    """

    def __init__(
        self,
        acts: ActivationLayers,
        guard: Guard,
        store: MutableMapping[int, Any],
        derivative_fraction: float,
    ) -> None:
        self.acts = acts
        self.guard = guard
        self.store = store
        self.derivative_fraction = derivative_fraction
        self._watched = {id(layer) for layer in acts.layers}
        self._depth = 0
        self._calls: dict[tuple[int, str], int] = {}
        self._graph: Any = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Wrap the entry points for the ``with`` block; restored on exit, even on error."""
        patched: list[tuple[Any, str, Any]] = []
        try:
            with self.guard:
                self._calls.clear()
                self._depth = 0
                self._graph = _tf_graph()
                for owner, entry in _targets():
                    original = vars(owner)[entry.attr]
                    fn = getattr(owner, entry.attr)
                    wrapped = self._wrap(entry, fn)
                    setattr(
                        owner, entry.attr, staticmethod(wrapped) if _is_class(owner) else wrapped
                    )
                    patched.append((owner, entry.attr, original))
            yield
        finally:
            for owner, attr, original in reversed(patched):
                setattr(owner, attr, original)
            self._graph = None

    def _wrap(self, entry: _Entry, fn: Callable[..., Any]) -> Callable[..., Any]:
        def activation_with_gradwatch(*args: Any, **kwargs: Any) -> Any:
            if self._depth:  # called by another entry point (hard_silu, mish): its part
                return fn(*args, **kwargs)
            self._depth += 1
            try:
                y = fn(*args, **kwargs)
            finally:
                self._depth -= 1
            if self.guard.enabled:
                with self.guard:
                    self._record(entry, args, kwargs, y)
            return y

        return activation_with_gradwatch

    def _record(self, entry: _Entry, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> None:
        layers = _layer_stack()
        if not layers:
            return  # outside the model: a loss or a metric
        layer = layers[-1]
        if id(layer) in self._watched:
            return  # the layer's own activation: already its row
        unobserved = self.acts.unobserved
        recurrent = next((a for a in layers if is_recurrent(a)), None)
        if recurrent is not None:
            unobserved.setdefault(layer_name(recurrent), "recurrent")
            return
        kind, fn, params = _describe(entry, args, kwargs)
        x = args[0] if args else kwargs.get("x")
        tensor = x if fn is not None else y
        if tensor is None:
            return
        if self._graph is not None and getattr(tensor, "graph", self._graph) is not self._graph:
            unobserved.setdefault(layer_name(layer), "control flow")
            return
        label = _label(entry, kind)
        key = (id(layer), label)
        n = self._calls.get(key, 0)
        self._calls[key] = n + 1
        bound = None
        if fn is not None:
            bound = input_tail_bound(fn, self.derivative_fraction, **params)
        row = self.acts.add_site(f"{layer_name(layer)}#{label}:{n}", kind, bound)
        if row is None:
            unobserved.setdefault(layer_name(layer), "room")
            return
        self.store[row] = tensor


def activation_table(outputs: dict[int, Any], acts: ActivationLayers, fraction: float) -> Any:
    """``(len(acts), ACT_ROWS)`` activation rows of one step (three fractions and the
    NaN/Inf count), layers and sites, from the tensors by row; NaN rows for what did
    not run. Sites judged on their input hold
    it, reduced here (in the sampled branch) as the margin ``max(z - bound, 0)``: its
    zeros are the flat tail, so its dead units are units in the tail for the whole batch
    and its tail fraction is its inactive one, as in the torch adapter."""
    rows = dict(outputs)
    kinds = list(acts.kinds)
    for row in list(rows):
        if row >= len(acts.layers) and _stale(rows[row]):
            del rows[row]  # a JAX tracer of a finished scan/cond body: not usable here
            acts.unobserved.setdefault(acts.names[row].split("#", 1)[0], "control flow")
    for row, bound in acts.site_bounds.items():
        kinds[row] = "relu"  # the margin is a ReLU output: same counts
        z = rows.get(row)
        if z is not None:
            z = ops.cast(ops.stop_gradient(z), "float32")
            rows[row] = ops.maximum(ops.subtract(z, bound), 0.0)
    table = _activation_table(rows, kinds, acts.unit_axes, fraction)
    if not acts.site_bounds:
        return table
    margin = np.zeros((len(kinds),), bool)
    margin[list(acts.site_bounds)] = True
    tail = ops.where(ops.convert_to_tensor(margin), table[:, 0], table[:, 2])
    return ops.stack([table[:, 0], table[:, 1], tail, table[:, ACT_NONFINITE]], axis=1)


def tell_coverage(monitor: Monitor, model: keras.Model, acts: ActivationLayers) -> None:
    """Tell ``monitor`` what ``model`` holds, for the report's coverage: the trainable
    variables, the activation sites observed (layers and ``keras.ops`` sites), the
    activation-like layers (observed or not: watched layers, layers with sites,
    recurrent layers, unknown ``activation=`` functions, ``MultiHeadAttention``), and a
    note naming each layer whose activations were not observed and why."""
    observed = dict(getattr(monitor.analyzer.stats, "act_kind", {}))
    seen_layers = {name.split("#", 1)[0] for name in observed}
    modules: dict[str, str] = {}
    for name, kind in zip(acts.names[: len(acts.layers)], acts.kinds, strict=False):
        modules[name] = kind
    for name, kind in acts.sites.items():
        modules.setdefault(name.split("#", 1)[0], kind)
    attention: list[str] = []
    for layer in _layers_of(model):
        name = layer_name(layer)
        if is_recurrent(layer) and not isinstance(layer, keras.layers.Bidirectional):
            if isinstance(layer, keras.layers.RNN):
                modules.setdefault(name, "other")
        elif activation_kind(layer) == "other":
            modules.setdefault(name, "other")  # an `activation=` function of no known kind
        elif isinstance(layer, keras.layers.MultiHeadAttention):
            softmax = getattr(layer, "_softmax", None)
            if softmax is None or layer_name(softmax) not in seen_layers:
                modules.setdefault(name, "softmax")
                attention.append(name)
    monitor.set_coverage([var_name(v) for v in model.trainable_variables], observed, modules)
    why = {
        "control flow": "inside a control-flow body (tf.cond, while_loop, lax.scan)",
        "room": f"beyond the {acts.site_capacity} site rows kept",
    }
    for reason, text in why.items():
        names = [name for name, r in acts.unobserved.items() if r == reason]
        if names:
            monitor.note(f"keras.ops activations not monitored {text}: {', '.join(names)}.")
    if attention:
        monitor.note(
            "Attention softmax not monitored inside MultiHeadAttention (computed by the "
            f"fused ops.dot_product_attention): {', '.join(attention)}."
        )


def _layers_of(model: keras.Model) -> list[keras.layers.Layer]:
    return list(model._flatten_layers(include_self=False, recursive=True))


def _targets() -> Iterator[tuple[Any, _Entry]]:
    """The objects holding the entry points of the active backend, with the entries."""
    from keras.src import activations, backend

    owners = {
        "nn": backend.nn,
        "numpy": backend.numpy,
        "ReLU": getattr(activations.activations, "ReLU", None),
        "Mish": getattr(activations.activations, "Mish", None),
    }
    for entry in _ENTRIES:
        owner = owners.get(entry.owner)
        if owner is not None and entry.attr in vars(owner):
            yield owner, entry


def _is_class(owner: Any) -> bool:
    return isinstance(owner, type)


def _describe(
    entry: _Entry, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, str | None, dict[str, float]]:
    """The call's kind, the input-bound name (``None``: judged on the output) and the
    bound's parameters, from the arguments the backend function got."""

    def arg(i: int, name: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(name, default)

    if entry.owner == "ReLU":
        slope, max_value, threshold = (
            arg(1, "negative_slope", 0.0),
            arg(2, "max_value", None),
            arg(3, "threshold", 0.0),
        )
        if _number(slope, 0.0) != 0.0:
            return "leaky_relu", None, {}
        if max_value is not None and _number(max_value, math.nan) == 6.0 and not threshold:
            return "relu6", None, {}
        return "relu", None, {}
    if entry.attr == "gelu":
        # Keras' default is the tanh approximation.
        approximate = arg(1, "approximate", True)
        return entry.kind, "gelu_tanh" if approximate is not False else "gelu", {}
    if entry.attr in ("elu", "celu"):
        alpha = _number(arg(1, "alpha", 1.0), math.nan)
        if not math.isfinite(alpha) or alpha <= 0.0:
            return entry.kind, None, {}  # a tensor alpha: judged on the output only
        return entry.kind, entry.input_fn, {"alpha": alpha}
    return entry.kind, entry.input_fn, {}


def _label(entry: _Entry, kind: str) -> str:
    if entry.owner in ("ReLU", "Mish"):
        return "mish" if entry.owner == "Mish" else kind
    return entry.attr


def _number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _layer_stack() -> list[keras.layers.Layer]:
    """The layers whose ``call`` is running, outermost first (Keras' name scopes)."""
    from keras.src.backend.common import global_state

    scopes = global_state.get_global_attribute("name_scope_stack") or []
    return [s.caller for s in scopes if isinstance(getattr(s, "caller", None), keras.layers.Layer)]


def _tf_graph() -> Any:
    """The graph being traced on TensorFlow (``None`` when eager or on other backends):
    a site's tensor must belong to it to be usable where the step is reduced."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if tf.executing_eagerly():
        return None
    return tf.compat.v1.get_default_graph()


def _stale(tensor: Any) -> bool:
    """A JAX tracer that belongs to another trace than the one running now (a scan or
    cond body that has finished): using it would raise."""
    trace = getattr(tensor, "_trace", None)
    if trace is None or keras.backend.backend() != "jax":
        return False
    from jax._src import core

    valid = getattr(trace, "is_valid", lambda: True)()
    return not valid or trace is not core.trace_ctx.trace


__all__ = ["OpsCapture", "activation_table", "tell_coverage"]

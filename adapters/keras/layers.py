"""Which layers of a Keras model are watched, what they are, and the names they go by.

Owns layer discovery (:class:`ActivationLayers`: the activation layers whose outputs
are reduced, the rows kept for activations computed by ``keras.ops`` inside a custom
``call`` (filled by :mod:`gradwatch.adapters.keras.ops_capture`), which of them produce
the model's output, and the notes about layers that cannot be covered), the static
facts about each trainable variable's layer (:func:`layer_info`) and the naming shared
by gradients and activations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import keras

from gradwatch.activations import JUDGED_ON_INPUT, ActivationKind, kind_from_name
from gradwatch.layer_info import LayerInfo

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
# Recurrent layers and cells: an activation inside runs once per time step inside the
# backend's loop (tf.while_loop, lax.scan), where its outputs cannot be kept.
_RECURRENT_LAYERS: tuple[type, ...] = (
    keras.layers.RNN,
    keras.layers.Bidirectional,
    keras.layers.SimpleRNNCell,
    keras.layers.LSTMCell,
    keras.layers.GRUCell,
    keras.layers.StackedRNNCells,
)
# Layers that pass a ReLU's zeros (or its input's sign) through unchanged in shape, so
# the layer before them still "feeds" the activation that follows them.
_PASS_THROUGH_LAYERS: tuple[type, ...] = (
    keras.layers.Dropout,
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)
# Rows kept for keras.ops activation sites per layer that may compute its own (a custom
# call, a Lambda, an unknown `activation=` function), and in all: room, not a threshold;
# sites beyond it are named in a note.
SITES_PER_LAYER = 32
MAX_SITES = 512


class ActivationLayers:
    """The activation layers of ``model`` whose outputs are watched, in model order, then
    the rows kept for the ``keras.ops`` activation sites found while the step is traced.

    Args:
        model: the model ``fit`` trains.
        enabled: look for activation layers at all (the callback's ``activations``).

    Attributes:
        layers: the watched activation layers, one row each (the first rows).
        names, kinds, unit_axes: one entry per row, sites included (an unused site row
            is named ``""``; its row stays NaN, so it is never reported).
        is_output: whether each row produces a model output; the capture fills in
            what a Functional graph cannot tell (subclassed models, sites).
        site_capacity: rows kept for sites (0: the model has no layer that may compute
            its own activation, and nothing is intercepted).
        site_bounds: row -> input bound, for sites judged on their input (GELU, SiLU,
            ELU, softplus): their row holds the input, reduced as the margin
            ``max(z - bound, 0)`` (see :data:`gradwatch.activations.JUDGED_ON_INPUT`).
        notes: what the report should say about coverage.
        unobserved: layers whose activations were seen not to be captured, name -> why
            (filled while traced: a recurrent cell, a control-flow body, no room).
    """

    def __init__(self, model: keras.Model, enabled: bool) -> None:
        self.layers: list[keras.layers.Layer] = []
        self.notes: list[str] = []
        self.unobserved: dict[str, str] = {}
        self.site_bounds: dict[int, float] = {}
        uncovered: list[str] = []
        candidates = 0
        if enabled:
            for layer in _leaf_layers(model):
                kind = activation_kind(layer)
                if kind is not None and kind != ActivationKind.OTHER.value:
                    self.layers.append(layer)
                elif kind == ActivationKind.OTHER.value or isinstance(
                    layer, _UNCOVERED_ACTIVATION_LAYERS
                ):
                    uncovered.append(layer.name)
            candidates = sum(may_compute_activations(layer) for layer in _all_layers(model))
        else:
            self.notes.append("Activation monitoring is off (activations=False).")
        self.site_capacity = min(MAX_SITES, SITES_PER_LAYER * candidates)
        self._layer_names = tuple(layer_name(layer) for layer in self.layers)
        self._layer_kinds = tuple(activation_kind(layer) or "other" for layer in self.layers)
        self._layer_axes = tuple(_unit_axis(layer) for layer in self.layers)
        self._site_names: list[str] = []
        self._site_kinds: list[str] = []
        self._site_rows: dict[str, int] = {}
        output_layers = _functional_output_layers(model)
        self.is_output = [id(layer) in output_layers for layer in self.layers]
        self.is_output += [False] * self.site_capacity
        recurrent = [layer.name for layer in _leaf_layers(model) if is_recurrent(layer)]
        if uncovered:
            self.notes.append(
                "Activations not monitored (applied inside recurrent cells, Lambda layers or "
                f"an unknown function): {', '.join(uncovered)}."
                + (
                    " Activations computed with keras.ops inside them are watched."
                    if self.site_capacity and set(uncovered) - set(recurrent)
                    else ""
                )
            )
        if enabled and not self.layers and not self.site_capacity:
            self.notes.append(
                "No activation layer found: only activation layers, `activation=` arguments "
                "and keras.ops activations inside a custom call() are monitored."
            )

    def __len__(self) -> int:
        return len(self.layers) + self.site_capacity

    @property
    def names(self) -> tuple[str, ...]:
        unused = self.site_capacity - len(self._site_names)
        return self._layer_names + tuple(self._site_names) + ("",) * unused

    @property
    def kinds(self) -> tuple[str, ...]:
        unused = self.site_capacity - len(self._site_kinds)
        return self._layer_kinds + tuple(self._site_kinds) + ("other",) * unused

    @property
    def unit_axes(self) -> tuple[int, ...]:
        # A site's layout is unknown: channels last, as Keras' default data_format.
        return self._layer_axes + (-1,) * self.site_capacity

    @property
    def sites(self) -> dict[str, str]:
        """The sites found so far, name -> kind, in row order."""
        return dict(zip(self._site_names, self._site_kinds, strict=True))

    def add_site(self, name: str, kind: str, input_bound: float | None = None) -> int | None:
        """The row of site ``name`` (added on first sight, so a retrace keeps its rows),
        or ``None`` when every site row is taken."""
        row = self._site_rows.get(name)
        if row is not None:
            return row
        if len(self._site_names) >= self.site_capacity:
            return None
        row = len(self.layers) + len(self._site_names)
        self._site_rows[name] = row
        self._site_names.append(name)
        self._site_kinds.append(kind)
        if input_bound is not None and kind in JUDGED_ON_INPUT:
            self.site_bounds[row] = input_bound
        return row


def may_compute_activations(layer: keras.layers.Layer) -> bool:
    """Whether ``layer``'s own ``call`` may compute an activation with ``keras.ops``: a
    ``call`` written outside Keras (a custom layer or subclassed model, keras_hub), a
    ``Lambda``, or an ``activation=`` function gradwatch does not know. Recurrent layers
    are not: their activations run inside the backend's loop."""
    if is_recurrent(layer):
        return False
    if isinstance(layer, keras.layers.Lambda):
        return True
    if activation_kind(layer) == ActivationKind.OTHER.value:
        return True
    call = getattr(type(layer), "call", None)
    module = getattr(call, "__module__", "") or ""
    return not module.startswith("keras.")


def is_recurrent(layer: Any) -> bool:
    """A recurrent layer, a recurrent cell (anything with a ``state_size``) or a wrapper
    of one (``Bidirectional``)."""
    return isinstance(layer, _RECURRENT_LAYERS) or (
        isinstance(layer, keras.layers.Layer)
        and not isinstance(layer, keras.Model)
        and hasattr(layer, "state_size")
    )


def activation_kind(layer: keras.layers.Layer) -> str | None:
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


def layer_name(layer: keras.layers.Layer) -> str:
    # Same naming as the variables (`sequential/dense`), so activations and gradients match.
    return str(getattr(layer, "path", None) or layer.name)


def var_name(variable: Any) -> str:
    return str(getattr(variable, "path", None) or getattr(variable, "name", "variable"))


def layer_info(model: keras.Model, sites: dict[str, str] | None = None) -> dict[str, LayerInfo]:
    """A :class:`gradwatch.layer_info.LayerInfo` per trainable variable of ``model``,
    keyed by :func:`var_name` (the names of :attr:`gradwatch.StepStats.grad_layers`).

    * ``feeds``: the layer's own ``activation`` (``Dense(activation="relu")``), else the
      activation layer its output goes to in a Sequential/functional graph (through
      Dropout and normalization layers), else the one kind of every ``keras.ops``
      activation site seen inside the layer (``sites``, name -> kind, from
      :attr:`ActivationLayers.sites`), else ``None``;
    * ``fan_in``: of a kernel (``ndim >= 2``), as Keras' initializers count it
      (``in x receptive field``); ``None`` for biases, vectors and embeddings;
    * ``recurrent``: the variable belongs to an RNN layer or cell (also inside
      ``Bidirectional``);
    * ``kind``: the owning layer's class name (a cell's: its RNN layer's);
    * ``group``: for a layer that holds a stack of kernels itself (several ``ndim >= 2``
      variables, not a recurrent cell), each kernel is a group of its own, named by
      its path, and each bias joins its kernel's group when the pairing is unambiguous,
      so depth inside the layer is visible; ``None`` (grouped by layer) otherwise.

    Example:
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu")])
        >>> kernel = layer_info(m)["sequential/dense/kernel"]
        >>> kernel.feeds, kernel.fan_in
        ('relu', 4)
    """
    trainable = {id(v) for v in model.trainable_variables}
    site_kinds: dict[str, set[str]] = {}
    for site, site_kind in (sites or {}).items():
        site_kinds.setdefault(site.split("#", 1)[0], set()).add(site_kind)
    info: dict[str, LayerInfo] = {}
    for layer, ancestors in _walk(model):
        own = [v for v in getattr(layer, "_trainable_variables", []) if id(v) in trainable]
        if not own:
            continue
        chain = [*ancestors, layer]
        recurrent = any(is_recurrent(a) for a in chain)
        kind = next(
            (type(a).__name__ for a in chain if isinstance(a, keras.layers.RNN)),
            type(layer).__name__,
        )
        feeds = None if recurrent else _feeds(layer)
        seen = site_kinds.get(layer_name(layer), set())
        if feeds is None and len(seen) == 1:
            feeds = next(iter(seen))  # e.g. a custom stack of ops.sigmoid layers
        embedding = isinstance(layer, keras.layers.Embedding)
        groups = {} if recurrent else _stack_groups(own)
        for v in own:
            name = var_name(v)
            info[name] = LayerInfo(
                feeds=feeds,
                fan_in=None if embedding else _fan_in(v),
                recurrent=recurrent,
                kind=kind,
                group=groups.get(id(v)),
            )
    return info


def _walk(
    layer: keras.layers.Layer, ancestors: tuple[keras.layers.Layer, ...] = ()
) -> Iterator[tuple[keras.layers.Layer, tuple[keras.layers.Layer, ...]]]:
    """Every layer under ``layer`` (itself first), with its ancestors, each once."""
    seen: set[int] = set()
    stack = [(layer, ancestors)]
    while stack:
        current, parents = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current, parents
        children = list(current._flatten_layers(include_self=False, recursive=False))
        stack.extend((child, (*parents, current)) for child in reversed(children))


def _fan_in(variable: Any) -> int | None:
    shape = tuple(int(d) for d in variable.shape)
    if len(shape) < 2 or not all(shape):
        return None
    # keras.src.initializers.random_initializers.compute_fans: what he_normal divides by.
    receptive = math.prod(shape[:-2])
    return int(shape[-2] * receptive) if len(shape) > 2 else shape[0]


def _feeds(layer: keras.layers.Layer) -> str | None:
    """The activation kind applied to ``layer``'s output, if one is known."""
    own = activation_kind(layer)
    if own is not None and not _is_activation_layer(layer):
        return own
    nxt = layer
    for _ in range(4):  # Dense -> BatchNorm -> Dropout -> ReLU at most, in practice
        consumers = [n.operation for n in getattr(nxt, "_outbound_nodes", [])]
        if len(consumers) != 1:
            return None
        nxt = consumers[0]
        if _is_activation_layer(nxt):
            return activation_kind(nxt)
        if not isinstance(nxt, _PASS_THROUGH_LAYERS):
            return None
    return None


def _is_activation_layer(layer: Any) -> bool:
    activation_layers = (
        keras.layers.Activation,
        keras.layers.ReLU,
        keras.layers.LeakyReLU,
        keras.layers.PReLU,
        keras.layers.ELU,
        keras.layers.Softmax,
    )
    return isinstance(layer, activation_layers)


def _stack_groups(variables: list[Any]) -> dict[int, str]:
    """variable id -> group, when one layer holds several kernels itself."""
    kernels = [v for v in variables if len(v.shape) >= 2]
    if len(kernels) < 2:
        return {}
    groups = {id(k): var_name(k) for k in kernels}
    biases = [v for v in variables if len(v.shape) < 2]
    by_key = {_index_key(k): k for k in kernels}
    paired: dict[int, Any] = {}
    if len(by_key) == len(kernels) and all(_index_key(b) in by_key for b in biases):
        # `w3` with `b3`, `kernel_3` with `bias_3`: the same index in the name.
        paired = {id(b): by_key[_index_key(b)] for b in biases}
    elif len(biases) == len(kernels):
        # Otherwise in creation order, the k-th bias with the k-th kernel, if shapes fit.
        pairs = list(zip(biases, kernels, strict=True))
        if all(int(b.shape[-1]) == int(k.shape[-1]) for b, k in pairs if len(b.shape)):
            paired = {id(b): k for b, k in pairs}
    for b in biases:
        kernel = paired.get(id(b))
        if kernel is not None:
            groups[id(b)] = var_name(kernel)
    return groups


def _index_key(variable: Any) -> str:
    # The digits of a variable's own name (`w_12` -> "12"); "" when it has none.
    own = var_name(variable).rsplit("/", 1)[-1]
    found = re.findall(r"\d+", own)
    return found[-1] if found else ""


def _unit_axis(layer: keras.layers.Layer) -> int:
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """``model`` and every layer inside it, containers included."""
    return [layer for layer, _ in _walk(model)]


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


__all__ = [
    "MAX_SITES",
    "SITES_PER_LAYER",
    "ActivationLayers",
    "activation_kind",
    "is_recurrent",
    "layer_info",
    "layer_name",
    "may_compute_activations",
    "var_name",
]

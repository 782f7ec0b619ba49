"""Which layers of a Keras model are watched, and the names they go by.

Owns layer discovery (:class:`ActivationLayers`: the activation layers whose outputs
are reduced, which of them produce the model's output, and the notes about layers
that cannot be covered) and the naming shared by gradients and activations.
"""

from __future__ import annotations

from typing import Any

import keras

from gradwatch.activations import ActivationKind, kind_from_name

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


class ActivationLayers:
    """The activation layers of ``model`` whose outputs are watched, in model order.

    Args:
        model: the model ``fit`` trains.
        enabled: look for activation layers at all (the callback's ``activations``).

    Attributes:
        layers, names, kinds, unit_axes: one entry per watched layer.
        is_output: whether each layer produces a model output; the capture fills in
            what a Functional graph cannot tell (subclassed models).
        notes: what the report should say about coverage.
    """

    def __init__(self, model: keras.Model, enabled: bool) -> None:
        self.layers: list[keras.layers.Layer] = []
        self.notes: list[str] = []
        uncovered: list[str] = []
        if enabled:
            for layer in _leaf_layers(model):
                kind = activation_kind(layer)
                if kind is not None and kind != ActivationKind.OTHER.value:
                    self.layers.append(layer)
                elif kind == ActivationKind.OTHER.value or isinstance(
                    layer, _UNCOVERED_ACTIVATION_LAYERS
                ):
                    uncovered.append(layer.name)
        else:
            self.notes.append("Activation monitoring is off (activations=False).")
        self.names = tuple(layer_name(layer) for layer in self.layers)
        self.kinds = tuple(activation_kind(layer) or "other" for layer in self.layers)
        self.unit_axes = tuple(_unit_axis(layer) for layer in self.layers)
        output_layers = _functional_output_layers(model)
        self.is_output = [id(layer) in output_layers for layer in self.layers]
        if uncovered:
            self.notes.append(
                "Activations not monitored (applied inside recurrent cells, Lambda layers or "
                f"an unknown function): {', '.join(uncovered)}."
            )
        if enabled and not self.layers:
            self.notes.append(
                "No activation layer found. Activations computed inside a custom call() "
                "(e.g. keras.ops.relu) are not monitored; only activation layers and "
                "`activation=` arguments are."
            )

    def __len__(self) -> int:
        return len(self.layers)


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


def _unit_axis(layer: keras.layers.Layer) -> int:
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1


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


__all__ = ["ActivationLayers", "activation_kind", "layer_name", "var_name"]

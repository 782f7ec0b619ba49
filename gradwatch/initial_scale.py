"""The scale of each layer group's weights and biases at the start of a run:
:class:`InitialScale`, read once from the first step that carries weight norms.

Rules use it to tell an initialization problem (weights far from the He/Xavier scale
for their fan-in, a large bias) from a learning-rate one. The fan-in is inferred from
the tensor sizes when the adapter does not give it: a group of one weight and one
bias (``Linear``, ``Conv``, ``Dense``) has ``fan_in = numel(weight) / numel(bias)``
(``out x in`` over ``out``; ``out x in x k x k`` over ``out`` for a convolution).
Recurrent layers are told by the frameworks' own names for their recurrent weights
(torch ``weight_hh``, Keras ``recurrent_kernel``); their gate count by sizes
(``numel(bias)**2 / numel(recurrent weight)``: 1 for a plain RNN, 3 GRU, 4 LSTM).

Example:
    >>> from gradwatch import StepStats
    >>> s = StepStats(step=0, grad_layers=("fc.weight", "fc.bias"), grad_norm=(1.0, 1.0),
    ...               grad_max_abs=(1.0, 1.0), grad_mean_abs=(1.0, 1.0),
    ...               grad_zero_frac=(0.0, 0.0), grad_nonfinite=(0, 0),
    ...               grad_numel=(6400, 100), param_norm=(8.0, 0.0))
    >>> initial_scales(s, lambda n: n.rsplit(".", 1)[0])["fc"].fan_in
    64
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from gradwatch.stats import StepStats

_RECURRENT_NAMES = ("weight_hh", "recurrent_kernel")


@dataclass(frozen=True, slots=True)
class InitialScale:
    """One layer group's weights at the first step with weight norms.

    Attributes:
        fan_in: inputs per unit of its weight, inferred from sizes; ``None`` when the
            group is not one weight plus one bias (or both have the same size, a norm
            layer's scale and shift).
        weight_rms: root mean square of the largest tensor's entries (the weight).
        bias_rms: root mean square of the bias entries; ``None`` without a bias.
        recurrent: the group holds a recurrent weight.
        gates: gates of a recurrent layer (1 plain RNN, 3 GRU, 4 LSTM); ``None`` if unknown.
    """

    fan_in: int | None
    weight_rms: float
    bias_rms: float | None
    recurrent: bool = False
    gates: int | None = None


def initial_scales(s: StepStats, group_of: Callable[[str], str]) -> dict[str, InitialScale]:
    """The :class:`InitialScale` of each group of ``s`` (empty without ``param_norm``)."""
    if not s.param_norm:
        return {}
    members: dict[str, list[tuple[str, int, float]]] = {}
    for name, numel, norm in zip(s.grad_layers, s.grad_numel, s.param_norm, strict=True):
        members.setdefault(group_of(name), []).append((name, int(numel), float(norm)))
    out: dict[str, InitialScale] = {}
    for group, tensors in members.items():
        recurrent = [t for t in tensors if any(k in t[0] for k in _RECURRENT_NAMES)]
        ordered = sorted(tensors, key=lambda t: -t[1])
        weight = ordered[0]
        if weight[1] <= 0 or not math.isfinite(weight[2]):
            continue
        fan_in = None
        bias_rms = None
        if len(tensors) == 2 and not recurrent:
            bias = ordered[1]
            if 0 < bias[1] < weight[1] and weight[1] % bias[1] == 0:
                fan_in = weight[1] // bias[1]
                bias_rms = bias[2] / math.sqrt(bias[1])
        gates = _gates(tensors, recurrent[0]) if recurrent else None
        out[group] = InitialScale(
            fan_in, weight[2] / math.sqrt(weight[1]), bias_rms, bool(recurrent), gates
        )
    return out


def _gates(tensors: list[tuple[str, int, float]], recurrent: tuple[str, int, float]) -> int | None:
    """Gate count of a recurrent layer: a recurrent weight is ``gates*h x h`` and its bias
    ``gates*h``, so ``gates = numel(bias)**2 / numel(weight)``."""
    biases = [t for t in tensors if "bias" in t[0] and t[1] > 0]
    if not biases:
        return None
    ratio = biases[-1][1] ** 2 / recurrent[1]
    return round(ratio) if abs(ratio - round(ratio)) < 1e-6 and ratio >= 1 else None


__all__ = ["InitialScale", "initial_scales"]

"""Activation kinds, where their gradient vanishes, and how to recognise them by name.

Two regions matter to gradwatch:

* the **inactive** region of the ReLU family, where the derivative is exactly 0
  (``y <= 0``); a unit that stays there for a whole batch is counted dead;
* the **flat tails** of squashing functions. A unit is in a tail when the local
  derivative has fallen below ``DEFAULT_TAIL_DERIVATIVE_FRACTION`` of its maximum.
  Expressed on the output ``y`` (which is what a forward hook sees):

  * sigmoid: ``y * (1 - y) < f / 4``, i.e. ``y < (1 - sqrt(1 - f)) / 2`` or above
    one minus that (``|x| > ~6`` at ``f = 0.01``);
  * tanh: ``1 - y**2 < f``, i.e. ``|y| > sqrt(1 - f)`` (``|x| > ~3`` at ``f = 0.01``);
  * hard sigmoid / hard tanh / ReLU6: the derivative is exactly 0 on the clipped
    plateaus (``y <= 0`` or ``y >= 1``, ``|y| >= 1``, ``y >= 6``).

Example:
    >>> from gradwatch.activations import tail_bounds
    >>> lo, hi = tail_bounds("tanh")
    >>> round(hi, 4)
    0.995
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import numpy as np

# 1% of the maximum derivative: a unit in the tail passes back <1/100 of the signal
# it would at its steepest point. SageMaker Debugger's tanh rule (|x| > 9.5) is far
# stricter; at 1% the bound is |x| > 3 for tanh and |x| > 6 for sigmoid.
DEFAULT_TAIL_DERIVATIVE_FRACTION = 0.01


class ActivationKind(str, Enum):
    """The activation families gradwatch distinguishes."""

    RELU = "relu"
    RELU6 = "relu6"
    LEAKY_RELU = "leaky_relu"
    ELU = "elu"
    GELU = "gelu"
    SILU = "silu"
    SOFTPLUS = "softplus"
    SIGMOID = "sigmoid"
    HARD_SIGMOID = "hard_sigmoid"
    TANH = "tanh"
    HARD_TANH = "hard_tanh"
    SOFTMAX = "softmax"
    OTHER = "other"


# Kinds whose derivative is exactly zero for y <= 0, so units can die.
CAN_DIE = frozenset({ActivationKind.RELU.value, ActivationKind.RELU6.value})
# Kinds with flat tails, so units can saturate.
CAN_SATURATE = frozenset(
    {
        ActivationKind.SIGMOID.value,
        ActivationKind.HARD_SIGMOID.value,
        ActivationKind.TANH.value,
        ActivationKind.HARD_TANH.value,
        ActivationKind.RELU6.value,
        ActivationKind.SOFTMAX.value,
    }
)
# Kinds whose chained derivatives are at most 1/4 (sigmoid) or 1 with fast decay
# (tanh): the classic cause of vanishing gradients in deep stacks.
SQUASHING = frozenset(
    {
        ActivationKind.SIGMOID.value,
        ActivationKind.HARD_SIGMOID.value,
        ActivationKind.TANH.value,
        ActivationKind.HARD_TANH.value,
    }
)

_ALIASES: dict[str, str] = {
    "relu": "relu",
    "relu6": "relu6",
    "leakyrelu": "leaky_relu",
    "leaky_relu": "leaky_relu",
    "prelu": "leaky_relu",
    "rrelu": "leaky_relu",
    "elu": "elu",
    "selu": "elu",
    "celu": "elu",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "mish": "silu",
    "hardswish": "silu",
    "hard_swish": "silu",
    "softplus": "softplus",
    "sigmoid": "sigmoid",
    "logsigmoid": "sigmoid",
    "hardsigmoid": "hard_sigmoid",
    "hard_sigmoid": "hard_sigmoid",
    "tanh": "tanh",
    "hardtanh": "hard_tanh",
    "hard_tanh": "hard_tanh",
    "softmax": "softmax",
    "log_softmax": "softmax",
    "logsoftmax": "softmax",
}


def kind_from_name(name: str) -> str:
    """Map a framework's activation name (``"ReLU"``, ``"hard_sigmoid"``...) to a kind.

    Unknown names map to ``"other"``.

    >>> kind_from_name("LeakyReLU")
    'leaky_relu'
    """
    return _ALIASES.get(name.lower(), ActivationKind.OTHER.value)


def tail_bounds(
    kind: str, derivative_fraction: float = DEFAULT_TAIL_DERIVATIVE_FRACTION
) -> tuple[float, float]:
    """Output-space bounds ``(lo, hi)``: a unit is in a flat tail when ``y <= lo or y >= hi``.

    Kinds without flat tails return ``(-inf, inf)``.
    """
    if not 0.0 < derivative_fraction < 1.0:
        raise ValueError(f"derivative_fraction must be in (0, 1), got {derivative_fraction}")
    if kind in (ActivationKind.SIGMOID.value, ActivationKind.SOFTMAX.value):
        lo = (1.0 - math.sqrt(1.0 - derivative_fraction)) / 2.0
        return lo, 1.0 - lo
    if kind == ActivationKind.TANH.value:
        hi = math.sqrt(1.0 - derivative_fraction)
        return -hi, hi
    if kind == ActivationKind.HARD_SIGMOID.value:
        return 0.0, 1.0
    if kind == ActivationKind.HARD_TANH.value:
        return -1.0, 1.0
    if kind == ActivationKind.RELU6.value:
        return -math.inf, 6.0
    return -math.inf, math.inf


def activation_stats_from_array(
    values: Any,
    kind: str,
    unit_axis: int = -1,
    derivative_fraction: float = DEFAULT_TAIL_DERIVATIVE_FRACTION,
) -> tuple[float, float, float]:
    """``(inactive_frac, dead_frac, tail_frac)`` of one activation output, on the host.

    ``unit_axis`` is the feature/channel axis (``-1`` for channels-last, ``1`` for
    PyTorch's NCHW); a unit is dead when it is inactive at every other index.
    Non-finite outputs count as neither inactive nor in a tail.
    """
    y = np.asarray(values, dtype=np.float64)
    if y.size == 0:
        return 0.0, 0.0, 0.0
    if y.ndim == 0:
        y = y.reshape(1)
    inactive = y <= 0.0
    # "Inactive" only means something for the ReLU family; tanh is negative half the time.
    inactive_frac = float(inactive.mean()) if kind not in SQUASHING else 0.0
    if kind in CAN_DIE:
        moved = np.moveaxis(inactive, unit_axis, -1).reshape(-1, y.shape[unit_axis])
        dead_frac = float(moved.all(axis=0).mean())
    else:
        dead_frac = 0.0
    lo, hi = tail_bounds(kind, derivative_fraction)
    tail_frac = float(((y <= lo) | (y >= hi)).mean()) if kind in CAN_SATURATE else 0.0
    return inactive_frac, dead_frac, tail_frac

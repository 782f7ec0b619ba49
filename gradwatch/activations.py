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

* the **flat negative tail** of the smooth ReLU-likes (``JUDGED_ON_INPUT``: GELU, SiLU,
  Mish, hard swish, ELU/SELU/CELU, softplus). A unit there passes back under 1% of the
  derivative's maximum, so it is dead when a whole batch sits there, and the entries
  there are in a tail. It is a half-line of the *input*: ``z <= input_tail_bound(fn)``
  (:func:`input_tail_bound`; ``-3.02`` for GELU, ``-6.14`` for SiLU, ``ln 0.01`` for
  ELU). It is no threshold on the output: GELU and SiLU are not monotonic, so
  ``y = -0.001`` comes from ``z = -3.1`` (flat) and from ``z = -0.002`` (slope 0.5).
  Adapters that see ``z`` reduce the *margin* ``max(z - bound, 0)``, which is zero exactly
  in the flat region, like a ReLU output; from outputs alone these kinds are not judged.
  The narrow band around the zero of ``f'`` (``z ~ -0.75`` for GELU) is left out:
  no unit can sit inside it for a whole batch without also crossing it.

Every observed output also counts its NaN/Inf entries (:func:`nonfinite_entries`). ``exp``
(:attr:`ActivationKind.EXP`) has neither region: it is observed for that count, since an
exp overflows to Inf from ``z > 88.7`` in float32 (``CAN_OVERFLOW``), and neither
``dead_relu`` nor ``saturation`` judges it.

Example:
    >>> from gradwatch.activations import tail_bounds
    >>> lo, hi = tail_bounds("tanh")
    >>> round(hi, 4)
    0.995
"""

from __future__ import annotations

import functools
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
    EXP = "exp"
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
# Kinds whose flat region is the input half-line z <= input_tail_bound(fn): reduced as the
# margin max(z - bound, 0), a ReLU output (zero exactly in the flat region).
JUDGED_ON_INPUT = frozenset(
    {
        ActivationKind.GELU.value,
        ActivationKind.SILU.value,
        ActivationKind.ELU.value,
        ActivationKind.SOFTPLUS.value,
    }
)
# Kinds whose output can be NaN/Inf for a finite input: exp overflows float32 from
# z > 88.7 (ln of its largest value, 3.4e38), and an unknown function may do anything.
# Every other kind is bounded or grows at most linearly (softplus, ELU, GELU and SiLU
# are ~z for large z), so a non-finite output of theirs had a non-finite input.
CAN_OVERFLOW = frozenset({ActivationKind.EXP.value, ActivationKind.OTHER.value})
# What the rules judge: units that can die (dead_relu) and outputs that can sit in a
# flat tail (saturation), whether measured on the output or on the input.
DYING_KINDS = CAN_DIE | JUDGED_ON_INPUT
SATURATING_KINDS = CAN_SATURATE | JUDGED_ON_INPUT
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
    "exp": "exp",
    "exponential": "exp",
    # Library activation modules (Hugging Face ACT2FN, timm): class name -> kind.
    "newgeluactivation": "gelu",
    "geluactivation": "gelu",
    "gelutanh": "gelu",
    "pytorchgelutanh": "gelu",
    "fastgeluactivation": "gelu",
    "quickgeluactivation": "gelu",
    "quickgelu": "gelu",
    "accurategeluactivation": "gelu",
    "clippedgeluactivation": "gelu",
    "siluactivation": "silu",
    "swishactivation": "silu",
    "mishactivation": "silu",
    "hardmish": "silu",
    "relusquaredactivation": "relu",
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


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _swish_slope(z: float, a: float) -> float:
    """d/dz of ``z * sigmoid(a z)``: SiLU (``a = 1``), quick GELU (``a = 1.702``)."""
    s = _sigmoid(a * z)
    return s + a * z * s * (1.0 - s)


def _gelu_tanh_slope(z: float) -> float:
    c = math.sqrt(2.0 / math.pi)
    t = math.tanh(c * (z + 0.044715 * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)


def _mish_slope(z: float) -> float:
    t = math.tanh(math.log1p(math.exp(z)) if z < 30 else z)
    return t + z * (1.0 - t * t) * _sigmoid(z)


def _hardswish_slope(z: float) -> float:
    return 0.0 if z <= -3.0 else (1.0 if z >= 3.0 else (2.0 * z + 3.0) / 6.0)


# f'(z) of the smooth ReLU-likes, by the name a framework calls them (F.gelu(approximate=
# "tanh") is "gelu_tanh"). GELU: Phi(z) + z phi(z) (Hendrycks & Gimpel, 2016).
_SLOPES = {
    "gelu": lambda z: (
        0.5 * math.erfc(-z / math.sqrt(2.0)) + z * math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    ),
    "gelu_tanh": _gelu_tanh_slope,
    "quick_gelu": lambda z: _swish_slope(z, 1.702),
    "silu": lambda z: _swish_slope(z, 1.0),
    "mish": _mish_slope,
    "hardswish": _hardswish_slope,
}


@functools.lru_cache(maxsize=128)
def input_tail_bound(
    fn: str,
    derivative_fraction: float = DEFAULT_TAIL_DERIVATIVE_FRACTION,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> float:
    """The input bound ``b`` of a smooth ReLU-like's flat negative tail: for every
    ``z <= b``, ``|f'(z)| < derivative_fraction * max |f'|``.

    Closed forms where there is one (at 1%): ELU ``f' = alpha e^z`` gives
    ``ln(0.01 max(1, alpha) / alpha)`` (``-4.61``; SELU's ``lambda alpha e^z`` peaks at
    ``z = 0-`` too, so the same), CELU ``alpha ln 0.01``, softplus ``f' = sigmoid(beta z)``
    gives ``ln(0.01 / 0.99) / beta`` (``-4.60``), hard swish ``-3`` (``f'`` is 0 below).
    GELU (``-3.02``; ``-3.01`` for its tanh form), quick GELU (``-3.61``), SiLU
    (``-6.14``) and Mish (``-6.16``) are solved numerically from ``f'`` above.

    >>> round(input_tail_bound("gelu"), 2), round(input_tail_bound("silu"), 2)
    (-3.02, -6.14)
    """
    f = derivative_fraction
    if not 0.0 < f < 1.0:
        raise ValueError(f"derivative_fraction must be in (0, 1), got {f}")
    if fn in ("elu", "selu"):
        a = 1.0 if fn == "selu" else alpha
        return math.log(f * max(1.0, a) / a)
    if fn == "celu":
        return alpha * math.log(f)
    if fn == "softplus":
        return math.log(f / (1.0 - f)) / beta
    slope = _SLOPES[fn]
    peak = max(abs(slope(i / 1000.0)) for i in range(-10_000, 10_001))
    limit = f * peak
    # |f'| rises from 0 at -inf: step up to the first z past the limit, then bisect.
    lo = -60.0
    hi = lo
    while abs(slope(hi)) < limit:
        lo, hi = hi, hi + 0.01
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if abs(slope(mid)) < limit else (lo, mid)
    return lo


def activation_stats_from_input(
    inputs: Any, fn: str, kind: str, unit_axis: int = -1, **params: float
) -> tuple[float, float, float]:
    """``(inactive_frac, dead_frac, tail_frac)`` of a smooth ReLU-like (``JUDGED_ON_INPUT``)
    from its input ``z``, on the host: the flat region ``z <= input_tail_bound(fn)`` is
    both the inactive entries (then dead units) and the tail. The reference of the
    adapters' margin reductions.

    >>> activation_stats_from_input([[-5.0, 1.0], [-4.0, 2.0]], "gelu", "gelu")
    (0.5, 0.5, 0.5)
    """
    z = np.asarray(inputs, dtype=np.float64)
    margin = np.maximum(z - input_tail_bound(fn, **params), 0.0)  # NaN stays NaN: not inactive
    inactive, dead, _ = activation_stats_from_array(margin, ActivationKind.RELU.value, unit_axis)
    return inactive, dead, inactive


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


def nonfinite_entries(values: Any) -> int:
    """The number of NaN/Inf entries of one activation output (the input, for the kinds
    judged on it), on the host: the reference of the adapters' device counts.

    >>> nonfinite_entries([[1.0, float("inf")], [float("nan"), 2.0]])
    2
    """
    y = np.asarray(values, dtype=np.float64)
    return int(y.size - np.count_nonzero(np.isfinite(y)))

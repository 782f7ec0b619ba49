"""Device-side activation reductions of the PyTorch adapter: the few counts a sampled
activation output needs, computed where it lives, finished on the host after the flush
(:func:`activation_fractions`). The gradient reductions live in :mod:`.grad_reductions`
(re-exported here).

As for gradients, the cost is memory traffic: CPU float32 outputs are read once by the
C kernels of :mod:`.native`; elsewhere counts are float reductions of ``sign`` into
reused scratch memory, since comparisons and ``count_nonzero`` cost 2-10x more on CPU
(docs/benchmarks.md).

Example:
    >>> import torch
    >>> y = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    >>> activation_stats_on_device(y, "relu", -1, (-float("inf"), float("inf"))).tolist()
    [0.5, 0.5, 0.0, 0.0]
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from gradwatch.adapters.torch.grad_reductions import (
    DEVICE_GRAD_ROW_FIELDS,
    GRAD_ROWS,
    SMALL_GRAD_NUMEL,
    grad_stats_on_device,
    norms_on_device,
    squared_norms_on_device,
    stats_dtype,
    total_norm_on_device,
)
from gradwatch.adapters.torch.native import CpuKernels, cpu_kernels, eligible
from gradwatch.adapters.torch.scratch import combine, scratch_like, slices

from gradwatch.activations import CAN_DIE, CAN_SATURATE, JUDGED_ON_INPUT, SQUASHING
from gradwatch.rows import ACT_ROWS

# Up to this many entries an activation is launch-bound: one count_nonzero beats three
# float ops (benchmarks/scaling.py, width-32 layers); above it, count_nonzero's
# branches mispredict and the float ops win (~6x on a 128x512 ReLU output here).
SMALL_ACTIVATION_NUMEL = 16_384


def unit_axis_of(output: torch.Tensor) -> int:
    """The feature/channel axis of an activation output: ``1`` for NCHW/NCDHW conv
    maps (4-D, 5-D), else the last axis (``(N, C)``, transformer ``(N, L, E)``).

    >>> unit_axis_of(torch.zeros(2, 3, 4, 4)), unit_axis_of(torch.zeros(2, 5))
    (1, -1)
    """
    return 1 if output.dim() >= 4 else -1


def activation_reductions_on_device(
    output: torch.Tensor, kind: str, unit_axis: int, bounds: tuple[float, float]
) -> list[torch.Tensor]:
    """The few device reductions an activation sample needs; the fractions are finished
    on the host by :func:`activation_fractions` after the flush.

    In order, only where the kind needs them:

    * ReLU family (``CAN_DIE``, outputs ``>= 0``): each unit's count of active
      (``> 0``) outputs over the batch and every other axis. The inactive fraction and
      the dead units (count 0) both follow from it. Kinds judged on their input
      (``JUDGED_ON_INPUT``: GELU, SiLU, ELU, softplus) take the margin
      ``max(z - input_tail_bound, 0)`` as ``output``: the same counts, and their tail
      is their inactive region;
    * other non-squashing kinds: the count of active outputs;
    * kinds with flat tails: the count of outputs in the tails;
    * every kind, last: the count of NaN/Inf entries (of the margin, for the kinds
      judged on their input: NaN/Inf exactly where ``z`` is).

    Counts of large outputs are float reductions of ``sign`` (comparisons and
    ``count_nonzero`` cost 2-10x more on CPU); small ReLU outputs take one
    ``count_nonzero``, which is launch-bound there. As in the host reference
    :func:`gradwatch.activations.activation_stats_from_array`, a NaN output is neither
    inactive nor in a tail.
    """
    kernels = cpu_kernels() if eligible(output) else None
    if kernels is not None:  # read in place: no autograd state to set up (~10 us a call)
        return _reductions(output, kind, unit_axis, bounds, kernels)
    with torch.no_grad():
        return _reductions(output.detach(), kind, unit_axis, bounds, None)


def _reductions(
    y: torch.Tensor,
    kind: str,
    unit_axis: int,
    bounds: tuple[float, float],
    kernels: CpuKernels | None,
) -> list[torch.Tensor]:
    """:func:`activation_reductions_on_device` on the C kernels, or on torch ops."""
    parts: list[torch.Tensor] = []
    if kind in CAN_DIE or kind in JUDGED_ON_INPUT:
        parts.append(
            kernels.active_per_unit(y, unit_axis) if kernels else _active_per_unit(y, unit_axis)
        )
    elif kind not in SQUASHING:
        parts.append(kernels.count_active(y) if kernels else _count_positive(y))
    if kind in CAN_SATURATE:
        parts.append(kernels.count_in_tails(y, bounds) if kernels else _count_in_tails(y, bounds))
    parts.append(kernels.count_nonfinite(y) if kernels else _count_nonfinite(y))
    return parts


def _active_per_unit(y: torch.Tensor, unit_axis: int) -> torch.Tensor:
    """Per unit, the count of active entries of a ReLU-family output (see
    :func:`_active_into`). A 0-d or 1-D output is one sample: each entry is its own
    unit."""
    if y.dim() <= 1:
        flat = y.reshape(-1)
        return _active_into(flat, torch.empty_like(flat)).float()
    axis = unit_axis % y.dim()
    dims = tuple(d for d in range(y.dim()) if d != axis)
    if y.numel() <= SMALL_ACTIVATION_NUMEL:
        return torch.count_nonzero(y, dim=dims)  # one launch; NaN is non-zero
    counts = [
        _active_into(piece, scratch_like(piece)).sum(dim=dims, dtype=torch.float32)
        for piece in slices(y)
    ]
    return counts[0] if len(counts) == 1 else torch.stack(counts).sum(dim=0)


def _count_positive(y: torch.Tensor) -> torch.Tensor:
    """The count of active entries of any output (see :func:`_active_into`)."""
    counts = [
        _active_into(piece, scratch_like(piece)).clamp_(min=0).sum(dtype=torch.float32)
        for piece in slices(y)
    ]
    return combine(counts, torch.sum)


def _active_into(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = sign(y)`` with NaN counted as 1: a NaN output is not inactive, as in the
    host reference (``sign`` alone maps NaN to 0 on CPU). For outputs ``>= 0`` this
    is 1 exactly where active; negative entries are -1 (callers clamp them). Float
    ops: a ``bool`` cast and an integer sum cost ~1.5x as much inside a training step."""
    return torch.nan_to_num(y, nan=1.0, out=out).sign_()


def _count_in_tails(y: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Entries with ``y <= lo or y >= hi`` (NaN is in no tail). Every tail in
    gradwatch.activations is either symmetric about a centre ``c`` (``|y - c| >= h``)
    or one-sided (``lo = -inf``); both become ``sign(d - h') = 1`` with ``h'`` the next
    float below ``h`` in ``y``'s dtype, so a value exactly on the bound (hard tanh's
    plateau) counts."""
    lo, hi = bounds
    counts = []
    for piece in slices(y):
        out = scratch_like(piece)
        if math.isinf(lo):
            distance, half = torch.sub(piece, 0.0, out=out), hi
        else:
            centre = (lo + hi) / 2.0
            distance, half = torch.sub(piece, centre, out=out).abs_(), (hi - lo) / 2.0
        below = _next_below(half, piece.dtype)
        # sign is 1 in a tail; NaN (0 on CPU, NaN elsewhere) is in no tail.
        in_tail = distance.sub_(below).sign_().nan_to_num_(nan=0.0).clamp_(min=0)
        counts.append(in_tail.sum(dtype=torch.float32))
    return combine(counts, torch.sum)


def _count_nonfinite(y: torch.Tensor) -> torch.Tensor:
    """The count of NaN/Inf entries: ``y - y`` is 0 where finite and NaN elsewhere
    (``inf - inf`` is NaN), mapped to 0/1 by ``nan_to_num`` and summed: float ops on
    reused scratch, as the other counts; a small output takes one launch-bound
    ``count_nonzero`` of ``isfinite``."""
    if y.numel() <= SMALL_ACTIVATION_NUMEL:
        return torch.count_nonzero(~torch.isfinite(y)).float()
    counts = [
        torch.sub(piece, piece, out=scratch_like(piece))
        .nan_to_num_(nan=1.0)
        .sum(dtype=torch.float32)
        for piece in slices(y)
    ]
    return combine(counts, torch.sum)


@functools.lru_cache(maxsize=64)
def _next_below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value``, as a Python float."""
    if math.isinf(value):
        return value
    exact = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(exact, torch.tensor(-math.inf, dtype=dtype)))


def activation_fractions(
    values: np.ndarray, kind: str, numel: int
) -> tuple[float, float, float, float]:
    """``(inactive_frac, dead_frac, tail_frac, nonfinite)`` (a row of
    :data:`gradwatch.rows.ACT_ROW_FIELDS`) from :func:`activation_reductions_on_device`
    values, concatenated and copied to the host."""
    n = max(1, numel)
    inactive = dead = tail = 0.0
    nonfinite = float(values[-1])
    values = values[:-1]
    if kind in CAN_SATURATE:
        tail = float(values[-1]) / n
        values = values[:-1]
    if kind in CAN_DIE or kind in JUDGED_ON_INPUT:
        inactive = 1.0 - float(values.sum()) / n
        dead = float(np.count_nonzero(values <= 0)) / max(1, values.size)
        if kind in JUDGED_ON_INPUT:  # values of the margin: its zeros are the flat tail
            tail = inactive
    elif kind not in SQUASHING:  # tanh is negative half the time: "inactive" means nothing
        inactive = 1.0 - float(values[0]) / n
    return inactive, dead, tail, nonfinite


def activation_stats_on_device(
    output: torch.Tensor, kind: str, unit_axis: int, bounds: tuple[float, float]
) -> torch.Tensor:
    """``(inactive_frac, dead_frac, tail_frac, nonfinite)`` of one activation output
    (reductions on its device, then :func:`activation_fractions`). Same definitions as
    :func:`gradwatch.activations.activation_stats_from_array` and
    :func:`gradwatch.activations.nonfinite_entries`, its host references.

    Example:
        >>> y = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
        >>> activation_stats_on_device(y, "relu", -1, (-float("inf"), float("inf"))).tolist()
        [0.5, 0.5, 0.0, 0.0]
    """
    parts = activation_reductions_on_device(output, kind, unit_axis, bounds)
    values = (
        torch.cat([p.reshape(-1).double() for p in parts]).cpu().numpy() if parts else np.zeros(0)
    )
    return torch.tensor(activation_fractions(values, kind, output.numel()))


__all__ = [
    "ACT_ROWS",
    "DEVICE_GRAD_ROW_FIELDS",
    "GRAD_ROWS",
    "SMALL_ACTIVATION_NUMEL",
    "SMALL_GRAD_NUMEL",
    "activation_fractions",
    "activation_reductions_on_device",
    "activation_stats_on_device",
    "grad_stats_on_device",
    "norms_on_device",
    "squared_norms_on_device",
    "stats_dtype",
    "total_norm_on_device",
    "unit_axis_of",
]

"""Device-side reductions of the PyTorch adapter: gradient and activation statistics
computed where the tensors live, with nothing copied to the host.

The cost of a sampled step is memory traffic, so each tensor is read from memory once.
On CPU, float32 tensors go through the one-pass C kernels of :mod:`.native` when a
C compiler is there. Everywhere else each further statistic runs on the tensor while it
is still in cache: ``|g|`` goes into a reused scratch buffer, then its sum, its max,
and (through ``sign``) its count of non-zero entries are taken in turn. Comparisons
and ``count_nonzero`` are avoided on purpose: on this project's CPU ``count_nonzero``
took 0.14-0.75 ms on a 512x512 tensor (more with more zeros: branch mispredictions)
against 0.07 ms for ``abs``, ``sign`` and a sum (docs/benchmarks.md).

Example:
    >>> import torch
    >>> grad_stats_on_device([torch.tensor([3.0, -4.0, 0.0])])[:5, 0].tolist()
    [5.0, 4.0, 7.0, 2.0, 0.0]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from gradwatch.adapters.torch.native import CpuKernels, cpu_kernels, eligible
from gradwatch.adapters.torch.scratch import (
    combine,
    scratch_like,
    scratch_view,
    slices,
)

from gradwatch.activations import CAN_DIE, CAN_SATURATE, SQUASHING
from gradwatch.rows import ACT_ROWS, GRAD_ROW_FIELDS

# Rows of grad_stats_on_device's result: the core's GRAD_ROW_FIELDS but the entry
# count, which the host knows from the layout (gradwatch.rows builds the StepStats).
DEVICE_GRAD_ROW_FIELDS = tuple(f for f in GRAD_ROW_FIELDS if f != "numel")
GRAD_ROWS = len(DEVICE_GRAD_ROW_FIELDS)

# At or below this many entries a gradient is launch-bound, not bandwidth-bound:
# groups of such tensors are reduced together in one flat pass (cat + index_add)
# instead of ~4 kernels each. benchmarks/scaling.py: with 500 layers of width 32
# the per-tensor path spent ~1 ms per step on kernel launches alone.
SMALL_GRAD_NUMEL = 16_384
# The flat pass pays ~15 fixed ops, so it only helps from a handful of tensors on.
_FLAT_MIN_TENSORS = 4
# Up to this many entries an activation is launch-bound: one count_nonzero beats three
# float ops (benchmarks/scaling.py, width-32 layers); above it, count_nonzero's
# branches mispredict and the float ops win (~6x on a 128x512 ReLU output here).
SMALL_ACTIVATION_NUMEL = 16_384


def grad_stats_on_device(
    grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Gradient statistics of dense tensors sharing one device and dtype, on that device.

    Returns a ``(6, len(grads))`` tensor (float64 for float64 and complex128 gradients,
    so a 1e200 or a subnormal norm fits; else float32) with rows: L2 norm, max |g|,
    sum |g|, number of non-zero entries, non-finite entries, and the L2 norm of each
    parameter in ``params`` (one more pass, :func:`norms_on_device`; NaN without
    ``params``). ``|g|`` is the modulus, so complex gradients keep their imaginary part.
    Nothing is copied to the host.

    Norms are taken of ``g / d`` with ``d`` the tensor's max ``|g|`` and multiplied by
    ``d`` afterwards, so squares neither overflow (1e200 in float64, 1e20 in float32)
    nor underflow (subnormals); no host sync or Python branch on a value is involved.

    Dense contiguous float32 CPU tensors take the one-pass C kernels of
    :mod:`.native` when they are built (exact non-finite counts). Otherwise two
    torch paths, with the same results on finite gradients. Small tensors (at most
    :data:`SMALL_GRAD_NUMEL` entries, when there are a few of them) are concatenated
    and reduced in one flat pass, whose non-finite row is an exact count. Larger ones
    are reduced one at a time on ``|g|`` while it is in cache (see :func:`_abs_stats`);
    their non-finite row is a 0/1 flag, a lower bound of the count. With non-finite
    entries the norm, max and sum are Inf/NaN and the non-zero count of a large
    tensor leaves NaN entries out; the adapter reports those as unknown.

    Example:
        >>> grad_stats_on_device([torch.tensor([3.0, -4.0, 0.0])])[:5, 0].tolist()
        [5.0, 4.0, 7.0, 2.0, 0.0]
    """
    device = grads[0].device
    dtype = stats_dtype(grads[0].dtype)
    weights = (
        norms_on_device(params).to(dtype)
        if params is not None
        else torch.full((len(grads),), float("nan"), dtype=dtype, device=device)
    )
    kernels = cpu_kernels() if device.type == "cpu" else None
    if kernels is not None and all(eligible(g) for g in grads):
        # One read of each gradient (cpu_kernels.c) instead of ~6 torch kernels.
        return torch.cat([kernels.grad_stats(grads), weights.unsqueeze(0)])
    with torch.no_grad():
        small = [j for j, g in enumerate(grads) if g.numel() <= SMALL_GRAD_NUMEL]
        if len(small) < _FLAT_MIN_TENSORS:
            small = []
        large = [j for j, g in enumerate(grads) if g.numel() > SMALL_GRAD_NUMEL or not small]
        blocks = []
        if small:
            blocks.append(_flat_grad_stats([grads[j] for j in small]))
        if large:
            blocks.append(_abs_stats([grads[j] for j in large]))
        stats = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        if small and large:  # back to the order of ``grads``
            stats = stats[:, _inverse_order(tuple(small + large), str(device))]
        return torch.cat([stats.to(dtype), weights.unsqueeze(0)])


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a gradient group's statistics: float64 for float64 and complex128
    (their norms can exceed float32's range), else float32.

    >>> stats_dtype(torch.bfloat16), stats_dtype(torch.complex128)
    (torch.float32, torch.float64)
    """
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def norms_on_device(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(len(tensors),)``: each tensor's L2 norm, on their device, in
    :func:`stats_dtype` (one read of each: the C kernels on CPU float32, else one fused
    ``torch._foreach_norm``, accumulated in float32 for 16-bit tensors). 64-bit tensors
    take the scaled norms of :func:`_abs_stats` instead: ``_foreach_norm`` squares
    without scaling, so a float64 norm overflows from ~1e154 on. (So does a float32 one
    from ~1e19 on the torch path: kept for its speed, since these are weight norms and
    the total norm of unsampled steps, not the per-layer gradient norms.)

    Example:
        >>> norms_on_device([torch.tensor([3.0, -4.0]), torch.tensor([3 + 4j])]).tolist()
        [5.0, 5.0]
    """
    kernels = cpu_kernels() if tensors[0].device.type == "cpu" else None
    if kernels is not None and all(eligible(t) for t in tensors):
        return kernels.sum_squares(tensors).sqrt_().float()
    with torch.no_grad():
        if stats_dtype(tensors[0].dtype) == torch.float64:
            return _abs_stats(tensors)[0]
        return _foreach_norms(tensors)


def squared_norms_on_device(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(len(tensors),)``: each tensor's sum of squares, on their device (float64 from
    the C kernels, which accumulate in double; else :func:`stats_dtype` from one fused
    ``torch._foreach_norm``).

    Example:
        >>> squared_norms_on_device([torch.tensor([3.0, -4.0]), torch.ones(2)]).tolist()
        [25.0, 2.0]
    """
    kernels = cpu_kernels() if tensors[0].device.type == "cpu" else None
    if kernels is not None and all(eligible(t) for t in tensors):
        return kernels.sum_squares(tensors)
    with torch.no_grad():
        return _foreach_norms(tensors).square()


def _foreach_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One fused ``_foreach_norm``; 16-bit tensors accumulate in float32 (a float16 norm
    overflows from 65504 on)."""
    dtype = stats_dtype(tensors[0].dtype)
    wide = dtype if tensors[0].dtype.itemsize <= 2 else None
    return torch.stack(torch._foreach_norm(list(tensors), dtype=wide)).to(dtype)


@functools.lru_cache(maxsize=32)
def _inverse_order(order: tuple[int, ...], device: str) -> torch.Tensor:
    """Column indices that put columns listed in ``order`` back in ``0..n-1`` order."""
    return torch.tensor(order).argsort().to(device)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``|g|``: the real counterpart of a complex dtype."""
    return dtype.to_real() if dtype.is_complex else dtype


def _abs_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows 0-4 of :func:`grad_stats_on_device` for tensors reduced one at a time.

    The first pass writes ``|g|`` into a reused scratch buffer (a fresh temporary per
    tensor costs page faults, ~6x the sum itself on CPU); the sum, max and non-zero
    count then read it while it is in cache, and the squared norm (a dot product) reads
    ``|g| / d`` from a second scratch buffer, ``d`` being the max clamped to the
    dtype's smallest normal number: no square overflows or underflows, whatever the
    scale. That division into the second buffer cost ~5% of this path (7.0 against
    6.7 ms for a 12x512 MLP's gradients, one thread on a loaded 2-core VM). ``sign`` of ``|g|`` is 1 exactly where ``g`` is non-zero (0 for NaN on CPU),
    so its sum is the count: 2-10x cheaper on CPU than ``count_nonzero``, whose branches
    mispredict on mixed zeros.
    """
    real = _real_dtype(grads[0].dtype)
    work = torch.float64 if real == torch.float64 else torch.float32
    tiny = torch.finfo(real).tiny
    # float32/64 sums need no cast (plain sum is ~30% faster); 16-bit ones accumulate in
    # float32.
    accumulate = None if real in (torch.float32, torch.float64) else torch.float32
    squares: list[torch.Tensor] = []  # of |g| / scale
    scales: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []
    maxes: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    for g in grads:
        part_squares, part_scales, part_sums, part_maxes, part_counts = [], [], [], [], []
        for piece in slices(g):  # one slice at a time: they share the scratch buffers
            a = torch.abs(piece, out=scratch_like(piece, real))
            peak = a.amax()
            scale = peak.clamp(min=tiny)
            scaled = torch.div(a, scale, out=scratch_like(piece, real, slot=1))
            part_squares.append(_sum_of_squares(scaled))
            part_scales.append(scale)
            part_sums.append(a.sum(dtype=accumulate))
            part_maxes.append(peak)
            part_counts.append(a.sign_().sum(dtype=accumulate))
        if len(part_squares) == 1:
            squares.append(part_squares[0])
            scales.append(part_scales[0])
        else:  # the slices' squares, rescaled to the largest slice's scale
            slice_scales = torch.stack(part_scales).to(work)
            top = slice_scales.amax()
            ratios = slice_scales / top
            squares.append((torch.stack(part_squares).to(work) * ratios * ratios).sum())
            scales.append(top)
        sums.append(combine(part_sums, torch.sum))
        maxes.append(combine(part_maxes, torch.amax))
        counts.append(combine(part_counts, torch.sum))
    max_abs = torch.stack(maxes).to(work)
    # max |g| cannot overflow, so it is non-finite exactly when an entry is.
    nonfinite = (~torch.isfinite(max_abs)).to(work)
    norms = torch.stack(squares).to(work).sqrt_().mul_(torch.stack(scales).to(work))
    return torch.stack(
        [norms, max_abs, torch.stack(sums).to(work), torch.stack(counts).to(work), nonfinite]
    )


def _sum_of_squares(a: torch.Tensor) -> torch.Tensor:
    """``sum(a**2)`` of a view of scratch slot 1: one BLAS dot for float32 and float64, else
    accumulated in float32."""
    flat = scratch_view((a.numel(),), a.dtype, a.device, slot=1)
    if a.dtype in (torch.float32, torch.float64):
        return torch.dot(flat, flat)
    squares: torch.Tensor = torch.linalg.vector_norm(flat, dtype=torch.float32).square()
    return squares


def _flat_grad_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The one-pass path of :func:`grad_stats_on_device` for many small tensors, in
    float32 (float64 for 64-bit gradients); squares of ``|g| / max |g|``, as
    :func:`_abs_stats`."""
    device = grads[0].device
    segment = _segment_ids(tuple(g.numel() for g in grads), str(device))
    flat = torch.cat([g.reshape(-1) for g in grads])
    work = torch.float64 if _real_dtype(flat.dtype) == torch.float64 else torch.float32
    a = flat.abs().to(work)
    max_abs = torch.zeros(len(grads), dtype=work, device=device).scatter_reduce_(
        0, segment, a, "amax", include_self=True
    )
    scale = max_abs.clamp(min=torch.finfo(work).tiny)
    scaled = a / scale.index_select(0, segment)
    features = torch.stack(
        [scaled * scaled, a, (flat != 0).to(work), (~torch.isfinite(flat)).to(work)]
    )
    sums = torch.zeros(4, len(grads), dtype=work, device=device).index_add_(1, segment, features)
    return torch.stack([sums[0].sqrt() * scale, max_abs, sums[1], sums[2], sums[3]])


@functools.lru_cache(maxsize=32)
def _segment_ids(sizes: tuple[int, ...], device: str) -> torch.Tensor:
    """``[0]*sizes[0] + [1]*sizes[1] + ...`` on ``device``, cached per layout."""
    counts = torch.tensor(sizes)
    return torch.repeat_interleave(torch.arange(len(sizes)), counts).to(device)


# --- activations ----------------------------------------------------------------------


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
      the dead units (count 0) both follow from it;
    * other non-squashing kinds: the count of active outputs;
    * kinds with flat tails: the count of outputs in the tails.

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
    if kind in CAN_DIE:
        parts.append(
            kernels.active_per_unit(y, unit_axis) if kernels else _active_per_unit(y, unit_axis)
        )
    elif kind not in SQUASHING:
        parts.append(kernels.count_active(y) if kernels else _count_positive(y))
    if kind in CAN_SATURATE:
        parts.append(kernels.count_in_tails(y, bounds) if kernels else _count_in_tails(y, bounds))
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


@functools.lru_cache(maxsize=64)
def _next_below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value``, as a Python float."""
    if math.isinf(value):
        return value
    exact = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(exact, torch.tensor(-math.inf, dtype=dtype)))


def activation_fractions(values: np.ndarray, kind: str, numel: int) -> tuple[float, float, float]:
    """``(inactive_frac, dead_frac, tail_frac)`` from :func:`activation_reductions_on_device`
    values, concatenated and copied to the host."""
    n = max(1, numel)
    inactive = dead = tail = 0.0
    if kind in CAN_SATURATE:
        tail = float(values[-1]) / n
        values = values[:-1]
    if kind in CAN_DIE:
        inactive = 1.0 - float(values.sum()) / n
        dead = float(np.count_nonzero(values <= 0)) / max(1, values.size)
    elif kind not in SQUASHING:  # tanh is negative half the time: "inactive" means nothing
        inactive = 1.0 - float(values[0]) / n
    return inactive, dead, tail


def activation_stats_on_device(
    output: torch.Tensor, kind: str, unit_axis: int, bounds: tuple[float, float]
) -> torch.Tensor:
    """``(inactive_frac, dead_frac, tail_frac)`` of one activation output (reductions on
    its device, then :func:`activation_fractions`). Same definitions as
    :func:`gradwatch.activations.activation_stats_from_array`, its host reference.

    Example:
        >>> y = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
        >>> activation_stats_on_device(y, "relu", -1, (-float("inf"), float("inf"))).tolist()
        [0.5, 0.5, 0.0]
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
    "unit_axis_of",
]

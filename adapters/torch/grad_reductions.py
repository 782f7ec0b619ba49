"""Device-side gradient reductions of the PyTorch adapter: the per-layer statistics of a
sampled step, the parameter norms and the total norm of the steps in between, computed
where the tensors live, with nothing copied to the host.

The cost of a sampled step is memory traffic, so each tensor is read from memory once.
On CPU, float32 tensors go through the one-pass C kernels of :mod:`.native` when a
C compiler is there. Everywhere else each further statistic runs on the tensor while it
is still in cache: ``|g|`` goes into a reused scratch buffer, then its sum, its max,
and (through ``sign``) its count of non-zero entries are taken in turn. Comparisons
and ``count_nonzero`` are avoided on purpose: on this project's CPU ``count_nonzero``
took 0.14-0.75 ms on a 512x512 tensor (more with more zeros: branch mispredictions)
against 0.07 ms for ``abs``, ``sign`` and a sum (docs/benchmarks.md).

Every norm is right at any scale (float32 entries of 1e30, float64 ones of 1e200,
subnormals) without a host sync: squares are taken of scaled values or in a wider type.

Example:
    >>> import torch
    >>> grad_stats_on_device([torch.tensor([3.0, -4.0, 0.0])])[:5, 0].tolist()
    [5.0, 4.0, 7.0, 2.0, 0.0]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from gradwatch.adapters.torch.native import all_eligible, cpu_kernels
from gradwatch.adapters.torch.scratch import combine, scratch_like, scratch_view, slices

from gradwatch.rows import GRAD_ROW_FIELDS

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
    if kernels is not None and all_eligible(grads):
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
    :func:`stats_dtype`, right at any scale (entries of 1e30 in float32, 1e200 in
    float64, subnormals), with no host sync: see :func:`exact_norms_on_device`.

    Example:
        >>> norms_on_device([torch.tensor([3.0, -4.0]), torch.tensor([3 + 4j])]).tolist()
        [5.0, 5.0]
    """
    return exact_norms_on_device(tensors).to(stats_dtype(tensors[0].dtype))


def total_norm_on_device(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d float64: the L2 norm over every entry of ``tensors`` (one device), the total
    norm of a step not sampled per layer. Each tensor's norm is exact
    (:func:`exact_norms_on_device`) and they combine scaled by their largest
    (:func:`scaled_hypot`), so a float64 total above 1e154 or a float32 one of 1e30
    entries is finite and right; no host sync.

    Example:
        >>> total_norm_on_device([torch.tensor([3.0]), torch.tensor([4.0])]).item()
        5.0
    """
    return scaled_hypot(exact_norms_on_device(tensors))


def exact_norms_on_device(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(len(tensors),)`` float64: each tensor's L2 norm, without overflow or underflow.

    * CPU float32 with the C kernels: sums of squares in double (rescaled by a power of
      two where float32 lanes would overflow), one read of each tensor;
    * 16/32-bit tensors elsewhere (CUDA): one fused ``torch._foreach_norm`` accumulated
      in float64 (squares of float32 entries fit there), still one read of each;
    * otherwise (float64, and the CPU without the kernels, where float64 accumulation in
      ``_foreach_norm`` is ~20x slower than float32): per tensor in scratch memory,
      see :func:`_scratch_norm`.
    """
    kernels = cpu_kernels() if tensors[0].device.type == "cpu" else None
    if kernels is not None and all_eligible(tensors):
        return kernels.sum_squares(tensors).sqrt_()
    with torch.no_grad():
        real = _real_dtype(tensors[0].dtype)
        if tensors[0].device.type != "cpu" and real != torch.float64:
            wide = torch.complex128 if tensors[0].dtype.is_complex else torch.float64
            return torch.stack(torch._foreach_norm(list(tensors), dtype=wide)).double()
        return torch.stack([_scratch_norm(t) for t in tensors])


def scaled_hypot(norms: torch.Tensor) -> torch.Tensor:
    """0-d: ``sqrt(sum(norms ** 2))`` taken as ``m * sqrt(sum((norms / m) ** 2))`` with
    ``m`` the largest, so no square overflows (Inf stays Inf, NaN stays NaN).

    >>> scaled_hypot(torch.tensor([3e200, 4e200], dtype=torch.float64)).item()
    5e+200
    """
    top = norms.amax()
    scale = top.clamp(min=torch.finfo(norms.dtype).tiny)
    total = (norms / scale).square().sum().sqrt() * scale
    return torch.where(torch.isinf(top), top, total)


def squared_norms_on_device(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(len(tensors),)`` float64: each tensor's sum of squares (the square of
    :func:`exact_norms_on_device`; it overflows for norms above ~1e154).

    Example:
        >>> squared_norms_on_device([torch.tensor([3.0, -4.0]), torch.ones(2)]).tolist()
        [25.0, 2.0]
    """
    kernels = cpu_kernels() if tensors[0].device.type == "cpu" else None
    if kernels is not None and all_eligible(tensors):
        return kernels.sum_squares(tensors)
    return exact_norms_on_device(tensors).square()


def _scratch_norm(t: torch.Tensor) -> torch.Tensor:
    """0-d float64: the L2 norm of one tensor, a slice at a time through scratch
    memory. 16/32-bit entries are widened to float64 (their squares fit) and summed by
    one BLAS dot; float64 entries are divided by their largest first (1e200 squared
    would overflow). A complex tensor is read as its real and imaginary parts."""
    real = torch.view_as_real(t) if t.is_complex() else t
    squares: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    for piece in slices(real):
        flat = scratch_view((piece.numel(),), torch.float64, piece.device)
        if piece.dtype == torch.float64:
            peak = torch.linalg.vector_norm(piece, ord=math.inf)
            scale = peak.clamp(min=torch.finfo(torch.float64).tiny)
            torch.div(piece, scale, out=scratch_like(piece))
            scales.append(scale)
        else:
            scratch_like(piece, torch.float64).copy_(piece)
        squares.append(torch.dot(flat, flat))
    if not scales:
        return combine(squares, torch.sum).sqrt()
    if len(squares) == 1:
        return squares[0].sqrt() * scales[0]
    each = torch.stack(squares).sqrt() * torch.stack(scales)  # per slice, then combined
    return scaled_hypot(each)


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
    6.7 ms for a 12x512 MLP's gradients, one thread on a loaded 2-core VM). ``sign`` of
    ``|g|`` is 1 exactly where ``g`` is non-zero (0 for NaN on CPU), so its sum is the
    count: 2-10x cheaper on CPU than ``count_nonzero``, whose branches mispredict on
    mixed zeros.
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


__all__ = [
    "DEVICE_GRAD_ROW_FIELDS",
    "GRAD_ROWS",
    "SMALL_GRAD_NUMEL",
    "exact_norms_on_device",
    "grad_stats_on_device",
    "norms_on_device",
    "scaled_hypot",
    "squared_norms_on_device",
    "stats_dtype",
    "total_norm_on_device",
]

"""Scratch memory of the device reductions: reusable buffers per thread, dtype and
device, cached views of them, and the slicing that keeps a large tensor's pieces in
cache.

A fresh temporary per tensor costs page faults (~6x the sum itself on CPU, see
``_abs_stats`` in :mod:`.reductions`), so every ``|g|``, sign or distance that the
reductions compute is written into these buffers. They belong to the calling thread:
two models watched in two threads never write into each other's buffers (each watch
reduces in the thread that runs its training step).

Example:
    >>> import torch
    >>> [p.shape[0] for p in slices(torch.zeros(3, 2))]
    [3]
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import torch

# Larger tensors are reduced in slices of at most this many entries (4 MB of float32):
# each slice stays in cache across its statistics, and the scratch buffer stays small
# even for a 50M-entry embedding gradient or a large convolution output.
CHUNK_NUMEL = 1 << 20


def scratch_like(
    piece: torch.Tensor, dtype: torch.dtype | None = None, slot: int = 0
) -> torch.Tensor:
    """A contiguous view of this thread's scratch buffer ``slot`` shaped like ``piece``
    (of ``dtype``, default ``piece``'s: ``|z|`` of a complex tensor is real)."""
    return scratch_view(piece.shape, dtype or piece.dtype, piece.device, slot)


def scratch_view(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: int = 0
) -> torch.Tensor:
    """A contiguous ``shape`` view of the first entries of this thread's scratch buffer
    ``slot`` (two slots: a reduction can hold ``|g|`` and a scaled copy at once).
    Views are cached: slicing and viewing cost ~10 us of Python per call, as much as
    the reduction of a 64K-entry activation."""
    state = _THREAD_SCRATCH
    key = (tuple(shape), dtype, device, slot)
    view = state.views.get(key)
    if view is None:
        if len(state.views) >= _MAX_SCRATCH_VIEWS:  # e.g. varying sequence lengths
            state.views.clear()
        n = math.prod(shape)
        view = _scratch(state, n, dtype, device, slot)[:n].view(shape)
        state.views[key] = view
    return view


def combine(values: list[torch.Tensor], reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
    """One 0-d result from the per-slice results (no op for a single slice)."""
    return values[0] if len(values) == 1 else reduce(torch.stack(values))


def slices(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """``t`` as views of at most :data:`CHUNK_NUMEL` entries, split along dim 0 (any
    strides; a single row larger than that stays whole)."""
    if t.dim() == 0:
        yield t.reshape(1)
        return
    if t.numel() <= CHUNK_NUMEL or t.shape[0] <= 1:
        yield t
        return
    rows = max(1, CHUNK_NUMEL // max(1, t[0].numel()))
    yield from torch.split(t, rows)


_MAX_SCRATCH_VIEWS = 256


class _ThreadScratch(threading.local):
    """One thread's buffers (per dtype, device and slot) and their cached views."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}
        self.views: dict[tuple[tuple[int, ...], torch.dtype, torch.device, int], torch.Tensor] = {}


_THREAD_SCRATCH = _ThreadScratch()


def _scratch(
    state: _ThreadScratch, numel: int, dtype: torch.dtype, device: torch.device, slot: int
) -> torch.Tensor:
    """A reusable 1-D buffer of at least ``numel`` entries (one per thread, dtype, device
    and slot). Reuse is safe on a device: kernels on one stream run in issue order."""
    key = (dtype, device, slot)
    buffer = state.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        state.buffers[key] = buffer
        state.views.clear()  # views of the old buffer would keep it alive
    return buffer


__all__ = ["CHUNK_NUMEL", "combine", "scratch_like", "scratch_view", "slices"]

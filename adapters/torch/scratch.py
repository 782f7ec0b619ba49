"""Scratch memory of the device reductions: one reusable buffer per dtype and device,
cached views of it, and the slicing that keeps a large tensor's pieces in cache.

A fresh temporary per tensor costs page faults (~6x the sum itself on CPU, see
``_abs_stats`` in :mod:`.reductions`), so every ``|g|``, sign or distance that the
reductions compute is written into this buffer.

Example:
    >>> import torch
    >>> [p.shape[0] for p in slices(torch.zeros(3, 2))]
    [3]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

# Larger tensors are reduced in slices of at most this many entries (4 MB of float32):
# each slice stays in cache across its statistics, and the scratch buffer stays small
# even for a 50M-entry embedding gradient or a large convolution output.
CHUNK_NUMEL = 1 << 20


def scratch_like(piece: torch.Tensor) -> torch.Tensor:
    """A contiguous view of the shared scratch buffer shaped like ``piece``."""
    return scratch_view(piece.shape, piece.dtype, piece.device)


def scratch_view(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous ``shape`` view of the scratch buffer's first entries. Views are
    cached: slicing and viewing cost ~10 us of Python per call, as much as the
    reduction of a 64K-entry activation."""
    key = (tuple(shape), dtype, device)
    view = _SCRATCH_VIEWS.get(key)
    if view is None:
        if len(_SCRATCH_VIEWS) >= _MAX_SCRATCH_VIEWS:  # e.g. varying sequence lengths
            _SCRATCH_VIEWS.clear()
        n = math.prod(shape)
        view = _scratch(n, dtype, device)[:n].view(shape)
        _SCRATCH_VIEWS[key] = view
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


_SCRATCH: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_SCRATCH_VIEWS: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}
_MAX_SCRATCH_VIEWS = 256


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable 1-D buffer of at least ``numel`` entries (one per dtype and device).
    Reuse is safe on a device: kernels on one stream run in issue order."""
    key = (dtype, device)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[key] = buffer
        _SCRATCH_VIEWS.clear()  # views of the old buffer would keep it alive
    return buffer


__all__ = ["CHUNK_NUMEL", "combine", "scratch_like", "scratch_view", "slices"]

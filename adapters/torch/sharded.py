"""Sharded gradients (FSDP2 ``fully_shard``, DTensor): statistics of the whole tensor
from each rank's shard.

Each rank reduces its local shard on its device, then one ``all_reduce`` (max) of the
max |g| and the norms and one (sum) of the scaled squares, sums and counts make every
rank hold the statistics of the whole gradient: norms combine as the square root of the
summed squares over ranks, scaled by the largest (1e200 squared would overflow), never
per shard. Replicated placements need no combining (the local
tensor is the whole tensor). Layouts gradwatch cannot combine correctly (``Partial``
placements, several sharded mesh dimensions) are left out of the statistics and said
so in the report.

Every rank runs the same steps and so issues the same collectives in the same order,
at the optimizer step, on the mesh's own process group, as FSDP does. A rank whose
monitoring an internal error switched off still joins them, on zeros
(``GradReducer.join_collectives`` in :mod:`.grads`), so the other ranks never wait for it.

Example:
    >>> import torch
    >>> sharding_of(torch.zeros(2)) is None  # a plain tensor: nothing to combine
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sharding:
    """How a DTensor is laid out: ``group`` is the process group its shards span
    (``None`` when replicated), ``supported`` whether gradwatch can combine it."""

    group: Any
    supported: bool


@functools.lru_cache(maxsize=1)
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor  # type: ignore[no-any-return]


def _is_dtensor(t: torch.Tensor) -> bool:
    # Plain tensors first: this runs per gradient per reduced step.
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def sharding_of(t: torch.Tensor) -> Sharding | None:
    """``None`` for a plain tensor; for a DTensor, the group to combine its shards over."""
    if not _is_dtensor(t):
        return None
    placements = t.placements  # type: ignore[attr-defined]
    sharded = [d for d, p in enumerate(placements) if p.is_shard()]
    if any(p.is_partial() for p in placements) or len(sharded) > 1:
        return Sharding(group=None, supported=False)
    if not sharded:
        return Sharding(group=None, supported=True)
    return Sharding(group=t.device_mesh.get_group(sharded[0]), supported=True)  # type: ignore[attr-defined]


def local_values(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a zero when the shard is empty: uneven sharding can leave
    a rank nothing, and a zero changes no statistic), else ``t``."""
    if not _is_dtensor(t):
        return t
    local: torch.Tensor = t.to_local()  # type: ignore[attr-defined]
    return local if local.numel() else local.new_zeros(1)


def combine_grad_stats(stats: torch.Tensor, group: Any) -> torch.Tensor:
    """Rows of :func:`.grad_reductions.grad_stats_on_device` over the shards of
    ``group``: norms (gradient and parameter rows) combine as :func:`combine_norms`
    does, sums and counts add up, the max is the largest. Two collectives, in this
    order on every rank: a max, then a sum."""
    import torch.distributed as dist

    largest = torch.stack([stats[1], stats[0], stats[5]])
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    tiny = torch.finfo(stats.dtype).tiny
    norm_scale, weight_scale = largest[1].clamp(min=tiny), largest[2].clamp(min=tiny)
    summed = torch.stack(
        [
            (stats[0] / norm_scale).square(),
            stats[2],
            stats[3],
            stats[4],
            (stats[5] / weight_scale).square(),
        ]
    )
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return torch.stack(
        [
            summed[0].sqrt() * norm_scale,
            largest[0],
            summed[1],
            summed[2],
            summed[3],
            summed[4].sqrt() * weight_scale,
        ]
    )


def combine_norms(norms: torch.Tensor, group: Any) -> torch.Tensor:
    """L2 norms of shards combined over ``group`` (``sqrt`` of the summed squares),
    scaled by the largest across ranks so 1e200 does not overflow when squared: a max,
    then a sum of ``(norm / max) ** 2``."""
    import torch.distributed as dist

    top = norms.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    scale = top.clamp(min=torch.finfo(norms.dtype).tiny)
    squares = (norms / scale).square()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    return squares.sqrt() * scale


__all__ = ["Sharding", "combine_grad_stats", "combine_norms", "local_values", "sharding_of"]

"""Sharded gradients (FSDP2 ``fully_shard``, DTensor): statistics of the whole tensor
from each rank's shard.

Each rank reduces its local shard on its device, then one ``all_reduce`` (sum) of the
squares, sums and counts and one (max) of the max |g| make every rank hold the
statistics of the whole gradient: norms combine as the square root of the summed
squares over ranks, never per shard. Replicated placements need no combining (the local
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
    """Rows of :func:`.reductions.grad_stats_on_device` over the shards of
    ``group``: squares (norm and parameter norm rows), sums and counts add up, the max
    is the largest."""
    import torch.distributed as dist

    summed = torch.stack([stats[0].square(), stats[2], stats[3], stats[4], stats[5].square()])
    largest = stats[1].clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    return torch.stack(
        [summed[0].sqrt(), largest, summed[1], summed[2], summed[3], summed[4].sqrt()]
    )


def combine_sum(value: torch.Tensor, group: Any) -> torch.Tensor:
    """``value`` summed over the shards of ``group`` (a sum of squares, say)."""
    import torch.distributed as dist

    total = value.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


__all__ = ["Sharding", "combine_grad_stats", "combine_sum", "local_values", "sharding_of"]

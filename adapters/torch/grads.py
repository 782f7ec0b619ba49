"""Gradient reduction of the PyTorch adapter: :class:`GradReducer`.

It owns the watched parameters and their layer names (replaced whole when the watch
finds them again), the grouping of their gradients
for fused reductions (one device and dtype, and for sharded gradients one process
group), and the cached column layout of a step's statistics. Nothing here syncs with
the host.

Example:
    >>> import torch
    >>> from gradwatch.adapters.torch.flush import PendingStep
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> w.grad = torch.tensor([3.0, -4.0, 0.0])
    >>> reducer, pending = GradReducer([("w", w)], note=print), PendingStep(step=0)
    >>> reducer.reduce_grads(pending)
    >>> pending.grad_parts[0][:5, 0].tolist()
    [5.0, 4.0, 7.0, 2.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np
import torch
from gradwatch.adapters.torch.flush import GradLayout, PendingStep
from gradwatch.adapters.torch.grad_reductions import (
    GRAD_ROWS,
    grad_stats_on_device,
    total_norm_on_device,
)
from gradwatch.adapters.torch.sharded import (
    combine_grad_stats,
    combine_norms,
    local_values,
    sharding_of,
)


@dataclass
class _GradGroup:
    """Parameters whose gradients are reduced together (one device and dtype, and for
    sharded gradients one process group to combine the shards over)."""

    indices: list[int]
    device: torch.device
    shard_group: Any = None
    plain: bool = False  # dense tensors, not DTensors: reduced as they are

    def tensors(self, by_index: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The tensors to reduce, from gradients (or parameters) by index."""
        if self.plain:
            return [by_index[i] for i in self.indices]
        return [_dense_values(by_index[i]) for i in self.indices]


class GradReducer:
    """Reduces the watched parameters' gradients on their devices.

    Args:
        named_params: ``(layer name, parameter)`` pairs in model order.
        note: adds a coverage note to the report.
    """

    def __init__(
        self, named_params: Sequence[tuple[str, torch.Tensor]], note: Callable[[str], None]
    ) -> None:
        self._note = note
        self._samples = 0  # steps reduced per layer so far
        self.set_params(named_params)

    def set_params(self, named_params: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Watch these parameters from now on (the pending steps must be flushed first:
        their columns index the old list)."""
        self.names = [n for n, _ in named_params]
        self.params: list[torch.Tensor] = [p for _, p in named_params]
        self._groups_key: tuple[tuple[Any, ...], ...] | None = None
        self._groups: list[_GradGroup] = []
        self._layouts: dict[tuple[int, ...], GradLayout] = {}

    @property
    def sharded(self) -> bool:
        """Whether some gradients are combined across ranks (so every rank must join)."""
        return any(g.shard_group is not None for g in self._groups)

    def reduce_grads(self, pending: PendingStep) -> None:
        """Per-layer statistics of the present gradients, into ``pending``."""
        params = self.params
        grads = self._live_grads()
        if not grads:
            return
        # Weights move slowly: their norms on every 5th sample (and the first 5) are
        # enough for the rules' window medians, at a fifth of the cost.
        with_weights = self._samples < 5 or self._samples % 5 == 0
        self._samples += 1
        for group in self._groups:
            tensors = group.tensors(grads)
            pending.grad_indices.extend(group.indices)
            weights = None
            if with_weights:  # read in place (no autograd: C kernels or no_grad torch ops)
                weights = [
                    params[i] if group.plain else local_values(params[i].detach())
                    for i in group.indices
                ]
            stats = grad_stats_on_device(tensors, weights)
            if group.shard_group is not None:
                stats = combine_grad_stats(stats, group.shard_group)
            pending.grad_parts.append(stats)
        for i, g in grads.items():
            if g.is_sparse:
                pending.sparse_numel[i] = g.numel()

    def reduce_total_norm(self, pending: PendingStep) -> None:
        """One fused norm per device group: the total norm of a step not sampled per
        layer, so growth, spikes and NaN between samples are still seen. Each group's is
        a 0-d norm, right at any scale (never a sum of squares, which overflows)."""
        grads = self._live_grads()
        if not grads:
            return
        with torch.no_grad():
            for group in self._groups:
                norm = total_norm_on_device(group.tensors(grads))
                if group.shard_group is not None:
                    norm = combine_norms(norm, group.shard_group)
                pending.total_parts.append(norm)

    def join_collectives(self, per_layer: bool) -> None:
        """The all_reduces of one step's reductions, on zeros: what a healthy watch on
        another rank issues at this step (:meth:`reduce_grads` when ``per_layer``, else
        :meth:`reduce_total_norm`), in the same order and shapes."""
        for group in self._groups:
            if group.shard_group is None:
                continue
            if per_layer:
                zeros = torch.zeros(GRAD_ROWS, len(group.indices), device=group.device)
                combine_grad_stats(zeros, group.shard_group)
            else:
                zero = torch.zeros((), dtype=torch.float64, device=group.device)
                combine_norms(zero, group.shard_group)

    def layout(self, record: PendingStep) -> GradLayout:
        """Column order (model order), layer names and entry counts of a record's
        gradients; cached per layout, since it is the same on almost every step."""
        key = tuple(record.grad_indices)
        cached = None if record.sparse_numel else self._layouts.get(key)
        if cached is not None:
            return cached
        order = np.argsort(record.grad_indices, kind="stable")
        indices = [record.grad_indices[j] for j in order]
        layout = (
            order,
            tuple(self.names[i] for i in indices),
            np.array(
                [record.sparse_numel.get(i, self._param_numel(i)) for i in indices],
                dtype=np.float64,
            ),
        )
        if not record.sparse_numel:  # nnz of a sparse gradient changes every step
            self._layouts[key] = layout
        return layout

    def close(self) -> None:
        """Let go of the parameters."""
        self.params = []
        self._groups = []

    def _param_numel(self, index: int) -> int:
        return int(self.params[index].numel()) if index < len(self.params) else 0

    def _live_grads(self) -> dict[int, torch.Tensor]:
        """Present gradients by parameter index; regroups when their layout changes.

        It runs on every step that is reduced, so the common case (every watched
        parameter trainable and with a gradient) reads each attribute in one C-level
        ``map`` (~0.2 us a tensor; a Python loop over the tensors took ~2.5 us each)."""
        params = self.params
        grads = list(map(_GRAD, params))
        # (``is None``, never ``None in grads``: that compares tensors with ==.)
        if any(g is None for g in grads) or not all(map(_REQUIRES_GRAD, params)):
            live = [
                (i, g) for i, g in enumerate(grads) if g is not None and params[i].requires_grad
            ]
            indices: tuple[int, ...] | None = tuple(i for i, _ in live)
            grads = [g for _, g in live]
        else:
            indices = None  # all of them
        if not grads:
            return {}
        # What the grouping depends on, per gradient: its index, dtype, device, type
        # (a DTensor) and layout (sparse); a parameter's size never changes.
        key = (
            indices,
            len(grads),
            tuple(map(_DTYPE, grads)),
            tuple(map(_DEVICE, grads)),
            tuple(map(type, grads)),
            tuple(map(_LAYOUT, grads)),
        )
        by_index = dict(zip(range(len(grads)) if indices is None else indices, grads, strict=True))
        if key != self._groups_key:
            live_items = [(i, g) for i, g in by_index.items() if g.numel() > 0]
            self._groups, left_out = group_params(live_items)
            self._groups_key = key
            if left_out:
                self._note(
                    "Left out of the statistics: sharded gradients whose layout gradwatch "
                    "cannot combine across ranks (Partial placements or several sharded "
                    f"mesh dimensions): {', '.join(self.names[i] for i in left_out)}."
                )
        return by_index


_GRAD = attrgetter("grad")
_REQUIRES_GRAD = attrgetter("requires_grad")
_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")
_LAYOUT = attrgetter("layout")


def _dense_values(grad: torch.Tensor | None) -> torch.Tensor:
    """A sparse gradient's stored values (its other entries are zeros), a sharded one's
    local shard, else the gradient."""
    assert grad is not None
    if not grad.is_sparse:
        return local_values(grad)
    values = grad.coalesce().values()
    # an all-zero sparse gradient stores nothing; one explicit zero has the same statistics
    return values if values.numel() else values.new_zeros(1)


def group_params(
    live: Sequence[tuple[int, torch.Tensor | None]],
) -> tuple[list[_GradGroup], list[int]]:
    """Dense gradients grouped by (device, dtype, shard group) for fused reductions,
    sparse ones alone; and the indices of sharded gradients that cannot be combined."""
    groups: dict[Any, _GradGroup] = {}
    singles: list[_GradGroup] = []
    left_out: list[int] = []
    for i, g in live:
        if g is None:
            continue
        if g.is_sparse:
            singles.append(_GradGroup([i], g.device))
            continue
        sharding = sharding_of(g)
        if sharding is not None and not sharding.supported:
            left_out.append(i)
            continue
        shard_group = sharding.group if sharding is not None else None
        key = (g.device, g.dtype, id(shard_group), sharding is None)
        group = groups.setdefault(key, _GradGroup([], g.device, shard_group, sharding is None))
        group.indices.append(i)
    return [*groups.values(), *singles], left_out


__all__ = ["GradReducer", "group_params"]

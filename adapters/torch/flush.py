"""Steps waiting on the device, and the one host transfer that turns them into
:class:`~gradwatch.StepStats`: :class:`PendingSteps`.

Each step's reductions stay on their device as a :class:`PendingStep` until the flush
copies every pending tensor of a device to the host in one ``cat`` and one copy; the
rows are then built into ``StepStats`` by :func:`gradwatch.rows.step_stats_from_rows`.

Example:
    >>> pending = PendingSteps(layout=lambda record: None)
    >>> pending.add(PendingStep(step=0, skipped=True))
    >>> pending.drain(is_output=lambda name: False)[0].skipped_step
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from gradwatch.adapters.torch.grad_reductions import GRAD_ROWS
from gradwatch.adapters.torch.reductions import activation_fractions

from gradwatch.rows import ACT_ROWS, GRAD_ROW_FIELDS, step_stats_from_rows
from gradwatch.stats import StepStats

# The device rows lack the entry count (the host knows it from the layout): it goes here.
_NUMEL_ROW = GRAD_ROW_FIELDS.index("numel")

# A record's gradient columns: their order (model order), layer names and entry counts.
GradLayout = tuple[np.ndarray, tuple[str, ...], np.ndarray]


@dataclass
class PendingStep:
    """One step's device results, waiting for the next flush."""

    step: int
    skipped: bool = False
    grad_indices: list[int] = field(default_factory=list)
    grad_parts: list[torch.Tensor] = field(default_factory=list)
    # Unsampled steps: per device group, the total gradient norm (0-d).
    total_parts: list[torch.Tensor] = field(default_factory=list)
    sparse_numel: dict[int, int] = field(default_factory=dict)
    act_names: list[str] = field(default_factory=list)
    act_kinds: list[str] = field(default_factory=list)
    act_numel: list[int] = field(default_factory=list)
    # Per activation, the raw reductions of activation_reductions_on_device.
    act_parts: list[list[torch.Tensor]] = field(default_factory=list)
    # Per recurrent layer: its name, time steps and [first, last] input-gradient RMS.
    time_names: list[str] = field(default_factory=list)
    time_lengths: list[int] = field(default_factory=list)
    time_parts: list[torch.Tensor] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing was measured at this step (and it was not skipped)."""
        return not (
            self.skipped or self.grad_parts or self.total_parts or self.act_parts or self.time_parts
        )


class PendingSteps:
    """The steps not flushed yet.

    Args:
        layout: a record's :data:`GradLayout` (from the gradient reducer, which knows
            the layer names and entry counts).
    """

    def __init__(self, layout: Callable[[PendingStep], GradLayout]) -> None:
        self._records: list[PendingStep] = []
        self._layout = layout

    def add(self, record: PendingStep) -> None:
        """Keep ``record`` for the next flush, unless it holds nothing."""
        if not record.empty:
            self._records.append(record)

    def clear(self) -> None:
        self._records.clear()

    def drain(self, is_output: Callable[[str], bool]) -> list[StepStats]:
        """Every pending step as ``StepStats``, in step order, after one host transfer
        per device; ``is_output`` says which activations made the model output."""
        pending, self._records = self._records, []
        if not pending:
            return []
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for record in pending:
            act_tensors = [t for parts in record.act_parts for t in parts]
            for t in (*record.grad_parts, *record.total_parts, *act_tensors, *record.time_parts):
                by_device.setdefault(t.device, []).append(t.reshape(-1))
        host: dict[torch.device, Iterator[np.ndarray]] = {}
        for device, parts in by_device.items():
            flat = torch.cat(parts).to("cpu").numpy().astype(np.float64)
            sizes = np.cumsum([p.numel() for p in parts])[:-1]
            host[device] = iter(np.split(flat, sizes))
        return [self._to_step_stats(record, host, is_output) for record in pending]

    def _to_step_stats(
        self,
        record: PendingStep,
        host: dict[torch.device, Iterator[np.ndarray]],
        is_output: Callable[[str], bool],
    ) -> StepStats:
        if record.skipped:
            return step_stats_from_rows(record.step, skipped=True)
        # Read in the order drain() concatenated them: gradients, total norms, activations,
        # through-time gradients.
        grad_cols = [next(host[t.device]).reshape(GRAD_ROWS, -1) for t in record.grad_parts]
        total_norm = None
        if record.total_parts:  # hypot scales: groups of 1e200 do not overflow
            total_norm = math.hypot(*(float(next(host[t.device])[0]) for t in record.total_parts))
        layers: tuple[str, ...] = ()
        grad_rows = None
        if grad_cols:
            order, layers, numel = self._layout(record)
            device_rows = np.concatenate(grad_cols, axis=1)[:, order]
            grad_rows = np.insert(device_rows, _NUMEL_ROW, numel, axis=0)
        act_rows = None
        if record.act_parts:
            act_rows = np.array(
                [
                    activation_fractions(
                        np.concatenate([next(host[t.device]) for t in parts] or [np.zeros(0)]),
                        kind,
                        numel,
                    )
                    for parts, kind, numel in zip(
                        record.act_parts, record.act_kinds, record.act_numel, strict=True
                    )
                ]
            ).reshape(-1, ACT_ROWS)
        time_rows = None
        if record.time_parts:
            time_rows = np.stack([next(host[t.device]) for t in record.time_parts])
        return step_stats_from_rows(
            record.step,
            layers,
            grad_rows,
            act_layers=record.act_names,
            act_kinds=record.act_kinds,
            act_is_output=[is_output(name) for name in record.act_names],
            act_rows=act_rows,
            time_layers=record.time_names,
            time_length=record.time_lengths,
            time_rows=time_rows,
            grad_total_norm=total_norm,
        )


__all__ = ["GradLayout", "PendingStep", "PendingSteps"]

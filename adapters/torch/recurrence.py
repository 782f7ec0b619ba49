"""Through-time gradients of the PyTorch adapter: :class:`RecurrenceProbe`.

For every ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` (any ``nn.RNNBase``) it measures, on
sampled training steps, the RMS over batch and features of dL/d(input) at the layer's
first and at its last time step (``StepStats.time_grad_first`` / ``time_grad_last``).
Parameter norms cannot show a gradient that dies on its way back through 200 time
steps: the recurrent weights still get the gradient of the last few steps.

How: on a sampled step, a forward pre-hook passes the layer's input through
:class:`_Tap`, an autograd function that returns a view of the input (the layer computes
exactly what it computed before) and, in the backward pass, reduces the gradient arriving
at the input on its device and hands it back unchanged (upstream modules get the very same
gradient). An input that requires no gradient (data) gets one through a scalar anchor
that requires one, so the tap runs; nothing else in the graph changes. The reductions
join the flush's one host transfer (:class:`.flush.PendingStep`); there is no host sync.

What is measured, layer by layer:

* the time axis is 1 with ``batch_first=True`` and a batched (3-D) input, else 0;
* a multi-layer stack is one layer here: its input gradient has gone back through all of
  its layers (the name is the module's, like its parameters' group);
* a bidirectional layer's input gradient sums both directions: the backward direction
  reads the first step last, so its short path reaches it. With a read-out of the last
  step's output (whose backward half has seen one step), the first step only gets the
  forward direction's long path and its decay shows; with a read-out of both final
  states each end gets a short path and the decay inside is not seen (a miss, never a
  false alarm);
* a ``PackedSequence`` input is not measured (its sequences end at different steps, so
  there is no common last step); the report says so once;
* only training forwards count: eval mode, ``torch.no_grad()`` and a forward being traced
  by ``torch.compile`` get no tap, and a ``torch.compile``'d model gets no hook at all.

The hooks live only while a step is sampled (an unsampled step runs no gradwatch code in
the layer), are removed at :meth:`RecurrenceProbe.close`, and copies and pickles of the
model carry none (:func:`.gate.register_module_hook`).

Example:
    >>> import torch
    >>> from gradwatch.guard import Guard
    >>> from gradwatch.schedules import every
    >>> probe = RecurrenceProbe(HookGate(Guard("demo"), lambda: True), every(1), print)
    >>> probe.find_layers(torch.nn.Sequential(torch.nn.GRU(2, 4)))["0.weight_hh_l0"].kind
    'GRU'
    >>> probe.names
    ('0',)
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from gradwatch.adapters.torch.flush import PendingStep
from gradwatch.adapters.torch.gate import GateHook, HookGate, register_module_hook
from gradwatch.adapters.torch.wrappers import strip_wrapper_prefixes
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from gradwatch.layer_info import LayerInfo
from gradwatch.schedules import Schedule

# nn.RNNBase.mode -> the layer kind the rules read (LayerInfo.kind): a plain RNN or a gated one.
_KIND_OF_MODE = {"RNN_TANH": "RNN", "RNN_RELU": "RNN", "LSTM": "LSTM", "GRU": "GRU"}


class _Tap(torch.autograd.Function):
    """Identity on the forward pass; on the backward pass reports the gradient arriving
    at its output, and passes it on unchanged."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, anchor: torch.Tensor, report: Callable[[torch.Tensor], None]
    ) -> torch.Tensor:
        ctx.report = report
        return x.view_as(x)  # the same data: the layer's output stays bit-identical

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        ctx.report(grad)
        return (grad if ctx.needs_input_grad[0] else None), None, None


class _InputHook(GateHook):
    """A forward pre-hook that may replace the layer's input (the tapped one). Like every
    :class:`GateHook` it runs only while the gate is open, and copies leave it out."""

    def __call__(self, *args: Any) -> Any:
        if not self.gate.enabled:
            return None
        with self.gate.guard:
            return self.fn(*args)
        return None  # an internal error: the guard switched monitoring off


def _time_axis(module: nn.RNNBase, x: torch.Tensor) -> int:
    return 1 if module.batch_first and x.dim() == 3 else 0


def _first_last_rms(grad: torch.Tensor, axis: int) -> torch.Tensor:
    """``[rms at the first step, rms at the last step]`` in float64 on the device: a
    gradient that underflows through time (1e-40) must not square to 0 in float32."""
    per_step = grad.numel() // grad.shape[axis]
    ends = torch.stack(
        [
            torch.linalg.vector_norm(grad.select(axis, 0), dtype=torch.float64),
            torch.linalg.vector_norm(grad.select(axis, -1), dtype=torch.float64),
        ]
    )
    return ends / math.sqrt(max(per_step, 1))


class RecurrenceProbe:
    """Measures how the gradient decays through time in the recurrent layers, on the
    steps ``schedule`` samples.

    Args:
        gate: runs the hooks only while monitoring is on, inside its guard.
        schedule: ``step -> bool``, the steps measured (the watch passes its gradient
            schedule, so the time fields come with the per-layer gradients).
        note: adds a coverage note to the report (``PackedSequence`` inputs).
    """

    def __init__(self, gate: HookGate, schedule: Schedule, note: Callable[[str], None]) -> None:
        self._gate = gate
        self._schedule = schedule
        self._note = note
        self._layers: list[tuple[weakref.ref[nn.RNNBase], str]] = []
        self._handles: list[Any] = []
        self._sampling = False
        # This step's measurements: name -> (time steps, [first, last] on the device).
        self._step_time: dict[str, tuple[int, torch.Tensor]] = {}
        # The layers tapped in this step's forwards, so a second micro-batch is not.
        self._tapped: set[str] = set()

    @property
    def names(self) -> tuple[str, ...]:
        """The recurrent layers found, in model order."""
        return tuple(name for _, name in self._layers)

    def find_layers(self, root: nn.Module) -> dict[str, LayerInfo]:
        """Find the recurrent layers under ``root`` (again, when the watch finds the
        parameters again). Returns the :class:`LayerInfo` of their parameters, keyed by
        parameter name (``kind`` is ``"RNN"``, ``"LSTM"`` or ``"GRU"``)."""
        self._set_sampling(False)
        self._layers.clear()
        info: dict[str, LayerInfo] = {}
        for raw_name, module in root.named_modules():
            if not isinstance(module, nn.RNNBase):
                continue
            name = strip_wrapper_prefixes(raw_name) or type(module).__name__.lower()
            self._layers.append((weakref.ref(module), name))
            kind = _KIND_OF_MODE.get(str(getattr(module, "mode", "")), type(module).__name__)
            # The watched module itself: its parameters have no module path to group by.
            group = None if raw_name else name
            for param_name, _ in module.named_parameters():
                full = f"{name}.{param_name}" if raw_name else param_name
                info[full] = LayerInfo(recurrent=True, kind=kind, group=group)
        return info

    def begin_step(self, step: int) -> None:
        """Attach the hooks if ``step`` is sampled, else detach them. What a backward
        pass of an earlier step reports after it ended is dropped."""
        self._step_time = {}
        self._tapped = set()
        self._set_sampling(bool(self._layers) and bool(self._schedule(step)))

    def drain_into(self, pending: PendingStep) -> None:
        """Move this step's through-time measurements into ``pending``."""
        for name, (length, ends) in self._step_time.items():
            pending.time_names.append(name)
            pending.time_lengths.append(length)
            pending.time_parts.append(ends)
        self._step_time = {}

    def close(self) -> None:
        """Remove the hooks and forget the layers. Idempotent."""
        self._set_sampling(False)
        self._layers.clear()
        self._step_time = {}

    def _set_sampling(self, sampling: bool) -> None:
        if sampling == self._sampling:
            return
        self._sampling = sampling
        if not sampling:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            return
        for module_ref, name in self._layers:
            module = module_ref()
            if module is not None:
                hook = _InputHook(self._gate, functools.partial(self._on_forward, name), True)
                self._handles.append(register_module_hook(module, hook, pre=True))

    # --- hook bodies -------------------------------------------------------------------

    def _on_forward(self, name: str, module: nn.RNNBase, args: tuple[Any, ...]) -> Any:
        """Tap the input of a training forward; ``None`` leaves the input as it is."""
        if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return None
        if name in self._tapped or not args:
            return None  # a later micro-batch (the first one is the sample), or kwargs only
        x = args[0]
        if isinstance(x, PackedSequence):
            self._note(
                f"The through-time gradient of {name} is not measured: its input is a "
                "PackedSequence, whose sequences have no common last step."
            )
            return None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            return None
        axis = _time_axis(module, x)
        length = int(x.shape[axis])
        if length < 2 or x.numel() == 0:
            return None
        self._tapped.add(name)
        report = self._gate.hook(functools.partial(self._on_input_grad, name, axis, length))
        # Makes the tap run when the input itself needs no gradient; it gets none.
        anchor = torch.zeros((), device=x.device, requires_grad=True)
        return (_Tap.apply(x, anchor, report), *args[1:])

    def _on_input_grad(self, name: str, axis: int, length: int, grad: torch.Tensor) -> None:
        if name not in self._step_time and self._sampling:
            self._step_time[name] = (length, _first_last_rms(grad.detach(), axis))


__all__ = ["RecurrenceProbe"]

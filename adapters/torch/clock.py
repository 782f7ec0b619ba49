"""The step clock of the PyTorch adapter: :class:`StepClock` says when a training step ends.

What one "step" is:

* with an ``optimizer``: one real ``optimizer.step()`` (a step pre-hook), so gradient
  accumulation is finished and a ``torch.amp.GradScaler`` has unscaled the gradients.
  A step the scaler skips because of Inf/NaN never calls ``optimizer.step()``; it is
  noticed when the next backward pass starts on gradients that were discarded
  (``zero_grad()``, set to ``None``) without an optimizer step, and reported as skipped;
* without one: one finished backward pass (a callback queued on the autograd engine when
  the first gradient of the pass is ready), or each :meth:`StepClock.manual_step` call
  once the loop starts marking steps by hand.

The clock owns the step count, the gradient hooks that see a backward pass begin and the
optimizer hook. It computes nothing: it calls the watch back at each step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from gradwatch.adapters.torch.gate import HookGate


class StepClock:
    """Counts training steps and calls back at each one.

    Args:
        params: the watched parameters, in model order.
        optimizer: its step pre-hook ends a step; ``None`` to count backward passes.
        gate: runs the hooks only while monitoring is on, inside its guard.
        on_step: ``step -> None``, at the end of each step, before the count advances.
        on_skipped: ``step -> None``, for a step the optimizer skipped (AMP overflow).
        on_advance: ``next_step -> None``, once the count has advanced.
        on_idle_step: ``step -> bool``, at an optimizer step while monitoring is off;
            ``True`` counts the step.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        gate: HookGate,
        *,
        on_step: Callable[[int], None],
        on_skipped: Callable[[int], None],
        on_advance: Callable[[int], None],
        on_idle_step: Callable[[int], bool],
    ) -> None:
        self.step_count = 0
        self._params = list(params)
        self._gate = gate
        self._on_step = on_step
        self._on_skipped = on_skipped
        self._on_advance = on_advance
        self._on_idle_step = on_idle_step
        self._has_optimizer = optimizer is not None
        self._manual = False
        self._in_backward = False
        self._backwards_since_step = 0
        self._hooked: set[int] = set()
        self._handles: list[Any] = []
        self._grad_ready = gate.hook(self._on_grad_ready, guarded=False)
        self._backward_end = gate.hook(self._end_backward)
        self.hook_params()
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._on_optimizer_step))

    def manual_step(self) -> None:
        """End a step by hand; from then on backward passes no longer end steps."""
        self._manual = True
        self._end_step()

    def hook_params(self) -> None:
        """Hook the parameters that require gradients and are not hooked yet."""
        for index, param in enumerate(self._params):
            if index in self._hooked or not param.requires_grad:
                continue
            self._hooked.add(index)
            self._handles.append(param.register_hook(self._grad_ready))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Remove every hook. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._params = []

    # --- hook bodies -----------------------------------------------------------------

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._gate.enabled:
            with self._gate.guard:
                self.hook_params()  # parameters unfrozen since the last step
                self._end_step()
        elif self._on_idle_step(self.step_count):
            self.step_count += 1

    def _on_grad_ready(self, grad: torch.Tensor) -> None:
        if self._in_backward:
            return
        with self._gate.guard:
            self._begin_backward()

    def _begin_backward(self) -> None:
        self._in_backward = True
        if (
            self._has_optimizer
            and self._backwards_since_step > 0
            and all(self._params[i].grad is None for i in self._hooked)
        ):
            # Gradients were discarded without optimizer.step(): GradScaler skipped the step.
            self._on_skipped(self.step_count)
            self._backwards_since_step = 0
            self._advance()
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _end_backward(self) -> None:
        self._in_backward = False
        self._backwards_since_step += 1
        if not self._has_optimizer and not self._manual:
            self._end_step()

    def _end_step(self) -> None:
        self._backwards_since_step = 0
        self._on_step(self.step_count)
        self._advance()

    def _advance(self) -> None:
        self.step_count += 1
        self._on_advance(self.step_count)


__all__ = ["StepClock"]

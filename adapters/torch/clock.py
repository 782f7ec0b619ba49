"""The step clock of the PyTorch adapter: :class:`StepClock` says when a training step ends.

What one "step" is:

* with an ``optimizer``: one real ``optimizer.step()`` (a step pre-hook), so gradient
  accumulation is finished and a ``torch.amp.GradScaler`` has unscaled the gradients.
  ``optimizer.step(closure)`` computes its gradients inside the closure, after the pre-hook:
  the closure is wrapped for that call and the step ends when it first returns (for
  LBFGS, the gradient at the point the step starts from; later closure calls are its line
  search), the count advancing after the step (a post-hook). A step the scaler skips for
  Inf/NaN never calls ``optimizer.step()``: with the ``scaler`` known, a skip is recorded
  when ``scaler.step()`` ran (its per-optimizer state says so) and the optimizer did not.
  Without a scaler no step is ever called skipped: gradients a loop throws away with
  ``zero_grad()`` (a GAN's discriminator after the generator's step) are not a skip;
* without one: one finished backward pass (a callback queued on the autograd engine when
  the pass begins), or each :meth:`StepClock.manual_step` call once the loop starts
  marking steps by hand.

A step that is not sampled pays nothing per tensor: no per-parameter Python hook runs on
it. With an optimizer the step pre-hook is the only hook on the path (and, with a
``scaler``, one forward pre-hook on the watched module, where a skipped step shows). Without
one, a backward pass is seen where it begins, at the model's output: a forward hook on the
watched module hooks the output tensors, one Python call per forward and one per backward.
Until that route has seen a backward pass, and for good in a loop whose loss never goes
through the module's own forward (``model.encoder(x)``), per-parameter hooks see it instead.
A ``torch.compile``'d model keeps per-parameter hooks (module hooks would break its graph).

The clock owns the step count, the hooks that see a backward pass begin and the optimizer
hooks; and it notices when the parameters change (``add_param_group``, a ``to_empty()``
after meta-device init) and asks the watch to find them again. Parameters unfrozen
mid-run need no hook: the gradient reducer reads ``requires_grad`` on the steps it
reduces. It computes nothing: it calls the watch back at each step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from gradwatch.adapters.torch.gate import HookGate, register_module_hook
from torch import nn
from torch.amp.grad_scaler import OptState

# Output tensors hooked per forward, items of a nested output looked at to find them, and
# hooks of recent forwards kept (to remove at close; older graphs are gone).
_MAX_OUTPUT_TENSORS = 8
_MAX_OUTPUT_ITEMS = 64
_MAX_OUTPUT_HANDLES = 64


class StepClock:
    """Counts training steps and calls back at each one.

    Args:
        params: the watched parameters, in model order.
        optimizer: its step pre-hook ends a step; ``None`` to count backward passes.
        gate: runs the hooks only while monitoring is on, inside its guard.
        root: the watched module (a forward pre-hook finds its parameters again once
            meta-device parameters were replaced).
        scaler: the ``torch.amp.GradScaler`` that steps ``optimizer``, or ``None``.
        on_step: ``step -> None``, at the end of each step, before the count advances.
        on_skipped: ``step -> None``, for a step the scaler skipped (AMP overflow).
        on_advance: ``next_step -> None``, once the count has advanced.
        on_idle_step: ``step -> bool``, at an optimizer step while monitoring is off;
            ``True`` counts the step.
        on_params_changed: ``() -> None``, when the parameters may have changed: the watch
            finds them again and calls :meth:`set_params`.
        module_hooks: see backward passes (no optimizer) and skipped steps (scaler)
            through hooks on ``root``; ``False`` (a ``torch.compile``'d model) hooks every
            parameter instead. Defaults to ``True``.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        gate: HookGate,
        *,
        root: nn.Module,
        scaler: torch.amp.GradScaler | None,
        on_step: Callable[[int], None],
        on_skipped: Callable[[int], None],
        on_advance: Callable[[int], None],
        on_idle_step: Callable[[int], bool],
        on_params_changed: Callable[[], None],
        module_hooks: bool = True,
    ) -> None:
        self.step_count = 0
        self._gate = gate
        self._on_step = on_step
        self._on_skipped = on_skipped
        self._on_advance = on_advance
        self._on_idle_step = on_idle_step
        self._on_params_changed = on_params_changed
        self._optimizer = optimizer
        self._scaler = scaler
        self._manual = False
        self._in_backward = False
        self._stepped = False  # optimizer.step() ran since the scaler state was last seen
        self._scaler_states: Any = None
        self._closure_step: _ClosureProbe | None = None
        self._param_handles: list[Any] = []
        self._handles: list[Any] = []
        self._meta_handle: Any = None
        self._root = weakref.ref(root)
        self._grad_ready = gate.hook(self._on_grad_ready, guarded=False)
        self._output_grad = gate.hook(self._on_output_grad, guarded=False)
        self._backward_end = gate.hook(self._end_backward)
        self._params: list[torch.Tensor] = []
        self._hooked: set[int] = set()
        # Hooks on recent forwards' outputs (each dies with its graph; removed at close).
        self._output_handles: list[Any] = []
        self._output_fired = False  # the output route saw the current backward pass
        needs_backward = optimizer is None or scaler is not None
        # Per-parameter hooks: a compiled model; or no optimizer, until the output route
        # has seen a backward pass.
        self._param_hooks = needs_backward and (optimizer is None or not module_hooks)
        self._group_sizes = self._optimizer_layout()
        self.set_params(params)
        if needs_backward and module_hooks:
            if scaler is not None:
                before = gate.hook(self._before_root_forward, guarded=False)
                self._handles.append(register_module_hook(root, before, pre=True))
            if optimizer is None:
                after = gate.hook(self._after_root_forward, guarded=False)
                self._handles.append(register_module_hook(root, after))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._on_optimizer_step))
            post = gate.hook(self._after_optimizer_step, guarded=False)
            self._handles.append(optimizer.register_step_post_hook(post))

    def manual_step(self) -> None:
        """End a step by hand; from then on backward passes no longer end steps."""
        self._manual = True
        if self._optimizer is None:  # backward passes no longer matter
            self._drop_param_hooks()
        self._end_step()

    def set_params(self, params: Sequence[torch.Tensor]) -> None:
        """Watch these parameters from now on (hooks on the old ones are removed)."""
        for handle in self._param_handles:
            handle.remove()
        self._param_handles.clear()
        self._hooked.clear()
        self._params = list(params)
        self.hook_params()
        on_meta = any(p.is_meta for p in self._params)
        if on_meta and self._meta_handle is None:
            hook = self._gate.hook(self._on_forward_while_meta, guarded=False)
            root = self._root()
            if root is not None:
                self._meta_handle = register_module_hook(root, hook, pre=True)
        elif not on_meta and self._meta_handle is not None:
            self._meta_handle.remove()
            self._meta_handle = None

    def hook_params(self) -> None:
        """Hook the parameters that require gradients and are not hooked yet (only while
        per-parameter hooks are how backward passes are seen)."""
        if not self._param_hooks:
            return
        for index, param in enumerate(self._params):
            if index in self._hooked or not param.requires_grad:
                continue
            self._hooked.add(index)
            self._param_handles.append(param.register_hook(self._grad_ready))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Remove every hook. Idempotent."""
        for handle in (*self._handles, *self._param_handles, *self._output_handles):
            handle.remove()
        self._handles.clear()
        self._param_handles.clear()
        self._output_handles.clear()
        if self._meta_handle is not None:
            self._meta_handle.remove()
            self._meta_handle = None
        self._params = []

    # --- hook bodies -----------------------------------------------------------------

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        if not self._gate.enabled:
            self._stepped = True
            if self._on_idle_step(self.step_count):
                self.step_count += 1
            return None
        with self._gate.guard:
            if self._scaler is not None:  # a skip not seen at a forward since
                self._check_skipped_by_scaler()
            self._stepped = True
            layout = self._optimizer_layout()
            if layout != self._group_sizes:  # add_param_group: find the parameters again
                self._group_sizes = layout
                self._on_params_changed()
            if self._param_hooks:  # a compiled model's parameters unfrozen since
                self.hook_params()
            # torch passes the optimizer itself as args[0], then step()'s own arguments.
            at = 1 if args and args[0] is optimizer else 0
            closure = kwargs.get("closure") if kwargs else None
            if closure is None and len(args) > at:
                closure = args[at]
            if callable(closure):
                # The gradients are computed inside the closure: read them after it.
                probe = _ClosureProbe(closure, self)
                self._closure_step = probe
                if kwargs and "closure" in kwargs:
                    return args, {**kwargs, "closure": probe}
                return (*args[:at], probe, *args[at + 1 :]), kwargs
            self._end_step()
        return None

    def _closure_returned(self) -> None:
        with self._gate.guard:
            self._on_step(self.step_count)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        probe, self._closure_step = self._closure_step, None
        if probe is None:
            return
        with self._gate.guard:
            if not probe.called:  # an optimizer that never called its closure
                self._on_step(self.step_count)
            self._advance()

    def _on_forward_while_meta(self, module: nn.Module, args: Any) -> None:
        # Only while some watched parameter is on the meta device: to_empty() replaces them.
        with self._gate.guard:
            if not any(p.is_meta for _, p in module.named_parameters()):
                self._on_params_changed()

    def _on_grad_ready(self, grad: torch.Tensor) -> None:
        if self._in_backward:
            return
        with self._gate.guard:
            self._begin_backward()

    def _before_root_forward(self, module: nn.Module, args: Any) -> None:
        # A skip the scaler made since the last forward (scaler.update() ran since).
        with self._gate.guard:
            self._check_skipped_by_scaler()

    def _after_root_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        """A training forward without an optimizer: each output tensor that carries a
        graph gets one gradient hook; the first to fire begins the backward pass."""
        if self._manual or not torch.is_grad_enabled():
            return
        with self._gate.guard:
            handles = self._output_handles
            if len(handles) >= _MAX_OUTPUT_HANDLES:  # the oldest graphs (and their
                del handles[: _MAX_OUTPUT_HANDLES // 2]  # hooks) are gone by now
            handles.extend(t.register_hook(self._output_grad) for t in _output_tensors(output))

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        self._output_fired = True
        if self._in_backward:
            return
        with self._gate.guard:
            self._begin_backward()

    def _begin_backward(self) -> None:
        self._in_backward = True
        if self._scaler is not None:
            self._check_skipped_by_scaler()
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _check_skipped_by_scaler(self) -> None:
        """A skip is ``scaler.step(optimizer)`` without ``optimizer.step()``: seen once
        ``scaler.update()`` has replaced the scaler's per-optimizer state (no tensor read)."""
        # A disabled scaler never has the state (and never skips).
        states = getattr(self._scaler, "_per_optimizer_states", None)
        seen, self._scaler_states = self._scaler_states, states
        if seen is None or states is None or seen is states:
            return
        stepped, self._stepped = self._stepped, False
        state = seen.get(id(self._optimizer))
        if not stepped and state is not None and state.get("stage") is OptState.STEPPED:
            self._on_skipped(self.step_count)
            self._advance()

    def _end_backward(self) -> None:
        self._in_backward = False
        if self._output_fired:  # the output route works here: per-parameter hooks go
            self._output_fired = False
            if self._optimizer is None:
                self._drop_param_hooks()
        if self._optimizer is None and not self._manual:
            self._end_step()

    def _drop_param_hooks(self) -> None:
        self._param_hooks = False
        for handle in self._param_handles:
            handle.remove()
        self._param_handles.clear()
        self._hooked.clear()

    def _end_step(self) -> None:
        self._on_step(self.step_count)
        self._advance()

    def _advance(self) -> None:
        self.step_count += 1
        self._on_advance(self.step_count)

    def _optimizer_layout(self) -> tuple[int, ...]:
        """Parameters per optimizer group: a cheap test for ``add_param_group``."""
        if self._optimizer is None:
            return ()
        return tuple(len(group["params"]) for group in self._optimizer.param_groups)


class _ClosureProbe:
    """Stands in for the closure of one ``optimizer.step(closure)`` call: calls it, and
    ends the step when it first returns, with the gradients it computed."""

    def __init__(self, closure: Callable[..., Any], clock: StepClock) -> None:
        self.closure = closure
        self.clock = clock
        self.called = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.closure(*args, **kwargs)
        if not self.called:
            self.called = True
            if self.clock._gate.enabled:
                self.clock._closure_returned()
        return result


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors that carry a graph in a forward's output (a tensor, or nested
    tuples, lists and dicts of them, as a transformers ``ModelOutput``); a bounded walk."""
    found: list[torch.Tensor] = []
    stack, visited = [output], 0
    while stack and visited < _MAX_OUTPUT_ITEMS and len(found) < _MAX_OUTPUT_TENSORS:
        item = stack.pop()
        visited += 1
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                found.append(item)
        elif isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
    return found


__all__ = ["StepClock"]

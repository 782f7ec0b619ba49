"""PyTorch adapter: ``gradwatch.watch(model, optimizer)`` and nothing else changes.

It turns gradients and activation outputs into :class:`gradwatch.StepStats` and hands
them to a :class:`gradwatch.Analyzer`. The per-step path stays on the device: fused
multi-tensor reductions, no ``.item()``, no Python branch on a tensor value; results
are copied to the host in one transfer every ``flush_every`` steps. On CPU, float32
tensors are reduced by the one-pass C kernels of ``cpu_native`` when they can be built.
Sharded (FSDP2 / DTensor) gradients are reduced per shard and combined across ranks
(``torch_sharded``).

What one "step" is:

* with an ``optimizer``: one real ``optimizer.step()`` (a step pre-hook), so gradient
  accumulation is finished and a ``torch.amp.GradScaler`` has unscaled the gradients.
  A step the scaler skips because of Inf/NaN never calls ``optimizer.step()``; it is
  noticed when the next backward pass starts on gradients that were discarded
  (``zero_grad()``, set to ``None``) without an optimizer step, and recorded as
  ``StepStats(skipped_step=True)``;
* without one: one finished backward pass, or each :meth:`TorchWatch.step` call once
  the loop starts marking steps by hand.

Example:
    >>> import torch, gradwatch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gradwatch.watch(model, opt, show=False) as gw:
    ...     for _ in range(3):
    ...         model(torch.randn(16, 4)).pow(2).mean().backward()
    ...         opt.step()
    ...         opt.zero_grad()
    >>> gw.report(show=False).steps_observed
    3
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import torch
from gradwatch.adapters.cpu_native import build_failure, cpu_kernels
from gradwatch.adapters.torch_reductions import (
    ACT_ROWS,
    GRAD_ROWS,
    SMALL_GRAD_NUMEL,
    activation_fractions,
    activation_reductions_on_device,
    activation_stats_on_device,
    grad_stats_on_device,
    squared_norms_on_device,
    unit_axis_of,
)
from gradwatch.adapters.torch_sharded import (
    combine_grad_stats,
    combine_sum,
    local_values,
    sharding_of,
)
from torch import nn

from gradwatch.activations import kind_from_name, tail_bounds
from gradwatch.analyzer import Analyzer
from gradwatch.findings import Finding
from gradwatch.guard import FindingError, GradwatchWarning, Guard
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.schedules import Schedule, every
from gradwatch.stats import StepStats

# Wrapper prefixes that are not part of the user's layer names: DDP adds "module.",
# torch.compile's OptimizedModule adds "_orig_mod.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Activation classes whose output is not in the activation's own range (log-probabilities).
_NOT_OBSERVED = frozenset({"LogSoftmax", "LogSigmoid", "Softmin"})
# Instance attributes through which modules call a functional activation
# (nn.TransformerEncoderLayer.activation is F.relu by default).
_FUNCTIONAL_ATTRS = ("activation", "act", "act_fn", "activation_fn")
_ON_FINDING_MODES = ("warn", "raise", "ignore")


# --- schedules ------------------------------------------------------------------------


# Dense for the first 50 steps so every rule (warm-up 10 + persistence 10, see
# gradwatch/rules/base.py) can fire within 50 steps, then 1 step in 10: with the norm
# schedule below, 2.1-2.3% of a 12x512 ReLU MLP step on CPU (docs/benchmarks.md).
DEFAULT_GRAD_SCHEDULE: Schedule = every(10, dense_until=50)
DEFAULT_ACTIVATION_SCHEDULE: Schedule = every(10, dense_until=50)
# Steps not sampled per layer still get their total gradient norm on this schedule:
# one fused norm, so a spike or a NaN between samples is seen. Every 3rd step catches
# the zoo's shortest burst (9 steps) at a third of the cost of every step.
DEFAULT_NORM_SCHEDULE: Schedule = every(3)
# Rules run every 5 steps (persistence is counted in steps, NaN between checks is
# still caught at its step): analysis costs ~0.5 ms a check on the host.
_CHECK_EVERY = 5


def strip_wrapper_prefixes(name: str) -> str:
    """Layer names as the user wrote them: drop DDP's ``module.`` and torch.compile's
    ``_orig_mod.`` wrappers.

    >>> strip_wrapper_prefixes("module._orig_mod.enc.fc1.weight")
    'enc.fc1.weight'
    """
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name.replace("._orig_mod.", ".")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
            continue
        return model


def _is_compiled(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", None), nn.Module) or (
        getattr(model, "_compiled_call_impl", None) is not None
    )


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


# --- bookkeeping records --------------------------------------------------------------


@dataclass
class _GradGroup:
    """Parameters whose gradients are reduced together (one device and dtype, and for
    sharded gradients one process group to combine the shards over)."""

    indices: list[int]
    device: torch.device
    shard_group: Any = None


@dataclass
class _PendingStep:
    """One step's device results, waiting for the next flush."""

    step: int
    skipped: bool = False
    grad_indices: list[int] = field(default_factory=list)
    grad_parts: list[torch.Tensor] = field(default_factory=list)
    # Unsampled steps: per device group, the sum of squared gradient norms (0-d).
    total_parts: list[torch.Tensor] = field(default_factory=list)
    sparse_numel: dict[int, int] = field(default_factory=dict)
    act_names: list[str] = field(default_factory=list)
    act_kinds: list[str] = field(default_factory=list)
    act_numel: list[int] = field(default_factory=list)
    # Per activation, the raw reductions of activation_reductions_on_device.
    act_parts: list[list[torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class _ActivationSite:
    name: str
    kind: str
    bounds: tuple[float, float]


class _FunctionalProbe:
    """Stands in for a functional activation attribute (``layer.activation = F.relu``)
    while watched; calls the original and reports its output. Pickles as the original."""

    def __init__(self, fn: Callable[..., Any], report: Callable[[Any], None]) -> None:
        self.fn = fn
        self.report = report

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        self.report(out)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (_identity, (self.fn,))


def _identity(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn


# Watches never reported nor closed: the one-line `gradwatch.watch(model, optimizer)`
# keeps no handle, so its report prints when the interpreter exits.
_UNREPORTED: weakref.WeakSet[TorchWatch] = weakref.WeakSet()


@atexit.register
def _report_unreported_at_exit() -> None:
    for watch in list(_UNREPORTED):
        # Never turn a finished run into a crash at exit.
        with contextlib.suppress(Exception):
            watch.report()


# One live watch per model, so watching twice can replace the first (weak: never leaks).
_LIVE_WATCHES: weakref.WeakKeyDictionary[nn.Module, weakref.ref[TorchWatch]] = (
    weakref.WeakKeyDictionary()
)


# --- the watch ------------------------------------------------------------------------


class TorchWatch:
    """Monitors one PyTorch model's gradient flow. Create it with :func:`watch`.

    Attributes:
        analyzer: the :class:`gradwatch.Analyzer` receiving the statistics.
        step_count: steps seen so far (sampled or not, skipped ones included).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        on_finding: str | Callable[[Finding], None] = "warn",
        grad_schedule: Schedule = DEFAULT_GRAD_SCHEDULE,
        activations: bool = True,
        activation_schedule: Schedule = DEFAULT_ACTIVATION_SCHEDULE,
        norm_schedule: Schedule = DEFAULT_NORM_SCHEDULE,
        flush_every: int = 20,
        rules: Sequence[Rule] = DEFAULT_RULES,
        strict: bool = False,
        show: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        if not (callable(on_finding) or on_finding in _ON_FINDING_MODES):
            raise ValueError(
                f"on_finding must be one of {list(_ON_FINDING_MODES)} or a callable, "
                f"got {on_finding!r}"
            )
        for label, schedule in (
            ("grad_schedule", grad_schedule),
            ("activation_schedule", activation_schedule),
            ("norm_schedule", norm_schedule),
        ):
            if not callable(schedule):
                raise ValueError(f"{label} must be a callable step -> bool, got {schedule!r}")
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {flush_every!r}")
        self._on_finding = on_finding
        self._grad_schedule = grad_schedule
        self._activation_schedule = activation_schedule
        self._norm_schedule = norm_schedule
        self._flush_every = flush_every
        self._show = show
        self._rank_zero = _is_rank_zero()
        self._warned_rules: set[str] = set()
        self.guard = Guard("gradwatch torch adapter", strict=strict)
        self.analyzer = Analyzer(
            rules, on_finding=self._handle_finding, strict=strict, check_every=_CHECK_EVERY
        )
        self.step_count = 0
        self._samples = 0  # steps reduced per layer so far
        self._closed = False
        self._manual = False
        self._has_optimizer = optimizer is not None
        self._handles: list[Any] = []
        # Activation sites (found once) and the hooks/probes live while a step is sampled.
        self._module_sites: list[tuple[weakref.ref[nn.Module], _ActivationSite]] = []
        self._functional_sites: list[
            tuple[weakref.ref[nn.Module], str, Callable[..., Any], _ActivationSite]
        ] = []
        self._act_handles: list[Any] = []
        self._probes: list[tuple[nn.Module, str, Callable[..., Any]]] = []
        self._pending: list[_PendingStep] = []
        root = _unwrap(model)
        self._model_ref = weakref.ref(model)
        named = [(strip_wrapper_prefixes(n), p) for n, p in root.named_parameters()]
        self._names = [n for n, _ in named]
        self._params: list[torch.Tensor] = [p for _, p in named]
        self._hooked: set[int] = set()
        self._groups_key: tuple[tuple[Any, ...], ...] | None = None
        self._groups: list[_GradGroup] = []
        self._layouts: dict[tuple[int, ...], tuple[np.ndarray, tuple[str, ...], np.ndarray]] = {}
        self._in_backward = False
        self._backwards_since_step = 0
        self._act_sampling = False
        self._root_ref: weakref.ref[nn.Module] | None = None
        self._activations = activations
        self._step_acts: dict[str, tuple[str, int, list[torch.Tensor]]] = {}
        self._fwd_calls: dict[str, int] = {}
        self._fwd_last: tuple[int, str] | None = None
        self._output_acts: set[str] = set()

        previous = _LIVE_WATCHES.get(model)
        old = previous() if previous is not None else None
        if old is not None and not old.closed:
            warnings.warn(
                "this model is already watched by gradwatch; the earlier watch is closed "
                "and replaced by this one",
                GradwatchWarning,
                stacklevel=3,
            )
            old.close()
        _LIVE_WATCHES[model] = weakref.ref(self)
        if show:
            _UNREPORTED.add(self)

        self._hook_params()
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._optimizer_hook()))
        if activations and _is_compiled(model):
            self._activations = False
            self.analyzer.add_note(
                "Activations are not captured on a torch.compile'd model (hooks would break "
                "its graph); dead_relu and saturation judge gradients only."
            )
        elif activations:
            self._find_activation_sites(root)
        self._set_act_sampling(self._activations and bool(self._activation_schedule(0)))
        if any(p.device.type == "cpu" for p in self._params) and cpu_kernels() is None:
            # Built here, not on the first sampled step; the fallback is slower, not wrong.
            self.analyzer.add_note(
                "CPU statistics use torch ops, about 4x the cost of gradwatch's C kernels, "
                f"which could not be built ({build_failure()})."
            )

    # --- public ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def enabled(self) -> bool:
        """False once closed or once an internal error switched monitoring off."""
        return not self._closed and self.guard.enabled and self.analyzer.enabled

    @property
    def findings(self) -> list[Finding]:
        """Findings so far (flushes pending statistics first), most severe first."""
        self.flush()
        return self.analyzer.findings

    def step(self) -> None:
        """Mark the end of a training step by hand (for loops without an optimizer).

        From the first call on, backward passes no longer count as steps by themselves.
        """
        if not self.enabled:
            return
        with self.guard:
            self._manual = True
            self._end_step()

    def flush(self) -> None:
        """Copy pending device statistics to the host (one transfer) and analyze them."""
        if self._closed or not self.guard.enabled:
            return
        with self.guard:
            self._flush()

    def report(self, show: bool | None = None) -> Report:
        """Flush, print the console report (rank 0 only) and return the :class:`Report`.

        Args:
            show: print it. Defaults to the ``show`` given to :func:`watch` (``True``).
        """
        self.flush()
        if self.guard.error is not None:
            self.analyzer.add_note(
                f"Monitoring stopped at step {self.step_count} after an internal error in "
                f"the torch adapter: {type(self.guard.error).__name__}: {self.guard.error}"
            )
        report = self.analyzer.report()
        _UNREPORTED.discard(self)
        if (self._show if show is None else show) and self._rank_zero:
            _print_report(report)
        return report

    def close(self) -> None:
        """Flush, then remove every hook and restore functional activations. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        _UNREPORTED.discard(self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._set_act_sampling(False)
        self._module_sites.clear()
        self._functional_sites.clear()
        self._pending.clear()
        self._step_acts.clear()
        self._params = []
        self._groups = []
        model = self._model_ref()
        if model is not None:
            current = _LIVE_WATCHES.get(model)
            if current is not None and current() is self:
                del _LIVE_WATCHES[model]

    def __enter__(self) -> TorchWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.report()
        finally:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("on" if self.enabled else "off")
        return f"TorchWatch({len(self._names)} parameters, step {self.step_count}, {state})"

    # --- hook registration -----------------------------------------------------------

    def _weak(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A hook that calls ``fn(watch, *args)``. It holds the watch, so the one-line
        ``gradwatch.watch(model, optimizer)`` keeps monitoring without a kept handle;
        the watch holds the model only weakly, so nothing leaks, and ``close()``
        removes the hooks."""

        def hook(*args: Any) -> Any:
            if not self.enabled:
                return None
            return fn(self, *args)

        return hook

    def _optimizer_hook(self) -> Callable[..., Any]:
        """The optimizer step hook. Once an internal error has switched monitoring off,
        a watch over sharded gradients still joins the collectives its ranks expect at
        each step (:meth:`_join_collectives`), so the other ranks never wait for it."""

        def hook(*args: Any) -> None:
            if self.enabled:
                _on_optimizer_step(self, *args)
            elif not self._closed and self._sharded_groups():
                self._join_collectives()

        return hook

    def _sharded_groups(self) -> list[_GradGroup]:
        return [g for g in self._groups if g.shard_group is not None]

    def _join_collectives(self) -> None:
        """The all_reduces of this step's reductions, on zeros: what a healthy watch on
        another rank issues at this step (:meth:`_reduce_grads` or
        :meth:`_reduce_total_norm`), in the same order and shapes."""
        step, self.step_count = self.step_count, self.step_count + 1
        with contextlib.suppress(Exception):  # monitoring is off: nothing may raise now
            per_layer = bool(self._grad_schedule(step))
            if not per_layer and not self._norm_schedule(step):
                return
            for group in self._sharded_groups():
                if per_layer:
                    zeros = torch.zeros(GRAD_ROWS, len(group.indices), device=group.device)
                    combine_grad_stats(zeros, group.shard_group)
                else:
                    combine_sum(torch.zeros((), device=group.device), group.shard_group)

    def _hook_params(self) -> None:
        for index, param in enumerate(self._params):
            if index in self._hooked or not param.requires_grad:
                continue
            self._hooked.add(index)
            self._handles.append(param.register_hook(self._weak(_on_grad_ready)))  # type: ignore[no-untyped-call]

    def _find_activation_sites(self, root: nn.Module) -> None:
        for raw_name, module in root.named_modules():
            name = strip_wrapper_prefixes(raw_name) or type(module).__name__.lower()
            cls = type(module).__name__
            kind = kind_from_name(cls)
            if kind != "other" and cls not in _NOT_OBSERVED and not any(module.children()):
                site = _ActivationSite(name, kind, tail_bounds(kind))
                self._module_sites.append((weakref.ref(module), site))
            for attr in _FUNCTIONAL_ATTRS:
                fn = module.__dict__.get(attr)
                if fn is None or isinstance(fn, nn.Module) or not callable(fn):
                    continue
                fn_kind = kind_from_name(getattr(fn, "__name__", ""))
                if fn_kind == "other" or isinstance(fn, _FunctionalProbe):
                    continue
                site = _ActivationSite(f"{name}.{attr}", fn_kind, tail_bounds(fn_kind))
                self._functional_sites.append((weakref.ref(module), attr, fn, site))
        if not self._module_sites and not self._functional_sites:
            self.analyzer.add_note(
                "No activation modules found (functional calls such as F.relu inside "
                "forward() are invisible without tracing); dead_relu falls back to "
                "gradient zeros and saturation is not checked."
            )
            self._activations = False
            return
        self._root_ref = weakref.ref(root)

    def _set_act_sampling(self, sampling: bool) -> None:
        """Attach the activation hooks for a sampled step and detach them after it, so
        steps that are not sampled run the model with no gradwatch code in its
        forward pass (a forward hook costs ~10 us per module call even when idle)."""
        if sampling == self._act_sampling:
            return
        self._act_sampling = sampling
        if not sampling:
            for handle in self._act_handles:
                handle.remove()
            self._act_handles.clear()
            for module, attr, original in self._probes:
                module.__dict__[attr] = original
            self._probes.clear()
            return
        root = self._root_ref() if self._root_ref is not None else None
        if root is None:
            return
        for module_ref, site in self._module_sites:
            module = module_ref()
            if module is not None:
                hook = self._weak(_module_hook_for(site))
                self._act_handles.append(module.register_forward_hook(hook))
        for module_ref, attr, fn, site in self._functional_sites:
            module = module_ref()
            if module is not None and module.__dict__.get(attr) is fn:
                probe = _FunctionalProbe(fn, self._weak(_functional_hook_for(site)))
                module.__dict__[attr] = probe
                self._probes.append((module, attr, fn))
        self._act_handles.append(root.register_forward_pre_hook(self._weak(_on_root_forward_pre)))
        self._act_handles.append(root.register_forward_hook(self._weak(_on_root_forward)))

    # --- per-step path (no host sync here) -------------------------------------------

    def _begin_backward(self) -> None:
        self._in_backward = True
        if (
            self._has_optimizer
            and self._backwards_since_step > 0
            and all(self._params[i].grad is None for i in self._hooked)
        ):
            # Gradients were discarded without optimizer.step(): GradScaler skipped the step.
            self._pending.append(_PendingStep(step=self.step_count, skipped=True))
            self._backwards_since_step = 0
            self._advance()
        torch.autograd.Variable._execution_engine.queue_callback(self._weak(_on_backward_end))

    def _end_backward(self) -> None:
        self._in_backward = False
        self._backwards_since_step += 1
        if not self._has_optimizer and not self._manual:
            self._end_step()

    def _end_step(self) -> None:
        self._backwards_since_step = 0
        pending = _PendingStep(step=self.step_count)
        if self._grad_schedule(self.step_count):
            self._reduce_grads(pending)
        elif self._norm_schedule(self.step_count):
            self._reduce_total_norm(pending)
        if self._step_acts:
            for name, (kind, numel, parts) in self._step_acts.items():
                pending.act_names.append(name)
                pending.act_kinds.append(kind)
                pending.act_numel.append(numel)
                pending.act_parts.append(parts)
            self._step_acts = {}
        if pending.grad_parts or pending.total_parts or pending.act_parts:
            self._pending.append(pending)
        self._advance()

    def _advance(self) -> None:
        self.step_count += 1
        self._set_act_sampling(
            self._activations and bool(self._activation_schedule(self.step_count))
        )
        if self.step_count % self._flush_every == 0:
            self._flush()

    def _live_grads(self) -> dict[int, torch.Tensor]:
        """Present gradients by parameter index; regroups when their layout changes."""
        live = [
            (i, p.grad)
            for i, p in enumerate(self._params)
            if p.requires_grad and p.grad is not None and p.grad.numel() > 0
        ]
        key = tuple((i, g.device, g.dtype, g.is_sparse) for i, g in live if g is not None)
        if live and key != self._groups_key:
            self._groups, left_out = _group_params(live)
            self._groups_key = key
            if left_out:
                self.analyzer.add_note(
                    "Left out of the statistics: sharded gradients whose layout gradwatch "
                    "cannot combine across ranks (Partial placements or several sharded "
                    f"mesh dimensions): {', '.join(self._names[i] for i in left_out)}."
                )
        return {i: g for i, g in live if g is not None}

    def _reduce_total_norm(self, pending: _PendingStep) -> None:
        """One fused norm per device group: the total norm of a step not sampled per
        layer, so growth, spikes and NaN between samples are still seen."""
        grads = self._live_grads()
        if not grads:
            return
        with torch.no_grad():
            for group in self._groups:
                tensors = [_dense_values(grads[i]) for i in group.indices]
                squares = squared_norms_on_device(tensors).sum()
                if group.shard_group is not None:
                    squares = combine_sum(squares, group.shard_group)
                pending.total_parts.append(squares)

    def _reduce_grads(self, pending: _PendingStep) -> None:
        params = self._params
        grads = self._live_grads()
        if not grads:
            return
        # Weights move slowly: their norms on every 5th sample (and the first 5) are
        # enough for the rules' window medians, at a fifth of the cost.
        with_weights = self._samples < 5 or self._samples % 5 == 0
        self._samples += 1
        for group in self._groups:
            tensors = [_dense_values(grads[i]) for i in group.indices]
            pending.grad_indices.extend(group.indices)
            weights = (
                [local_values(params[i].detach()) for i in group.indices] if with_weights else None
            )
            stats = grad_stats_on_device(tensors, weights)
            if group.shard_group is not None:
                stats = combine_grad_stats(stats, group.shard_group)
            pending.grad_parts.append(stats)
        for i, g in grads.items():
            if g.is_sparse:
                pending.sparse_numel[i] = g.numel()

    def _on_activation(self, site: _ActivationSite, module_training: bool, output: Any) -> None:
        if not (self._act_sampling and module_training and torch.is_grad_enabled()):
            return
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return
        if output.numel() == 0:
            return
        calls = self._fwd_calls.get(site.name, 0)
        self._fwd_calls[site.name] = calls + 1
        name = site.name if calls == 0 else f"{site.name}#{calls}"
        self._fwd_last = (id(output), name)
        if name in self._step_acts:
            return  # a later micro-batch of an accumulated step: the first one is the sample
        parts = activation_reductions_on_device(
            output, site.kind, unit_axis_of(output), site.bounds
        )
        self._step_acts[name] = (site.kind, output.numel(), parts)

    def _on_root_output(self, output: Any) -> None:
        last = self._fwd_last
        if last is None:
            return
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        if any(isinstance(o, torch.Tensor) and id(o) == last[0] for o in outputs):
            self._output_acts.add(last[1])

    # --- flush (the one host transfer) -----------------------------------------------

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for record in pending:
            act_tensors = [t for parts in record.act_parts for t in parts]
            for t in (*record.grad_parts, *record.total_parts, *act_tensors):
                by_device.setdefault(t.device, []).append(t.reshape(-1))
        host: dict[torch.device, Iterator[np.ndarray]] = {}
        for device, parts in by_device.items():
            flat = torch.cat(parts).to("cpu").numpy().astype(np.float64)
            sizes = np.cumsum([p.numel() for p in parts])[:-1]
            host[device] = iter(np.split(flat, sizes))
        stats = [self._to_step_stats(record, host) for record in pending]
        self.analyzer.observe_stats(stats)

    def _to_step_stats(
        self, record: _PendingStep, host: dict[torch.device, Iterator[np.ndarray]]
    ) -> StepStats:
        if record.skipped:
            return StepStats(step=record.step, skipped_step=True)
        grad_cols = [next(host[t.device]).reshape(GRAD_ROWS, -1) for t in record.grad_parts]
        grad_fields: dict[str, Any] = {}
        if record.total_parts:
            squares = sum(float(next(host[t.device])[0]) for t in record.total_parts)
            grad_fields["grad_total_norm"] = float(np.sqrt(squares))
        if grad_cols:
            order, layers, numel = self._grad_layout(record)
            values = np.concatenate(grad_cols, axis=1)[:, order]
            safe = np.maximum(numel, 1.0)
            grad_fields = dict(
                grad_layers=layers,
                grad_norm=tuple(values[0].tolist()),
                grad_max_abs=tuple(values[1].tolist()),
                grad_mean_abs=tuple((values[2] / safe).tolist()),
                # A gradient with Inf/NaN has no meaningful zero fraction (and the
                # per-tensor count skips NaN entries): unknown.
                grad_zero_frac=tuple(
                    np.where(
                        values[4] > 0, np.nan, np.clip(1.0 - values[3] / safe, 0.0, 1.0)
                    ).tolist()
                ),
                grad_nonfinite=tuple(int(v) for v in values[4]),
                grad_numel=tuple(int(v) for v in numel),
                param_norm=tuple(values[5].tolist()),
            )
        act_fields: dict[str, Any] = {}
        if record.act_parts:
            acts = np.array(
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
            act_fields = dict(
                act_layers=tuple(record.act_names),
                act_kinds=tuple(record.act_kinds),
                act_inactive_frac=tuple(acts[:, 0].tolist()),
                act_dead_frac=tuple(acts[:, 1].tolist()),
                act_tail_frac=tuple(acts[:, 2].tolist()),
                act_is_output=tuple(n in self._output_acts for n in record.act_names),
            )
        return StepStats(step=record.step, **grad_fields, **act_fields)

    def _grad_layout(self, record: _PendingStep) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
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
            tuple(self._names[i] for i in indices),
            np.array(
                [record.sparse_numel.get(i, self._param_numel(i)) for i in indices],
                dtype=np.float64,
            ),
        )
        if not record.sparse_numel:  # nnz of a sparse gradient changes every step
            self._layouts[key] = layout
        return layout

    def _param_numel(self, index: int) -> int:
        return int(self._params[index].numel()) if index < len(self._params) else 0

    # --- findings --------------------------------------------------------------------

    def _handle_finding(self, finding: Finding) -> None:
        mode = self._on_finding
        if callable(mode):
            mode(finding)
        elif mode == "raise":
            raise FindingError(finding)
        elif mode == "warn" and self._rank_zero and finding.rule not in self._warned_rules:
            self._warned_rules.add(finding.rule)
            fix = f" Try first: {finding.fixes[0].text}" if finding.fixes else ""
            warnings.warn(
                f"gradwatch {finding.severity} [{finding.rule}] at step {finding.last_step}: "
                f"{finding.message}{fix}",
                GradwatchWarning,
                stacklevel=2,
            )


# --- hook bodies (module level so hooks hold only a weak reference to the watch) -------


def _on_grad_ready(watch: TorchWatch, grad: torch.Tensor) -> None:
    if watch._in_backward:
        return
    with watch.guard:
        watch._begin_backward()


def _on_backward_end(watch: TorchWatch) -> None:
    with watch.guard:
        watch._end_backward()


def _on_optimizer_step(watch: TorchWatch, optimizer: Any, args: Any, kwargs: Any) -> None:
    with watch.guard:
        watch._hook_params()  # parameters unfrozen since the last step
        watch._end_step()


def _on_root_forward_pre(watch: TorchWatch, module: nn.Module, args: Any) -> None:
    watch._fwd_calls.clear()
    watch._fwd_last = None


# Forward hooks live only while a step is sampled (see TorchWatch._set_act_sampling), so
# their bodies need no schedule check; _on_activation keeps one for a functional probe
# that a model kept a reference to after it was removed.


def _on_root_forward(watch: TorchWatch, module: nn.Module, args: Any, output: Any) -> None:
    with watch.guard:
        watch._on_root_output(output)


def _module_hook_for(site: _ActivationSite) -> Callable[..., None]:
    def hook(watch: TorchWatch, module: nn.Module, args: Any, output: Any) -> None:
        with watch.guard:
            watch._on_activation(site, module.training, output)

    return hook


def _functional_hook_for(site: _ActivationSite) -> Callable[..., None]:
    def hook(watch: TorchWatch, output: Any) -> None:
        with watch.guard:
            watch._on_activation(site, True, output)

    return hook


def _dense_values(grad: torch.Tensor | None) -> torch.Tensor:
    """A sparse gradient's stored values (its other entries are zeros), a sharded one's
    local shard, else the gradient."""
    assert grad is not None
    if not grad.is_sparse:
        return local_values(grad)
    values = grad.coalesce().values()
    # an all-zero sparse gradient stores nothing; one explicit zero has the same statistics
    return values if values.numel() else values.new_zeros(1)


def _group_params(
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
        key = (g.device, g.dtype, id(shard_group))
        groups.setdefault(key, _GradGroup([], g.device, shard_group)).indices.append(i)
    return [*groups.values(), *singles], left_out


def _print_report(report: Report) -> None:
    print(report.render(width=min(100, shutil.get_terminal_size((80, 24)).columns)))


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    on_finding: str | Callable[[Finding], None] = "warn",
    grad_schedule: Schedule = DEFAULT_GRAD_SCHEDULE,
    activations: bool = True,
    activation_schedule: Schedule = DEFAULT_ACTIVATION_SCHEDULE,
    norm_schedule: Schedule = DEFAULT_NORM_SCHEDULE,
    flush_every: int = 20,
    rules: Sequence[Rule] = DEFAULT_RULES,
    strict: bool = False,
    show: bool = True,
) -> TorchWatch:
    """Watch ``model``'s gradient flow during training; the training loop stays unchanged.

    Args:
        model: the ``nn.Module`` being trained (plain, DDP-wrapped or torch.compile'd).
        optimizer: with it, one step is one ``optimizer.step()``; without it, one
            finished backward pass (or one :meth:`TorchWatch.step` call). Defaults to ``None``.
        on_finding: what happens when a rule first fires: ``"warn"`` (one
            :class:`~gradwatch.GradwatchWarning` per rule), ``"raise"``
            (:class:`~gradwatch.FindingError`, stops the run), ``"ignore"``, or a
            callable taking the :class:`~gradwatch.Finding`. Defaults to ``"warn"``.
        grad_schedule: ``step -> bool``, the steps whose gradients are reduced.
            Defaults to :data:`DEFAULT_GRAD_SCHEDULE` (every step up to 50, then every 10th).
        activations: capture activation statistics with forward hooks. Defaults to ``True``.
        activation_schedule: ``step -> bool`` for activations. Defaults to
            :data:`DEFAULT_ACTIVATION_SCHEDULE`.
        norm_schedule: ``step -> bool``, the steps not sampled per layer whose total
            gradient norm is still taken. Defaults to :data:`DEFAULT_NORM_SCHEDULE`
            (every 3rd step).
        flush_every: steps between the host copies that feed the analyzer; findings
            appear at flushes. Defaults to ``20``.
        rules: the rules to apply. Defaults to :data:`gradwatch.DEFAULT_RULES`.
        strict: re-raise internal errors instead of warning once and switching off.
            Defaults to ``False``.
        show: print the report from :meth:`TorchWatch.report` and on ``with`` exit.
            Defaults to ``True``.

    Raises:
        ValueError: for a bad argument, naming it.

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        >>> gw = gradwatch.watch(model, on_finding="ignore", show=False)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> gw.step_count
        1
        >>> gw.close()
    """
    return TorchWatch(
        model,
        optimizer,
        on_finding=on_finding,
        grad_schedule=grad_schedule,
        activations=activations,
        activation_schedule=activation_schedule,
        norm_schedule=norm_schedule,
        flush_every=flush_every,
        rules=rules,
        strict=strict,
        show=show,
    )


__all__ = [
    "DEFAULT_ACTIVATION_SCHEDULE",
    "DEFAULT_GRAD_SCHEDULE",
    "DEFAULT_NORM_SCHEDULE",
    "SMALL_GRAD_NUMEL",
    "TorchWatch",
    "activation_fractions",
    "activation_reductions_on_device",
    "activation_stats_on_device",
    "every",
    "grad_stats_on_device",
    "strip_wrapper_prefixes",
    "unit_axis_of",
    "watch",
]

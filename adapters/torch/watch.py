"""The PyTorch watch: :func:`watch` and :class:`TorchWatch`, which composes the parts.

* :class:`~gradwatch.monitor.Monitor` (the core): analyzer, guard, finding policy, report;
* :class:`.clock.StepClock`: when a step ends;
* :class:`.grads.GradReducer`: gradient statistics on the device;
* :class:`.activations.ActivationCapture`: activation statistics on sampled steps;
* :class:`.recurrence.RecurrenceProbe`: the gradient through time of recurrent layers;
* :class:`.flush.PendingSteps`: the one host transfer every ``flush_every`` steps.

The watch owns only its configuration (the schedules, checked at ``watch()``), which
optimizer and parameters it watches (found again when they change), and its lifetime:
one live watch per model, ``close()`` and the ``with`` block.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from gradwatch.adapters.torch.activations import ActivationCapture
from gradwatch.adapters.torch.clock import StepClock
from gradwatch.adapters.torch.flush import PendingStep, PendingSteps
from gradwatch.adapters.torch.gate import HookGate
from gradwatch.adapters.torch.grads import GradReducer
from gradwatch.adapters.torch.layer_info import TorchLayerInfo
from gradwatch.adapters.torch.live import (
    forget_live_watch,
    is_rank_zero,
    replace_live_watch,
)
from gradwatch.adapters.torch.native import build_failure, build_status
from gradwatch.adapters.torch.recurrence import RecurrenceProbe
from gradwatch.adapters.torch.wrappers import (
    is_compiled,
    resolve_optimizer,
    strip_wrapper_prefixes,
    unwrap,
    warn_if_lightning,
)
from torch import nn

from gradwatch.analyzer import Analyzer
from gradwatch.config import check_bool, check_int, check_on_finding, check_schedule
from gradwatch.findings import Finding
from gradwatch.guard import Guard
from gradwatch.layer_info import LayerInfo
from gradwatch.monitor import Monitor
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule
from gradwatch.schedules import Schedule, every

_ON_FINDING_MODES = ("warn", "raise", "ignore")

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


class TorchWatch:
    """Monitors one PyTorch model's gradient flow. Create it with :func:`watch`.

    Attributes:
        analyzer: the :class:`gradwatch.Analyzer` receiving the statistics.
        guard: the :class:`~gradwatch.guard.Guard` that switches monitoring off on an
            internal error.
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
        scaler: torch.amp.GradScaler | None = None,
        log_to: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # Everything is checked before the monitor exists: it registers the at-exit report.
        check_on_finding(on_finding, _ON_FINDING_MODES)
        self._grad_schedule = check_schedule("grad_schedule", grad_schedule)
        activation_schedule = check_schedule("activation_schedule", activation_schedule)
        self._norm_schedule = check_schedule("norm_schedule", norm_schedule)
        self._flush_every = check_int("flush_every", flush_every, minimum=1)
        activations = check_bool("activations", activations)
        strict, show = check_bool("strict", strict), check_bool("show", show)
        root = unwrap(model)
        named = [(strip_wrapper_prefixes(n), p) for n, p in root.named_parameters()]
        opt, scaler = resolve_optimizer(optimizer, scaler, [p for _, p in named])
        warn_if_lightning(model, optimizer)
        self._monitor = Monitor(
            where="torch adapter",
            rules=rules,
            check_every=_CHECK_EVERY,
            on_finding=on_finding,
            modes=_ON_FINDING_MODES,
            strict=strict,
            show=show,
            report_at_exit=show,
            rank_zero=is_rank_zero(),
            before_report=self._before_report,
            log_to=log_to,
            framework="torch",
        )
        self._closed = False
        self._model_ref = weakref.ref(model)
        self._root_ref = weakref.ref(root)
        replace_live_watch(model, self)
        gate = HookGate(self._monitor.guard, lambda: self.enabled)
        self._grads = GradReducer(named, note=self._monitor.note)
        self._pending = PendingSteps(layout=self._grads.layout)
        self._clock = StepClock(
            self._grads.params,
            opt,
            gate,
            root=root,
            scaler=scaler,
            on_step=self._on_step,
            on_skipped=self._on_skipped,
            on_advance=self._on_advance,
            on_idle_step=self._on_idle_step,
            on_params_changed=self._find_params,
            module_hooks=not is_compiled(model),
        )
        self._acts = ActivationCapture(gate, activation_schedule)
        self._activations = activations and not is_compiled(model)
        if activations and not self._activations:
            self._monitor.note(
                "Activations are not captured on a torch.compile'd model (hooks would break "
                "its graph); dead_relu and saturation judge gradients only."
            )
        elif activations:
            self._acts.find_sites(root, note=self._monitor.note)
        self._acts.begin_step(0)
        self._time = RecurrenceProbe(gate, self._grad_schedule, self._monitor.note)
        self._compiled = is_compiled(model)
        # What each parameter's layer is, for the rules (the probe's word on recurrent ones).
        self._layer_info: TorchLayerInfo | None = None
        self._recurrent_info: dict[str, LayerInfo] = {}
        self._feeds_version = -1
        self._find_recurrent(root, compiled=self._compiled)
        self._find_layer_info(root)
        # The C kernels build in the background (torch ops meanwhile: slower, not wrong);
        # a build that fails is noted at the first flush after it ends.
        self._kernels_unsettled = any(p.device.type == "cpu" for p in self._grads.params)
        self._note_kernel_fallback()

    # --- public ----------------------------------------------------------------------

    @property
    def analyzer(self) -> Analyzer:
        """The :class:`gradwatch.Analyzer` receiving the statistics."""
        return self._monitor.analyzer

    @property
    def guard(self) -> Guard:
        """The guard that turns an internal error into one warning and switches off."""
        return self._monitor.guard

    @property
    def step_count(self) -> int:
        """Steps seen so far (sampled or not, skipped ones included)."""
        return self._clock.step_count

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def enabled(self) -> bool:
        """False once closed or once an internal error switched monitoring off."""
        return not self._closed and self._monitor.enabled

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
            self._clock.manual_step()

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
        self._monitor.error_step = self.step_count
        return self._monitor.report(show)

    def close(self) -> None:
        """Flush, then remove every hook and restore functional activations. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._monitor.close()
        self._clock.close()
        self._acts.close()
        self._time.close()
        self._pending.clear()
        self._grads.close()
        model = self._model_ref()
        if model is not None:
            forget_live_watch(model, self)

    def __enter__(self) -> TorchWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.report()
        finally:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("on" if self.enabled else "off")
        return f"TorchWatch({len(self._grads.names)} parameters, step {self.step_count}, {state})"

    # --- the clock's callbacks (no host sync here) -----------------------------------

    def _on_step(self, step: int) -> None:
        pending = PendingStep(step=step)
        if self._grad_schedule(step):
            self._grads.reduce_grads(pending)
        elif self._norm_schedule(step):
            self._grads.reduce_total_norm(pending)
        self._acts.drain_into(pending)
        self._time.drain_into(pending)
        self._pending.add(pending)

    def _on_skipped(self, step: int) -> None:
        self._pending.add(PendingStep(step=step, skipped=True))

    def _on_advance(self, step: int) -> None:
        self._acts.begin_step(step)
        self._time.begin_step(step)
        if step % self._flush_every == 0:
            self._flush()

    def _on_idle_step(self, step: int) -> bool:
        """Monitoring is off: a watch over sharded gradients still joins the collectives
        its ranks expect at each step, so the other ranks never wait for it."""
        if self._closed or not self._grads.sharded:
            return False
        with contextlib.suppress(Exception):  # monitoring is off: nothing may raise now
            per_layer = bool(self._grad_schedule(step))
            if per_layer or self._norm_schedule(step):
                self._grads.join_collectives(per_layer)
        return True

    def _note_kernel_fallback(self) -> None:
        status = build_status() if self._kernels_unsettled else "ready"
        if status == "building":
            return
        self._kernels_unsettled = False
        if status == "unavailable":
            self._monitor.note(
                "CPU statistics use torch ops, about 4x the cost of gradwatch's C kernels, "
                f"which could not be built ({build_failure()})."
            )

    def _flush(self) -> None:
        self._note_kernel_fallback()
        self._push_layer_info()
        stats = self._pending.drain(is_output=self._acts.is_output)
        if stats:
            self._monitor.observe(stats)

    def _before_report(self) -> None:
        """Flush, then tell the monitor what the model holds (the report's coverage)."""
        self.flush()
        root = self._root_ref()
        if root is None:
            return
        with self.guard:
            trainable = [
                strip_wrapper_prefixes(n) for n, p in root.named_parameters() if p.requires_grad
            ]
            acts = self._acts
            self._monitor.set_coverage(trainable, acts.observed, acts.activation_modules)
            note = acts.no_activation_note()
            if note is not None:
                self._monitor.note(note)

    def _find_params(self) -> None:
        """The parameters changed (``add_param_group``, ``to_empty()``): watch the
        model's current ones, by identity; the pending steps index the old list."""
        root = self._root_ref()
        if root is None:
            return
        named = [(strip_wrapper_prefixes(n), p) for n, p in root.named_parameters()]
        if [id(p) for _, p in named] == [id(p) for p in self._grads.params]:
            return
        self._flush()
        self._grads.set_params(named)
        self._clock.set_params(self._grads.params)
        if self._activations:
            self._acts.find_sites(root, note=lambda text: None)
            self._acts.begin_step(self.step_count)
        self._find_recurrent(root, compiled=self._compiled)
        self._find_layer_info(root)

    def _find_layer_info(self, root: nn.Module) -> None:
        """What each parameter's layer is (fan-in, recurrence, the activation it feeds),
        for the rules; the activations seen on sampled forwards are added at flushes."""
        self._feeds_version = -1
        with self.guard:
            self._layer_info = TorchLayerInfo(root)
            self._push_layer_info(force=True)

    def _push_layer_info(self, force: bool = False) -> None:
        """Hand the core the layer info again when new activations were seen feeding layers."""
        info, acts = self._layer_info, self._acts
        if info is None or (acts.feeds_version == self._feeds_version and not force):
            return
        self._feeds_version = acts.feeds_version
        if info.see(acts.feeds) or force:
            self._monitor.set_layer_info(info.current(over=self._recurrent_info))

    def _find_recurrent(self, root: nn.Module, *, compiled: bool) -> None:
        """Find the recurrent layers (their kinds go to the rules) and tap them from the
        current step on; a ``torch.compile``'d model is not tapped (hooks break its graph)."""
        info = self._recurrent_info = self._time.find_layers(root)
        if info:
            self._monitor.set_layer_info(info)
        if compiled and self._time.names:
            self._time.close()
            self._monitor.note(
                "The gradient through time of recurrent layers is not measured on a "
                "torch.compile'd model (hooks would break its graph)."
            )
        self._time.begin_step(self.step_count)


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
    scaler: torch.amp.GradScaler | None = None,
    log_to: Any = None,
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
        scaler: the ``torch.amp.GradScaler`` that steps ``optimizer``: the steps it
            skips for Inf/NaN are counted as nonfinite evidence. Defaults to ``None``
            (the scaler of an accelerate ``AcceleratedOptimizer`` is found by itself;
            without one, no step is taken for skipped).
        log_to: where the per-step numbers also go: a TensorBoard log directory, a
            ``SummaryWriter``, a wandb run, the ``mlflow`` module or a callable
            ``(step, {tag: value})``; tags in ``docs/logging.md``. Defaults to ``None``.

    ``optimizer`` may be a wrapper that holds the real optimizer as ``.optimizer``
    (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``); the real
    one is watched. Parameters added later (``add_param_group``, ``to_empty()`` after
    meta-device init) are watched from the step they appear on.

    Raises:
        ValueError: for a bad argument, naming it; for an optimizer that holds none of
            the model's parameters.

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
        scaler=scaler,
        log_to=log_to,
    )


__all__ = [
    "DEFAULT_ACTIVATION_SCHEDULE",
    "DEFAULT_GRAD_SCHEDULE",
    "DEFAULT_NORM_SCHEDULE",
    "TorchWatch",
    "watch",
]

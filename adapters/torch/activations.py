"""Activation capture of the PyTorch adapter: :class:`ActivationCapture`.

It owns the activation sites (activation modules, functional activations that
modules call through an attribute such as ``nn.TransformerEncoderLayer.activation``,
and functional calls such as ``F.relu`` inside ``forward()``, seen by
:class:`.functional.FunctionalCapture`), the forward hooks and functional probes, which
live only while a step is sampled, and the device reductions of the activations seen
at the current step. Only training forwards
count: a module in ``eval()`` mode or a forward under ``torch.no_grad()`` (a validation
pass) is never observed, through a module hook or a functional probe alike. Copies and
pickles of the model carry neither (:func:`.gate.register_module_hook`; a probe pickles
as the function it stands in for), so a copy's forwards never feed the watch.

Example:
    >>> import torch
    >>> from gradwatch.guard import Guard
    >>> from gradwatch.schedules import every
    >>> capture = ActivationCapture(HookGate(Guard("demo"), lambda: True), every(1))
    >>> capture.find_sites(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), print)
    True
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from gradwatch.adapters.torch.flush import PendingStep
from gradwatch.adapters.torch.functional import (
    FunctionalCapture,
    margin,
    module_input_bound,
    spec_of,
)
from gradwatch.adapters.torch.gate import HookGate, register_module_hook
from gradwatch.adapters.torch.reductions import activation_reductions_on_device, unit_axis_of
from gradwatch.adapters.torch.wrappers import strip_wrapper_prefixes
from torch import nn

from gradwatch.activations import JUDGED_ON_INPUT, input_tail_bound, kind_from_name, tail_bounds
from gradwatch.schedules import Schedule

# Activation classes whose output is not in the activation's own range (log-probabilities).
_NOT_OBSERVED = frozenset({"LogSoftmax", "LogSigmoid", "Softmin"})
# Instance attributes through which modules call a functional activation
# (nn.TransformerEncoderLayer.activation is F.relu by default).
_FUNCTIONAL_ATTRS = ("activation", "act", "act_fn", "activation_fn")


@dataclass(frozen=True)
class _ActivationSite:
    name: str
    kind: str
    bounds: tuple[float, float]
    # Judged on the input (JUDGED_ON_INPUT): the bound of its flat tail, else None.
    input_bound: float | None = None


def _is_activation_like(module: nn.Module) -> bool:
    """A leaf whose class names an activation, known kind or not (coverage counts it)."""
    cls = type(module).__name__
    known = kind_from_name(cls) != "other" or cls in _NOT_OBSERVED
    return (known or cls.endswith("Activation")) and not any(module.children())


def _functional_input_bound(fn: Callable[..., Any], kind: str) -> float | None:
    if kind not in JUDGED_ON_INPUT:
        return None
    spec = spec_of(fn)
    return input_tail_bound(spec.input_fn if spec and spec.input_fn else kind)


class _FunctionalProbe:
    """Stands in for a functional activation attribute (``layer.activation = F.relu``)
    while watched; calls the original and reports its output with the owning module's
    training flag. Pickles and copies as the original, with no reference to gradwatch."""

    def __init__(
        self,
        fn: Callable[..., Any],
        report: Callable[[bool, Any, Any], None],
        owner: weakref.ref[nn.Module],
        hush: Callable[[], Any],
    ) -> None:
        self.fn = fn
        self.report = report
        self.owner = owner
        self.hush = hush

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.hush():  # this call is the probe's site, not a functional one too
            out = self.fn(*args, **kwargs)
        owner = self.owner()
        self.report(owner is not None and owner.training, args[0] if args else None, out)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        # copy.copy returns a function itself: the copy holds the original activation.
        return (copy.copy, (self.fn,))


class ActivationCapture:
    """Captures activation outputs on the steps ``schedule`` samples.

    Args:
        gate: runs the hooks only while monitoring is on, inside its guard.
        schedule: ``step -> bool``, the steps whose activations are captured.
    """

    def __init__(self, gate: HookGate, schedule: Schedule) -> None:
        self.active = False  # sites were found and capture is wanted
        self._gate = gate
        self._schedule = schedule
        self._sampling = False
        self._root_ref: weakref.ref[nn.Module] | None = None
        # Sites (found once), and the hooks and probes live while a step is sampled.
        self._module_sites: list[tuple[weakref.ref[nn.Module], _ActivationSite]] = []
        self._functional_sites: list[
            tuple[weakref.ref[nn.Module], str, Callable[..., Any], _ActivationSite]
        ] = []
        self._handles: list[Any] = []
        self._probes: list[tuple[nn.Module, str, Callable[..., Any]]] = []
        self._functional = FunctionalCapture(gate, self._on_functional)
        # For the coverage: every site observed (name -> kind), the activation-like
        # modules found (name -> kind), and the sampled training forwards.
        self.observed: dict[str, str] = {}
        self.activation_modules: dict[str, str] = {}
        self.sampled_forwards = 0
        # This step's reductions by name, the forward calls per site (a site called twice
        # in one forward pass is two activations), and the site that made the model output.
        self._step_acts: dict[str, tuple[str, int, list[torch.Tensor]]] = {}
        self._fwd_calls: dict[str, int] = {}
        # The newest activation output, held weakly: an id() could be reused by the model's
        # output once the activation's Python tensor is freed (autograd keeps only its data).
        self._fwd_last: tuple[weakref.ref[torch.Tensor], str] | None = None
        self._output_names: set[str] = set()

    def find_sites(self, root: nn.Module, note: Callable[[str], None] | None = None) -> bool:
        """Find the activation sites under ``root`` (again, when the watch finds the
        parameters again). Functional calls inside ``forward()`` are found as they run,
        so capture is always on; returns whether any module or probe site was found."""
        self._set_sampling(False)
        self._module_sites.clear()
        self._functional_sites.clear()
        self.activation_modules.clear()
        modules: dict[int, tuple[weakref.ref[nn.Module], str, bool]] = {}
        root_name = ""
        for raw_name, module in root.named_modules():
            name = strip_wrapper_prefixes(raw_name) or type(module).__name__.lower()
            root_name = root_name or name
            cls = type(module).__name__
            kind = kind_from_name(cls)
            hooked = kind != "other" and cls not in _NOT_OBSERVED and not any(module.children())
            if _is_activation_like(module):
                self.activation_modules[name] = kind
            modules[id(module)] = (weakref.ref(module), name, hooked or cls in _NOT_OBSERVED)
            if hooked:
                bound = module_input_bound(module) if kind in JUDGED_ON_INPUT else None
                bounds = tail_bounds(kind) if bound is None else (-math.inf, math.inf)
                site = _ActivationSite(name, kind, bounds, bound)
                self._module_sites.append((weakref.ref(module), site))
            for attr in _FUNCTIONAL_ATTRS:
                fn = module.__dict__.get(attr)
                if fn is None or isinstance(fn, nn.Module) or not callable(fn):
                    continue
                fn_kind = kind_from_name(getattr(fn, "__name__", ""))
                if fn_kind == "other" or isinstance(fn, _FunctionalProbe):
                    continue
                bound = _functional_input_bound(fn, fn_kind)
                bounds = tail_bounds(fn_kind) if bound is None else (-math.inf, math.inf)
                site = _ActivationSite(f"{name}.{attr}", fn_kind, bounds, bound)
                self._functional_sites.append((weakref.ref(module), attr, fn, site))
        self._functional.set_modules(root_name, modules)
        self._functional.set_params(
            [(strip_wrapper_prefixes(n), p) for n, p in root.named_parameters()]
        )
        self._root_ref = weakref.ref(root)
        self.active = True
        return bool(self._module_sites or self._functional_sites)

    def no_activation_note(self) -> str | None:
        """The coverage note when sampled training forwards ran and no activation was
        seen in them (neither modules nor functional calls), else ``None``."""
        if not self.active or self.observed or self.sampled_forwards == 0:
            return None
        return (
            "No activation was seen in the sampled training forward passes (no activation "
            "module, no functional call such as F.relu or torch.sigmoid); dead_relu falls "
            "back to the exact-zero gradients of layers known to feed a ReLU, and saturation "
            "is not checked."
        )

    def begin_step(self, step: int) -> None:
        """Attach the hooks if ``step`` is sampled, else detach them. What a closure's
        later calls (LBFGS's line search) recorded after the step ended is dropped."""
        self._step_acts = {}
        self._set_sampling(self.active and bool(self._schedule(step)))

    def drain_into(self, pending: PendingStep) -> None:
        """Move this step's activation reductions into ``pending``."""
        for name, (kind, numel, parts) in self._step_acts.items():
            pending.act_names.append(name)
            pending.act_kinds.append(kind)
            pending.act_numel.append(numel)
            pending.act_parts.append(parts)
        self._step_acts = {}

    @property
    def feeds(self) -> dict[str, str]:
        """Parameter name -> the activation kind its layer was seen to feed, on the
        sampled training forwards so far (see :class:`.functional.FunctionalCapture`)."""
        feeds: dict[str, str] = self._functional.feeds
        return feeds

    @property
    def feeds_version(self) -> int:
        """Grows whenever :attr:`feeds` changes."""
        version: int = self._functional.feeds_version
        return version

    def is_output(self, name: str) -> bool:
        """Whether the activation ``name`` made the model's output."""
        return name in self._output_names

    def close(self) -> None:
        """Remove the hooks, restore functional activations and forget the sites."""
        self._set_sampling(False)
        self.active = False
        self._module_sites.clear()
        self._functional_sites.clear()
        self._functional.set_modules("", {})
        self._step_acts.clear()

    def _set_sampling(self, sampling: bool) -> None:
        """Attach the activation hooks for a sampled step and detach them after it, so
        steps that are not sampled run the model with no gradwatch code in its
        forward pass (a forward hook costs ~10 us per module call even when idle)."""
        if sampling == self._sampling:
            return
        self._sampling = sampling
        if not sampling:
            self._functional.exit()
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for module, attr, original in self._probes:
                module.__dict__[attr] = original
            self._probes.clear()
            return
        root = self._root_ref() if self._root_ref is not None else None
        if root is None:
            return
        gate = self._gate
        for module_ref, site in self._module_sites:
            module = module_ref()
            if module is None:
                continue
            if site.input_bound is not None:  # judged on the input: before an in-place forward
                hook = gate.hook(functools.partial(self._on_module_input, site))
                self._handles.append(register_module_hook(module, hook, pre=True))
            else:
                hook = gate.hook(functools.partial(self._on_module_output, site))
                self._handles.append(register_module_hook(module, hook))
        for module_ref, attr, fn, site in self._functional_sites:
            module = module_ref()
            if module is not None and module.__dict__.get(attr) is fn:
                report = gate.hook(functools.partial(self._on_probe, site))
                probe = _FunctionalProbe(fn, report, module_ref, self._functional.hush)
                module.__dict__[attr] = probe
                self._probes.append((module, attr, fn))
        pre_hook = gate.hook(self._on_root_forward_pre, guarded=False)
        self._handles.append(register_module_hook(root, pre_hook, pre=True))
        self._handles.append(register_module_hook(root, gate.hook(self._on_root_output)))

    # --- hook bodies: the hooks live only while a step is sampled, so they need no
    # schedule check; _on_activation keeps one for a functional probe that a model kept
    # a reference to after it was removed.

    def _on_root_forward_pre(self, module: nn.Module, args: Any) -> None:
        self._fwd_calls.clear()
        self._fwd_last = None
        if module.training and torch.is_grad_enabled():
            self.sampled_forwards += 1
            with self._gate.guard:
                self._functional.enter(module)

    def _on_module_output(
        self, site: _ActivationSite, module: nn.Module, args: Any, output: Any
    ) -> None:
        self._note_feeds(site, module, args)
        self._on_activation(site, module.training, output, output)

    def _on_module_input(self, site: _ActivationSite, module: nn.Module, args: Any) -> None:
        self._note_feeds(site, module, args)
        z = args[0] if args else None
        if isinstance(z, torch.Tensor) and z.is_floating_point() and site.input_bound is not None:
            self._on_activation(site, module.training, margin(z, site.input_bound), None)

    def _note_feeds(self, site: _ActivationSite, module: nn.Module, args: Any) -> None:
        """The layer that made this activation module's input feeds it."""
        if args and module.training and torch.is_grad_enabled():
            self._functional.note_feeds(args[0], site.kind)

    def _on_probe(self, site: _ActivationSite, training: bool, z: Any, output: Any) -> None:
        if site.input_bound is None:
            self._on_activation(site, training, output, output)
        elif isinstance(z, torch.Tensor) and z.is_floating_point():
            self._on_activation(site, training, margin(z, site.input_bound), output)

    def _on_functional(
        self, name: str, kind: str, measured: torch.Tensor, output: Any, bounds: tuple[float, float]
    ) -> None:
        self._on_activation(_ActivationSite(name, kind, bounds), True, measured, output)

    def _on_activation(
        self, site: _ActivationSite, module_training: bool, measured: Any, output: Any
    ) -> None:
        """Reduce ``measured`` (the output, or the margin of the input) for ``site``;
        ``output`` is what the call returned, to tell the site that made the model's."""
        if not (self._sampling and module_training and torch.is_grad_enabled()):
            return
        if not isinstance(measured, torch.Tensor) or not measured.is_floating_point():
            return
        if measured.numel() == 0:
            return
        calls = self._fwd_calls.get(site.name, 0)
        self._fwd_calls[site.name] = calls + 1
        name = site.name if calls == 0 else f"{site.name}#{calls}"
        if isinstance(output, torch.Tensor):
            self._fwd_last = (weakref.ref(output), name)
        if name in self._step_acts:
            return  # a later micro-batch of an accumulated step: the first one is the sample
        self.observed.setdefault(name, site.kind)
        parts = activation_reductions_on_device(
            measured, site.kind, unit_axis_of(measured), site.bounds
        )
        self._step_acts[name] = (site.kind, measured.numel(), parts)

    def _on_root_output(self, module: nn.Module, args: Any, output: Any) -> None:
        last = self._fwd_last
        if last is None:
            return
        newest = last[0]()
        if newest is None:
            return
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        if any(o is newest for o in outputs):
            self._output_names.add(last[1])


__all__ = ["ActivationCapture"]

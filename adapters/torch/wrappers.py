"""Wrappers around what the user hands :func:`gradwatch.watch`: the module under DDP and
torch.compile and its layer names; the ``torch.optim.Optimizer`` under accelerate's
``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer``, and a ``GradScaler``
one of them holds; whether the run is driven by Lightning.

Example:
    >>> strip_wrapper_prefixes("module._orig_mod.enc.fc1.weight")
    'enc.fc1.weight'
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradwatch.guard import GradwatchWarning

# Wrapper prefixes that are not part of the user's layer names: DDP adds "module.",
# torch.compile's OptimizedModule adds "_orig_mod.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def unwrap(model: nn.Module) -> nn.Module:
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


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs through torch.compile (wrapped, or compiled in place)."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module) or (
        getattr(model, "_compiled_call_impl", None) is not None
    )


def unwrap_optimizer(optimizer: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The real ``torch.optim.Optimizer`` under wrappers that hold it as ``.optimizer``
    or ``._optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, ...): the innermost one that has torch's step hooks; and a
    ``torch.amp.GradScaler`` a wrapper holds as ``.scaler`` (else ``None``).

    Raises:
        ValueError: ``optimizer`` is not an optimizer nor a wrapper of one.
    """
    chain = [optimizer]
    while len(chain) < 16:
        inner = _inner_optimizer(chain[-1])
        if inner is None or any(inner is seen for seen in chain):
            break
        chain.append(inner)
    usable = [o for o in chain if _has_step_hooks(o)]
    if not usable:
        raise ValueError(
            "optimizer must be a torch.optim.Optimizer (or a wrapper holding one as "
            f"`.optimizer`) or None, got {type(optimizer).__name__}"
        )
    scalers = [
        vars(o).get("scaler") for o in chain if isinstance(getattr(o, "__dict__", None), dict)
    ]
    scaler = next((s for s in scalers if isinstance(s, torch.amp.GradScaler)), None)
    return usable[-1], scaler


def _has_step_hooks(obj: Any) -> bool:
    # accelerate's AcceleratedOptimizer subclasses Optimizer without its __init__.
    return isinstance(obj, torch.optim.Optimizer) and hasattr(obj, "_optimizer_step_pre_hooks")


def _inner_optimizer(wrapper: Any) -> Any:
    """The object ``wrapper`` holds as ``.optimizer`` (else ``._optimizer``), if any."""
    for attr in ("optimizer", "_optimizer"):
        try:
            inner = getattr(wrapper, attr, None)
        except Exception:  # a property that raises: not a wrapper we know
            inner = None
        if inner is not None and inner is not wrapper:
            return inner
    return None


def resolve_optimizer(
    optimizer: object, scaler: object, params: Sequence[torch.Tensor]
) -> tuple[torch.optim.Optimizer | None, torch.amp.GradScaler | None]:
    """The real optimizer under ``optimizer``'s wrappers, which must hold some of
    ``params``, and the scaler: ``scaler`` (checked), else one a wrapper holds."""
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise ValueError(f"scaler must be a torch.amp.GradScaler or None, got {scaler!r}")
    if optimizer is None:
        if scaler is not None:
            raise ValueError("scaler needs the optimizer it steps: pass optimizer= too")
        return None, None
    opt, held_scaler = unwrap_optimizer(optimizer)
    watched = {id(p) for p in params}
    if params and not any(id(p) in watched for g in opt.param_groups for p in g["params"]):
        raise ValueError(
            "optimizer holds none of the model's parameters: pass the optimizer that "
            "trains this model (a GAN has one watch per model and its optimizer)"
        )
    return opt, scaler if scaler is not None else held_scaler


def warn_if_lightning(model: Any, optimizer: Any) -> None:
    """One warning when the model or optimizer is Lightning's: inside a Lightning loop
    plain ``watch()`` reads the gradients after Lightning's clipping, and the callback
    is the correct tool."""
    if is_lightning(model, optimizer):
        warnings.warn(
            "gradwatch.watch() inside Lightning reads the gradients after Lightning's "
            "clipping and misses its AMP scaler's skipped steps; use "
            "lightning.Trainer(callbacks=[gradwatch.LightningCallback()]) instead",
            GradwatchWarning,
            stacklevel=4,
        )


def is_lightning(*objects: Any) -> bool:
    """Whether one of ``objects`` comes from Lightning (a ``LightningModule`` or a
    ``LightningOptimizer``), found by class name so that Lightning is never imported."""
    for obj in objects:
        for cls in type(obj).__mro__:
            if cls.__name__ in ("LightningModule", "LightningOptimizer") and (
                cls.__module__.startswith(("lightning", "pytorch_lightning"))
            ):
                return True
    return False


__all__ = [
    "is_compiled",
    "is_lightning",
    "resolve_optimizer",
    "strip_wrapper_prefixes",
    "unwrap",
    "unwrap_optimizer",
    "warn_if_lightning",
]

"""DDP and torch.compile wrappers: the user's module and layer names under them.

Example:
    >>> strip_wrapper_prefixes("module._orig_mod.enc.fc1.weight")
    'enc.fc1.weight'
"""

from __future__ import annotations

from torch import nn

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


__all__ = ["is_compiled", "strip_wrapper_prefixes", "unwrap"]

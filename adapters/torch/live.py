"""Which watch is live on which model: one per model, so watching a model twice closes
and replaces the first watch (weak references both ways: nothing leaks); and whether
this process is rank zero (only it prints and warns).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> live_watch(model) is None
    True
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Protocol

import torch
from torch import nn

from gradwatch.guard import GradwatchWarning


class _Closable(Protocol):
    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


# The live watch per model (the lifecycle tests read it).
LIVE_WATCHES: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def live_watch(model: nn.Module) -> Any:
    """The model's live watch, or ``None``."""
    ref = LIVE_WATCHES.get(model)
    return ref() if ref is not None else None


def replace_live_watch(model: nn.Module, new: _Closable) -> None:
    """Make ``new`` the model's live watch, closing an earlier one with a warning."""
    old = live_watch(model)
    if old is not None and not old.closed:
        warnings.warn(
            "this model is already watched by gradwatch; the earlier watch is closed "
            "and replaced by this one",
            GradwatchWarning,
            stacklevel=4,
        )
        old.close()
    LIVE_WATCHES[model] = weakref.ref(new)


def forget_live_watch(model: nn.Module, watch: object) -> None:
    """``watch`` closed: it is no longer the model's live watch."""
    if live_watch(model) is watch:
        del LIVE_WATCHES[model]


def is_rank_zero() -> bool:
    """Not a distributed run, or its rank 0."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


__all__ = ["LIVE_WATCHES", "forget_live_watch", "is_rank_zero", "live_watch", "replace_live_watch"]

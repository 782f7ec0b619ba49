"""When the watch's hooks run, and hooks that never travel with a copy of the model.

* :class:`HookGate` owns the on/off test and the :class:`~gradwatch.guard.Guard` that
  every hook body runs under. A hook holds the gate and the gate holds the watch, so the
  one-line ``gradwatch.watch(model, optimizer)`` keeps monitoring without a kept handle;
  the watch holds the model only weakly, so nothing leaks, and ``close()`` removes the hooks.
* :func:`register_module_hook` attaches a forward (pre-)hook that ``torch.save(model)``,
  ``pickle.dumps(model)``, ``copy.deepcopy(model)`` and ``copy.copy(model)`` leave out:
  while a module of type ``T`` carries one, ``copyreg.dispatch_table[T]`` holds a reducer
  that drops gradwatch's entries from the hook dicts, so a copy pickles exactly as an
  unwatched model, never needs gradwatch to load and never feeds the watch. (Tensor hooks
  need nothing: torch pickles and deep-copies parameters without their hooks.)

Example:
    >>> from gradwatch.guard import Guard
    >>> gate = HookGate(Guard("demo"), lambda: False)
    >>> gate.hook(print)("never printed") is None
    True
"""

from __future__ import annotations

import copyreg
from collections.abc import Callable
from typing import Any

from torch import nn

from gradwatch.guard import Guard


class GateHook:
    """A hook calling ``fn(*args)`` while the gate is open; see :meth:`HookGate.hook`."""

    # torch's marker for tensor hooks that are knowingly not serialized (no warning).
    __torch_unserializable__ = True

    def __init__(self, gate: HookGate, fn: Callable[..., None], guarded: bool) -> None:
        self.gate = gate
        self.fn = fn
        self.guarded = guarded

    def __call__(self, *args: Any) -> None:
        if not self.gate.enabled:
            return
        if not self.guarded:
            self.fn(*args)
            return
        with self.gate.guard:
            self.fn(*args)

    def __reduce__(self) -> tuple[Any, ...]:
        # Only reached through a container gradwatch does not know: it unpickles inert.
        return (_inert_hook, ())


def _inert_hook() -> Callable[..., None]:
    return _do_nothing


def _do_nothing(*args: Any) -> None:
    return None


class HookGate:
    """Runs hook bodies only while monitoring is on, inside ``guard``.

    Args:
        guard: turns an internal error in a hook into one warning and switches off.
        is_enabled: whether monitoring is on (the watch is open and has not failed).
    """

    def __init__(self, guard: Guard, is_enabled: Callable[[], bool]) -> None:
        self.guard = guard
        self._is_enabled = is_enabled

    @property
    def enabled(self) -> bool:
        """Whether hooks run now."""
        return self._is_enabled()

    def hook(self, fn: Callable[..., None], *, guarded: bool = True) -> GateHook:
        """A hook calling ``fn(*args)`` while enabled, inside the guard unless
        ``guarded=False`` (a body that enters it itself, after a cheap early exit). It
        returns ``None``, so torch never replaces a gradient, input or output with it."""
        return GateHook(self, fn, guarded)


# Module types whose copies drop gradwatch hooks: how many live hooks need it, and the
# reducer that was in copyreg before (None: the default pickling).
_COPY_SAFE: dict[type, list[Any]] = {}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


class _ModuleHookHandle:
    """Removes one module hook, and the copy reducer of its type once none is left."""

    def __init__(self, handle: Any, module_type: type) -> None:
        self._handle = handle
        self._type: type | None = module_type

    def remove(self) -> None:
        self._handle.remove()
        module_type, self._type = self._type, None
        if module_type is None:
            return
        entry = _COPY_SAFE[module_type]
        entry[0] -= 1
        if entry[0] == 0:
            del _COPY_SAFE[module_type]
            if entry[1] is None:
                copyreg.dispatch_table.pop(module_type, None)
            else:
                copyreg.dispatch_table[module_type] = entry[1]


def register_module_hook(module: nn.Module, hook: GateHook, *, pre: bool = False) -> Any:
    """``module.register_forward_hook(hook)`` (``register_forward_pre_hook`` when
    ``pre``), such that copies and pickles of the module leave the hook out. Returns a
    handle whose ``remove()`` undoes both."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    module_type = type(module)
    entry = _COPY_SAFE.get(module_type)
    if entry is None:
        entry = _COPY_SAFE[module_type] = [0, copyreg.dispatch_table.get(module_type)]
        copyreg.dispatch_table[module_type] = _reduce_without_gradwatch_hooks
    entry[0] += 1
    return _ModuleHookHandle(handle, module_type)


def _reduce_without_gradwatch_hooks(module: nn.Module) -> Any:
    """``module``'s pickling, with gradwatch's entries dropped from its hook dicts."""
    entry = _COPY_SAFE.get(type(module))
    previous = entry[1] if entry is not None else None
    reduced = previous(module) if previous is not None else module.__reduce_ex__(4)
    if not isinstance(reduced, tuple) or len(reduced) < 3 or not isinstance(reduced[2], dict):
        return reduced
    state = reduced[2]
    for key in _HOOK_DICTS:
        hooks = state.get(key)
        if hooks and any(isinstance(h, GateHook) for h in hooks.values()):
            state = dict(state) if state is reduced[2] else state
            kept = ((k, h) for k, h in hooks.items() if not isinstance(h, GateHook))
            state[key] = type(hooks)(kept)
    return (*reduced[:2], state, *reduced[3:])


__all__ = ["GateHook", "HookGate", "register_module_hook"]

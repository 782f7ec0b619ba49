"""Functional activations of the PyTorch adapter: :class:`FunctionalCapture`.

``F.relu`` or ``torch.sigmoid`` called inside ``forward()`` leaves no module to hook. On
sampled steps only, while the watched model's training forward runs, a
``torch.overrides.TorchFunctionMode`` sees each such call, and global module forward
pre/post hooks keep the stack of the model's modules whose ``forward`` is running, so a
call is attributed to the innermost one: site ``encoder.layers.3.mlp#gelu:0`` is the
first GELU that ``encoder.layers.3.mlp`` computed in this forward pass.

* Entered by the root's forward pre-hook (attached only while a step is sampled) and
  left by a global forward hook with ``always_call=True`` when the root returns or
  raises: unsampled steps run with no mode and no extra hook.
* Calls inside an activation module that is hooked itself (``nn.ReLU`` calling
  ``F.relu``, Hugging Face's ``NewGELUActivation`` computing with ``tanh``) are that
  module's, never a second site; so are calls through a functional probe.
* Evaluation forwards (the innermost module in ``eval()`` or grad disabled) are skipped.
* The mode returns what the function returned, untouched; statistics are reduced under
  ``no_grad`` on a detached view, so outputs and gradients stay bit for bit the same.
* The smooth ReLU-likes (GELU, SiLU, ELU, softplus...) are judged on their input ``z``
  (see :mod:`gradwatch.activations`): their margin ``max(z - bound, 0)`` is computed
  before the call, so an in-place call cannot overwrite ``z`` first.
* Which layer feeds which activation (:attr:`FunctionalCapture.feeds`): the output of
  each ``F.linear`` / ``conv*`` / ``matmul`` call with a model parameter is remembered,
  by weak reference, with the parameters that made it, also through shape-preserving
  ops (dropout, normalisation, pooling, flatten/view, adding or scaling by a parameter);
  an activation whose input is such a tensor feeds those parameters' layers.

Example:
    >>> import torch
    >>> spec_of(torch.nn.functional.gelu).kind, spec_of(torch.sigmoid).label
    ('gelu', 'sigmoid')
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from gradwatch.adapters.torch.gate import HookGate
from torch import nn
from torch.overrides import TorchFunctionMode

from gradwatch.activations import input_tail_bound, tail_bounds

_INF = (-math.inf, math.inf)


@dataclass(frozen=True)
class FunctionalSpec:
    """How one torch function is observed: ``label`` names its sites, ``kind`` is its
    activation kind, ``input_fn`` names its derivative for :func:`input_tail_bound`
    when it is judged on its input (``None``: judged on its output)."""

    label: str
    kind: str
    input_fn: str | None = None


def _spec_table() -> dict[Any, FunctionalSpec]:
    fn, t, nn_c = torch.nn.functional, torch.Tensor, torch._C._nn
    groups: list[tuple[tuple[str, str, str | None], list[Any]]] = [
        (("relu", "relu", None), [fn.relu, torch.relu, t.relu, torch.relu_, t.relu_]),
        (("relu6", "relu6", None), [fn.relu6]),
        (("leaky_relu", "leaky_relu", None), [fn.leaky_relu, getattr(nn_c, "leaky_relu_", None)]),
        (("elu", "elu", "elu"), [fn.elu, getattr(nn_c, "elu_", None)]),
        (("selu", "elu", "selu"), [fn.selu, torch.selu, getattr(torch, "selu_", None)]),
        (("celu", "elu", "celu"), [fn.celu, torch.celu, getattr(torch, "celu_", None)]),
        (("gelu", "gelu", "gelu"), [fn.gelu]),
        (("silu", "silu", "silu"), [fn.silu]),
        (("mish", "silu", "mish"), [fn.mish]),
        (("hardswish", "silu", "hardswish"), [fn.hardswish]),
        (("softplus", "softplus", "softplus"), [fn.softplus]),
        (
            ("sigmoid", "sigmoid", None),
            [torch.sigmoid, t.sigmoid, t.sigmoid_, torch.special.expit],
        ),
        (("tanh", "tanh", None), [torch.tanh, t.tanh, t.tanh_]),
        (("hardtanh", "hard_tanh", None), [fn.hardtanh, getattr(nn_c, "hardtanh_", None)]),
        (("hardsigmoid", "hard_sigmoid", None), [fn.hardsigmoid]),
        # Not judged by dead_relu nor saturation: observed for its NaN/Inf count, since
        # exp(z) overflows float32 from z > 88.7 in the forward pass.
        (("exp", "exp", None), [torch.exp, t.exp, t.exp_, getattr(torch, "exp_", None)]),
    ]
    return {f: FunctionalSpec(*spec) for spec, funcs in groups for f in funcs if f is not None}


_SPECS = _spec_table()


# How an op passes on "made by these parameters" (see FunctionalCapture.feeds):
# "make": its output is made by the parameters among its arguments (a weight layer);
# "keep": its output keeps its first argument's units (and adds any parameter arguments:
#   a norm's affine weights); "bias": an elementwise op whose other operands are all
#   parameters (``x @ w + b``); anything else forgets.
_MAKE, _KEEP, _BIAS = "make", "keep", "bias"


def _tracking_table() -> dict[Any, str]:
    fn, t = torch.nn.functional, torch.Tensor
    make = [
        fn.linear, fn.bilinear, torch.conv1d, torch.conv2d, torch.conv3d,
        torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
        torch.matmul, t.matmul, t.__matmul__, t.__rmatmul__, torch.mm, t.mm,
        torch.bmm, t.bmm, torch.addmm, t.addmm, torch.baddbmm, t.baddbmm,
    ]  # fmt: skip
    keep = [
        fn.dropout, fn.dropout1d, fn.dropout2d, fn.dropout3d, fn.alpha_dropout,
        fn.feature_alpha_dropout, fn.batch_norm, fn.layer_norm, fn.group_norm,
        fn.instance_norm, getattr(fn, "rms_norm", None), fn.max_pool1d, fn.max_pool2d,
        fn.max_pool3d, fn.avg_pool1d, fn.avg_pool2d, fn.avg_pool3d, fn.adaptive_avg_pool1d,
        fn.adaptive_avg_pool2d, fn.adaptive_avg_pool3d, fn.adaptive_max_pool1d,
        fn.adaptive_max_pool2d, fn.adaptive_max_pool3d, torch.flatten, t.flatten, t.view,
        t.reshape, torch.reshape, t.contiguous, t.squeeze, t.unsqueeze, torch.squeeze,
        torch.unsqueeze, t.transpose, torch.transpose, t.permute, torch.permute,
        t.__getitem__, t.to, t.float,
    ]  # fmt: skip
    bias = [torch.add, t.add, t.__add__, t.__radd__, t.__iadd__, t.add_, torch.mul, t.mul,
            t.__mul__, t.__rmul__, t.__imul__, t.mul_]  # fmt: skip
    table: dict[Any, str] = {}
    for how, funcs in ((_MAKE, make), (_KEEP, keep), (_BIAS, bias)):
        table.update((f, how) for f in funcs if f is not None)
    return table


_TRACKING = _tracking_table()


def tracking_of(func: Any) -> str | None:
    """How ``func`` passes on which parameters made its output, else ``None``."""
    try:
        return _TRACKING.get(func)
    except TypeError:  # an unhashable callable
        return None


def spec_of(func: Any) -> FunctionalSpec | None:
    """The spec of a torch function gradwatch observes, else ``None``."""
    try:
        return _SPECS.get(func)
    except TypeError:  # an unhashable callable
        return None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def call_input_bound(spec: FunctionalSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The input tail bound of one call of an input-judged function, with its arguments."""
    assert spec.input_fn is not None
    name, params = spec.input_fn, {}
    if name == "gelu" and _arg(args, kwargs, 1, "approximate", "none") == "tanh":
        name = "gelu_tanh"
    elif name in ("elu", "celu"):
        params["alpha"] = float(_arg(args, kwargs, 1, "alpha", 1.0))
    elif name == "softplus":
        params["beta"] = float(_arg(args, kwargs, 1, "beta", 1.0))
    return input_tail_bound(name, **params)


def call_output_bounds(
    spec: FunctionalSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[float, float]:
    """The output tail bounds of one call of an output-judged function."""
    if spec.label == "hardtanh":
        return float(_arg(args, kwargs, 1, "min_val", -1.0)), float(
            _arg(args, kwargs, 2, "max_val", 1.0)
        )
    return tail_bounds(spec.kind)


# Activation modules judged on their input: class name -> (derivative name, its params).
_MODULE_INPUT_FNS = {
    "GELU": "gelu",
    "GELUActivation": "gelu",
    "AccurateGELUActivation": "gelu",
    "ClippedGELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "QuickGELU": "quick_gelu",
    "SiLU": "silu",
    "Swish": "silu",
    "SiLUActivation": "silu",
    "Mish": "mish",
    "MishActivation": "mish",
    "HardMish": "mish",
    "Hardswish": "hardswish",
    "HardSwish": "hardswish",
    "ELU": "elu",
    "SELU": "selu",
    "CELU": "celu",
    "Softplus": "softplus",
}


def module_input_bound(module: nn.Module) -> float | None:
    """The input tail bound of an activation module judged on its input, else ``None``."""
    name = _MODULE_INPUT_FNS.get(type(module).__name__)
    if name is None:
        return None
    if name == "gelu" and getattr(module, "approximate", "none") == "tanh":
        name = "gelu_tanh"
    params = {}
    if name in ("elu", "celu"):
        params["alpha"] = float(getattr(module, "alpha", 1.0))
    if name == "softplus":
        params["beta"] = float(getattr(module, "beta", 1.0))
    return input_tail_bound(name, **params)


def margin(z: torch.Tensor, bound: float) -> torch.Tensor:
    """``max(z - bound, 0)`` of a detached ``z``: zero exactly in the flat tail, NaN kept."""
    with torch.no_grad():
        return torch.sub(z.detach(), bound).clamp_(min=0.0)


# What the capture records: (site name, kind, tensor to reduce, the call's output).
Record = Callable[[str, str, torch.Tensor, Any, tuple[float, float]], None]


class _ActivationMode(TorchFunctionMode):
    """Passes every torch function through; hands the observed ones to the capture."""

    def __init__(self, capture: FunctionalCapture) -> None:
        super().__init__()
        self.capture: FunctionalCapture | None = capture

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        capture = self.capture
        if capture is None:
            return func(*args, **kwargs)
        spec = spec_of(func)
        if spec is not None:
            return capture.call(func, spec, args, kwargs)
        how = tracking_of(func)
        out = func(*args, **kwargs)
        if how is not None:
            capture.track(how, args, kwargs, out)
        return out


class FunctionalCapture:
    """The mode and module stack of one watched model's sampled training forwards.

    Args:
        gate: runs the statistics only while monitoring is on, inside its guard.
        record: receives each observed call (see :data:`Record`).
    """

    def __init__(self, gate: HookGate, record: Record) -> None:
        self._gate = gate
        self._record = record
        self._mode: _ActivationMode | None = None
        # id(module) -> (module, its name, whether it is an activation module hooked itself)
        self._modules: dict[int, tuple[weakref.ref[nn.Module], str, bool]] = {}
        self._root_name = ""
        self._stack: list[tuple[str, bool, bool]] = []
        self._handles: list[Any] = []
        self._thread = 0
        self._depth = 0
        self._calls: dict[tuple[str, str], int] = {}
        self._hushed = 0
        self._root_ref: Callable[[], nn.Module | None] = lambda: None
        # id(parameter) -> (parameter, its name), of the watched model.
        self._params: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        # id(tensor) -> (tensor, names of the parameters that made it), this forward only.
        self._made: dict[int, tuple[weakref.ref[torch.Tensor], tuple[str, ...]]] = {}
        self.feeds: dict[str, str] = {}
        self.feeds_version = 0

    def set_modules(self, root_name: str, modules: dict[int, tuple[Any, str, bool]]) -> None:
        """The model's modules by id (found by :class:`.activations.ActivationCapture`)."""
        self._root_name = root_name
        self._modules = modules

    def set_params(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """The watched model's parameters by name, as the gradients name them."""
        self._params = {id(p): (weakref.ref(p), name) for name, p in named}

    @contextlib.contextmanager
    def hush(self) -> Iterator[None]:
        """Calls made inside are someone else's site (a functional probe's)."""
        self._hushed += 1
        try:
            yield
        finally:
            self._hushed -= 1

    def enter(self, root: nn.Module) -> None:
        """The root's training forward begins on a sampled step: push the mode."""
        if self._depth:  # nested in this thread; another thread's forward is not seen
            if threading.get_ident() == self._thread:
                self._depth += 1
            return
        if not (root.training and torch.is_grad_enabled()):
            return
        self._depth = 1
        self._thread = threading.get_ident()
        self._stack = [(self._root_name, True, False)]
        self._calls = {}
        self._made = {}
        modules = torch.nn.modules.module
        self._handles = [
            modules.register_module_forward_pre_hook(self._on_module_pre),
            modules.register_module_forward_hook(self._on_module_post, always_call=True),
        ]
        self._root_ref = weakref.ref(root)
        self._mode = _ActivationMode(self)
        self._mode.__enter__()

    def exit(self) -> None:
        """Pop the mode and remove the global hooks (idempotent, never raises)."""
        self._depth = 0
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack = []
        self._made = {}
        mode, self._mode = self._mode, None
        if mode is None:
            return
        mode.capture = None  # inert from now on, wherever it sits on the stack
        with contextlib.suppress(Exception):
            if torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) is mode:
                mode.__exit__(None, None, None)

    # --- global module hooks (only while the mode is pushed) ---------------------------

    def _on_module_pre(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        entry = self._modules.get(id(module))
        if entry is not None and entry[0]() is module:
            self._stack.append((entry[1], module.training, entry[2]))

    def _on_module_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        root = self._root_ref()
        if module is root:
            self._depth -= 1
            if self._depth <= 0:
                self.exit()
            return
        entry = self._modules.get(id(module))
        if entry is not None and entry[0]() is module and len(self._stack) > 1:
            self._stack.pop()

    # --- the mode's observed calls -----------------------------------------------------

    def call(
        self, func: Any, spec: FunctionalSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``func`` and record its site; the result is returned untouched."""
        name, training, inside_activation = self._stack[-1] if self._stack else ("", False, True)
        x = args[0] if args else kwargs.get("input")
        if not inside_activation and training and self._gate.enabled:
            # An activation module records what feeds it itself, with its own kind.
            with self._gate.guard:
                self.note_feeds(x, spec.kind)
        wanted = (
            not inside_activation
            and not self._hushed
            and training
            and torch.is_grad_enabled()
            and isinstance(x, torch.Tensor)
            and x.is_floating_point()
            and self._gate.enabled
        )
        if not wanted:
            return func(*args, **kwargs)
        key = (name, spec.label)
        index = self._calls.get(key, 0)
        self._calls[key] = index + 1
        site = f"{name}#{spec.label}:{index}"
        measured = None
        if spec.input_fn is not None:  # before the call: an in-place one overwrites z
            with self._gate.guard:
                measured = margin(x, call_input_bound(spec, args, kwargs))
        out = func(*args, **kwargs)
        with self._gate.guard:
            if spec.input_fn is None:
                bounds = call_output_bounds(spec, args, kwargs)
                self._record(site, spec.kind, out, out, bounds)
            elif measured is not None:
                self._record(site, spec.kind, measured, out, _INF)
        return out

    # --- which layer feeds which activation --------------------------------------------

    def note_feeds(self, z: Any, kind: str) -> None:
        """An activation of ``kind`` ran on ``z``: the layers that made ``z`` feed it."""
        for param in self.made_by(z):
            if param not in self.feeds:  # the first seen stays: no flip-flop between branches
                self.feeds[param] = kind
                self.feeds_version += 1

    def made_by(self, tensor: Any) -> tuple[str, ...]:
        """Names of the parameters that made ``tensor`` in this forward, else ``()``."""
        entry = self._made.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        if entry is None or entry[0]() is not tensor:
            return ()
        return entry[1]

    def track(self, how: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Remember which parameters made ``out`` (see :data:`_TRACKING`)."""
        if not isinstance(out, torch.Tensor) or not self._gate.enabled:
            return
        with self._gate.guard:
            params = self._params_in(args, kwargs)
            if how == _MAKE:
                made = params
            else:
                first = args[0] if args else kwargs.get("input")
                made = self.made_by(first)
                if how == _BIAS:
                    # x + b keeps x's layer; x + h (a residual, a gate) mixes layers.
                    others = [a for a in args[1:] if isinstance(a, torch.Tensor)]
                    if not made and len(args) > 1:  # b + x
                        made, others = self.made_by(args[1]), [args[0]]
                    if not all(id(a) in self._params for a in others):
                        return
                if not made:
                    return
                made = tuple(dict.fromkeys(made + params))
            if made:
                self._made[id(out)] = (weakref.ref(out), made)

    def _params_in(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, ...]:
        names = []
        for value in (*args, *kwargs.values()):
            entry = self._params.get(id(value)) if isinstance(value, torch.Tensor) else None
            if entry is not None and entry[0]() is value:
                names.append(entry[1])
        return tuple(names)


__all__ = [
    "FunctionalCapture",
    "FunctionalSpec",
    "call_input_bound",
    "call_output_bounds",
    "margin",
    "module_input_bound",
    "spec_of",
    "tracking_of",
]

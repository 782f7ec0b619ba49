"""What the PyTorch adapter tells the core about each parameter's layer: :class:`TorchLayerInfo`.

For every parameter of the model, a :class:`gradwatch.layer_info.LayerInfo`:

* ``fan_in``: ``Linear.in_features``; ``ConvNd`` ``in_channels / groups x prod(kernel_size)``;
  RNN/LSTM/GRU input weights their layer's input width, recurrent weights the hidden (or
  projection) size; Hugging Face's ``Conv1D`` its ``nx``; ``None`` for biases, embeddings
  and anything else;
* ``recurrent``: the parameter belongs to an ``nn.RNNBase`` or ``nn.RNNCellBase``;
* ``kind``: the owning module's class name (for a parameter held in an
  ``nn.ParameterList``/``ParameterDict``, the class of the layer holding the list);
* ``group``: each entry of an ``nn.ParameterList``/``ParameterDict`` is a layer group of
  its own (``stack.ws.3``), so depth inside a layer that holds a stack of weights is
  visible; every other parameter keeps the analyzer's grouping;
* ``feeds``: the activation applied to the layer's output. **Seen** on sampled training
  forwards by :class:`.functional.FunctionalCapture` (the activation whose input a layer
  made, through shape-preserving ops), which wins; else **inferred from the module
  type** once at attach: in an ``nn.Sequential``, an activation module that follows a
  weight layer through dropout, normalisation, pooling or flatten modules; in a module
  with exactly one weight layer and one activation (a module, or a function in an
  attribute such as ``act``), that layer; ``nn.RNN``/``nn.RNNCell`` their
  ``nonlinearity``; ``nn.TransformerEncoderLayer``/``DecoderLayer``'s ``linear1`` its
  ``activation``.

Example:
    >>> import torch
    >>> info = TorchLayerInfo(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
    >>> info.current()["0.weight"].feeds, info.current()["0.weight"].fan_in
    ('relu', 4)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gradwatch.adapters.torch.wrappers import strip_wrapper_prefixes
from torch import nn

from gradwatch.activations import kind_from_name
from gradwatch.layer_info import LayerInfo, merge

# Modules between a weight layer and its activation that keep its units apart (unit for
# unit, or only rescaled): the activation after them still acts on the layer's output.
_PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
)
_RMS_NORM = getattr(nn, "RMSNorm", None)
if _RMS_NORM is not None:
    _PASS_THROUGH = (*_PASS_THROUGH, _RMS_NORM)

# Instance attributes through which a module calls its activation (as in .activations).
_ACTIVATION_ATTRS = ("activation", "act", "act_fn", "activation_fn", "intermediate_act_fn")


def _is_weight_layer(module: nn.Module) -> bool:
    """A layer whose weight makes each output unit (Linear, ConvNd, HF's Conv1D)."""
    if isinstance(module, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)):
        return True
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nx", None), int)


def _activation_kind(value: Any) -> str | None:
    """The kind of an activation module or function, ``None`` for anything else."""
    if isinstance(value, nn.Module):
        if any(value.children()):
            return None
        name = type(value).__name__
    elif callable(value):
        name = getattr(value, "__name__", "")
    else:
        return None
    kind = kind_from_name(name)
    return None if kind == "other" else kind


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def fan_in_of(module: nn.Module, param_name: str) -> int | None:
    """Inputs per output unit of ``module``'s parameter ``param_name`` (its attribute
    name), or ``None`` for a bias, an embedding or a layer of unknown type.

    >>> fan_in_of(nn.Conv2d(4, 8, 3, groups=2), "weight")
    18
    """
    if "bias" in param_name:
        return None
    if isinstance(module, nn.Linear) and param_name == "weight":
        return _positive(module.in_features)
    if isinstance(module, nn.modules.conv._ConvNd) and param_name == "weight":
        if module.transposed:
            return None  # each output sums over a stride-dependent share of the kernel
        return _positive(module.in_channels // module.groups * math.prod(module.kernel_size))
    if isinstance(module, nn.RNNBase):
        return _rnn_fan_in(module, param_name)
    if isinstance(module, nn.RNNCellBase):
        if param_name == "weight_ih":
            return _positive(module.input_size)
        if param_name == "weight_hh":
            return _positive(module.hidden_size)
        return None
    if type(module).__name__ == "Conv1D" and param_name == "weight":
        return _positive(getattr(module, "nx", None))  # Hugging Face GPT-2: weight is (nx, nf)
    return None


def _rnn_fan_in(module: nn.RNNBase, param_name: str) -> int | None:
    proj = getattr(module, "proj_size", 0) or 0
    hidden_out = proj if proj > 0 else module.hidden_size
    if param_name.startswith("weight_hh"):
        return _positive(hidden_out)
    if param_name.startswith("weight_ih"):
        layer = param_name.removeprefix("weight_ih_l").removesuffix("_reverse")
        if layer == "0":
            return _positive(module.input_size)
        directions = 2 if module.bidirectional else 1
        return _positive(hidden_out * directions)
    return None


def _sequential_feeds(seq: nn.Sequential) -> dict[int, str]:
    """``id(weight layer) -> kind`` of the activation modules that follow weight layers
    in ``seq`` (through pass-through modules)."""
    children = list(seq.children())
    feeds: dict[int, str] = {}
    for i, child in enumerate(children):
        if not _is_weight_layer(child):
            continue
        for after in children[i + 1 :]:
            if isinstance(after, _PASS_THROUGH):
                continue
            kind = _activation_kind(after)
            if kind is not None:
                feeds[id(child)] = kind
            break
    return feeds


def _owned_feeds(module: nn.Module) -> dict[int, str]:
    """``id(weight layer) -> kind`` from a module holding one weight layer and one
    activation (its only clean reading), or a known torch layer pattern."""
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        cell = kind_from_name(module.nonlinearity)
        return {id(module): cell} if cell != "other" else {}
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        kind = _activation_kind(getattr(module, "activation", None))
        return {id(module.linear1): kind} if kind is not None else {}
    children = list(module.children())
    weights = [i for i, child in enumerate(children) if _is_weight_layer(child)]
    if len(weights) != 1:
        return {}
    # An activation module registered before the layer may act on its input (pre-activation).
    acts = [k for k in map(_activation_kind, children[weights[0] + 1 :]) if k is not None]
    if any(_activation_kind(child) for child in children[: weights[0]]):
        return {}
    for attr in _ACTIVATION_ATTRS:
        value = module.__dict__.get(attr)
        if value is not None and not isinstance(value, nn.Module):
            found = _activation_kind(value)
            if found is not None:
                acts.append(found)
    return {id(children[weights[0]]): acts[0]} if len(acts) == 1 else {}


class TorchLayerInfo:
    """The :class:`LayerInfo` of every parameter of ``root``: the facts found at attach,
    with the activations seen on sampled forwards laid over them.

    Args:
        root: the user's module (unwrapped from DDP / torch.compile).

    Example:
        >>> import torch
        >>> lstm = TorchLayerInfo(torch.nn.LSTM(8, 16)).current()["weight_hh_l0"]
        >>> lstm.recurrent, lstm.fan_in, lstm.kind
        (True, 16, 'LSTM')
    """

    def __init__(self, root: nn.Module) -> None:
        self._static = self._infer(root)
        self._seen: dict[str, str] = {}

    def current(self, over: Mapping[str, LayerInfo] | None = None) -> dict[str, LayerInfo]:
        """The info per parameter name, seen activations over inferred ones; the known
        facts of ``over`` (another part of the adapter's word, such as the recurrence
        probe's) win over these. Defaults to ``None``."""
        out = dict(self._static)
        for name, kind in self._seen.items():
            base = out.get(name)
            if base is not None and base.feeds != kind:
                out[name] = LayerInfo(kind, base.fan_in, base.recurrent, base.kind, base.group)
        for name, theirs in (over or {}).items():
            out[name] = merge(theirs, out[name]) if name in out else theirs
        return out

    def see(self, feeds: Mapping[str, str]) -> bool:
        """Lay ``param name -> activation kind`` seen on sampled forwards over the
        inferred facts; returns whether anything changed."""
        fresh = {n: k for n, k in feeds.items() if n in self._static and self._seen.get(n) != k}
        self._seen.update(fresh)
        return bool(fresh)

    @staticmethod
    def _infer(root: nn.Module) -> dict[str, LayerInfo]:
        modules = list(root.named_modules())
        feeds: dict[int, str] = {}
        for _, module in modules:
            feeds.update(_owned_feeds(module))
            if isinstance(module, nn.Sequential):
                feeds.update(_sequential_feeds(module))
        info: dict[str, LayerInfo] = {}
        seen: set[int] = set()
        for raw_prefix, module in modules:
            stack = isinstance(module, (nn.ParameterList, nn.ParameterDict))
            owner = _owner_of(modules, raw_prefix) if stack else module
            for attr, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # shared: named once, where named_parameters() names it
                    continue
                seen.add(id(param))
                name = strip_wrapper_prefixes(f"{raw_prefix}.{attr}" if raw_prefix else attr)
                info[name] = LayerInfo(
                    feeds=feeds.get(id(module)),
                    fan_in=None if stack else fan_in_of(module, attr),
                    recurrent=isinstance(owner, (nn.RNNBase, nn.RNNCellBase)),
                    kind=type(owner).__name__,
                    group=name if stack else None,  # one group per stacked weight
                )
        return info


def _owner_of(modules: list[tuple[str, nn.Module]], prefix: str) -> nn.Module:
    """The module holding the parameter container named ``prefix``."""
    parent = prefix.rpartition(".")[0]
    for name, module in modules:
        if name == parent:
            return module
    return modules[0][1]


__all__ = ["TorchLayerInfo", "fan_in_of"]

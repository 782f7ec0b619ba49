"""What an adapter knows about a parameter's layer that no gradient shows: :class:`LayerInfo`.

Static facts, given once (and refreshed when the model changes) through
:meth:`gradwatch.Analyzer.set_layer_info` / :meth:`gradwatch.monitor.Monitor.set_layer_info`,
keyed by parameter name as in :attr:`StepStats.grad_layers`. Rules read them, merged per
layer group, as :attr:`RuleContext.layer_info`: which activation a layer feeds (the
gradient-zero fallback of ``dead_relu`` blames only ReLU-fed layers), its fan-in (init
scale evidence) and whether it is recurrent.

Example:
    >>> from gradwatch.layer_info import LayerInfo, merge
    >>> merge(LayerInfo(feeds="relu"), LayerInfo(fan_in=64)).fan_in
    64
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.activations import ActivationKind

_KINDS = frozenset(k.value for k in ActivationKind)


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """Facts about one parameter's layer.

    Attributes:
        feeds: the activation kind applied to this layer's output (an
            :class:`~gradwatch.activations.ActivationKind` value such as ``"relu"``), seen
            or inferred from the module type; ``None`` when unknown or when no activation
            follows (e.g. the output layer, an embedding). Defaults to ``None``.
        fan_in: inputs per output unit of the weight (``in_features``, ``in_channels x
            kernel size``), ``None`` for a bias or when unknown. Defaults to ``None``.
        recurrent: the parameter belongs to a recurrent layer (RNN, LSTM, GRU cells).
            Defaults to ``False``.
        kind: the layer's type name as the framework spells it (``"Linear"``,
            ``"Dense"``, ``"LSTM"``), or ``""`` when unknown. Defaults to ``""``.
        group: the layer group this parameter is judged in, overriding the analyzer's
            ``group_by`` (a custom layer holding a stack of weights gives each weight,
            with its bias, a group of its own, so depth inside it is visible);
            ``None`` keeps ``group_by``. Defaults to ``None``.
    """

    feeds: str | None = None
    fan_in: int | None = None
    recurrent: bool = False
    kind: str = ""
    group: str | None = None

    def __post_init__(self) -> None:
        if self.feeds is not None and self.feeds not in _KINDS:
            raise ValueError(
                f"LayerInfo.feeds must be an activation kind, one of {sorted(_KINDS)}; "
                f"got {self.feeds!r}"
            )
        if self.fan_in is not None and (
            isinstance(self.fan_in, bool) or not isinstance(self.fan_in, int) or self.fan_in < 1
        ):
            raise ValueError(f"LayerInfo.fan_in must be a positive integer, got {self.fan_in!r}")


def merge(a: LayerInfo, b: LayerInfo) -> LayerInfo:
    """One layer group's facts from two of its parameters: known values win over
    unknown ones, the first known one over a later one."""
    return LayerInfo(
        feeds=a.feeds if a.feeds is not None else b.feeds,
        fan_in=a.fan_in if a.fan_in is not None else b.fan_in,
        recurrent=a.recurrent or b.recurrent,
        kind=a.kind or b.kind,
        group=a.group if a.group is not None else b.group,
    )


__all__ = ["LayerInfo", "merge"]

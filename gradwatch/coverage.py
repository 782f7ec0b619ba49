"""What was judged: :func:`merge_coverage` builds a report's
:class:`~gradwatch.report.Coverage` from what the model holds (the adapter's word) and
what the analyzer observed.

Example:
    >>> from gradwatch.report import LayerSummary, Report
    >>> seen = LayerSummary("fc1", 5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0, 4)
    >>> held = ModelContents(("fc1.weight", "fc2.weight"), {"act#relu:0": "relu"}, {})
    >>> merge_coverage(held, Report(layers=(seen,)), lambda n: n.rsplit(".", 1)[0])
    ... # doctest: +ELLIPSIS
    Coverage(parameters_trainable=2, parameters_observed=1, layers_not_observed=('fc2',), ...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gradwatch.report import Coverage, Report


@dataclass(frozen=True)
class ModelContents:
    """What the model holds, as the adapter saw it.

    Attributes:
        parameters: names of the trainable parameters.
        activation_sites: the activation sites observed so far, name -> kind.
        activation_modules: the activation-like modules, name -> kind (``"other"`` for
            a class gradwatch does not know).
    """

    parameters: tuple[str, ...]
    activation_sites: dict[str, str] = field(default_factory=dict)
    activation_modules: dict[str, str] = field(default_factory=dict)


def merge_coverage(held: ModelContents, report: Report, group_by: Callable[[str], str]) -> Coverage:
    """The coverage of ``report``: parameters observed vs trainable, activation sites by
    kind, and the activation modules never observed."""
    observed = {ls.name for ls in report.layers if ls.steps > 0}
    groups = [group_by(name) for name in held.parameters]
    missing = tuple(dict.fromkeys(g for g in groups if g not in observed))
    by_kind: dict[str, int] = {}
    for kind in held.activation_sites.values():
        by_kind[kind] = by_kind.get(kind, 0) + 1
    seen = {name.split("#", 1)[0] for name in held.activation_sites}
    modules = held.activation_modules
    return Coverage(
        parameters_trainable=len(held.parameters),
        parameters_observed=sum(g in observed for g in groups),
        layers_not_observed=missing,
        activation_sites=dict(sorted(by_kind.items())),
        activation_modules=len(modules),
        activation_modules_not_observed=tuple(n for n in modules if n not in seen),
    )


__all__ = ["ModelContents", "merge_coverage"]

"""A :class:`Finding`: one diagnosed pathology, its evidence and its ranked fixes."""

from __future__ import annotations

from dataclasses import dataclass, field

from gradwatch.fixes import Fix

SEVERITIES = ("info", "warning", "error")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


@dataclass(frozen=True, slots=True)
class Finding:
    """What a rule concluded about a run.

    Attributes:
        rule: stable rule id, e.g. ``"vanishing_gradient"``.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        layers: the layer (module) names involved, first layer to last.
        first_step, last_step: the steps over which the pathology was seen.
        message: one sentence a person understands.
        evidence: the numbers behind the verdict.
        fixes: what to change, best first.

    Example:
        >>> Finding("dead_relu", "warning", ("fc1",), 10, 90, "Most units are dead.",
        ...         {"dead_fraction": 0.8}).severity
        'warning'
    """

    rule: str
    severity: str
    layers: tuple[str, ...]
    first_step: int
    last_step: int
    message: str
    evidence: dict[str, float] = field(default_factory=dict)
    fixes: tuple[Fix, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_RANK:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

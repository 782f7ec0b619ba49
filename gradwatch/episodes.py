"""Persistence and hysteresis: how a rule's symptoms become one :class:`Finding`.

A symptom must hold at every check for the rule's ``persistence`` steps before a
finding opens; once open (active), the rule judges with its looser hysteresis
threshold, and the finding grows (its layers, its last step, its worst evidence) for
as long as the symptom holds. One finding per rule and run.

Example:
    >>> from gradwatch.rules import Symptom, VanishingGradient
    >>> ep = Episode()
    >>> s = Symptom(("fc0",), "warning", "tiny", {}, ())
    >>> [ep.track(VanishingGradient(persistence=2), step, s) is not None for step in (10, 11)]
    [False, True]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gradwatch.findings import SEVERITY_RANK, Finding
from gradwatch.rules import Rule, Symptom


@dataclass
class Episode:
    """One rule's bookkeeping, and its finding so far."""

    streak: int = 0
    streak_start: int = 0
    active: bool = False
    finding: Finding | None = None
    layers: dict[str, None] = field(default_factory=dict)
    worst: Symptom | None = None  # the finding reports the evidence of its worst check

    def track(self, rule: Rule, step: int, symptom: Symptom | None) -> Finding | None:
        """Count one check; returns the finding when this check opened it."""
        if symptom is None:
            self.streak = 0
            self.active = False
            return None
        if self.streak == 0:
            self.streak_start = step if symptom.since is None else min(step, symptom.since)
        self.streak += 1
        if not self.active and step - self.streak_start + 1 < rule.persistence:
            return None
        newly_opened = self.finding is None
        self.active = True
        for layer in symptom.layers:
            self.layers[layer] = None
        old = self.finding
        severity = symptom.severity
        if old is not None and SEVERITY_RANK[old.severity] > SEVERITY_RANK[severity]:
            severity = old.severity
        # Ties keep the earlier check: its window still shows how the episode began.
        if self.worst is None or symptom.score > self.worst.score:
            self.worst = symptom
        worst = self.worst
        self.finding = Finding(
            rule=rule.id,
            severity=severity,
            layers=tuple(self.layers),
            first_step=self.streak_start if old is None else old.first_step,
            last_step=step,
            message=worst.message,
            evidence=dict(worst.evidence),
            fixes=worst.fixes,
        )
        return self.finding if newly_opened else None


__all__ = ["Episode"]

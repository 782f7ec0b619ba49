"""The rules gradwatch applies, and :data:`DEFAULT_RULES`.

Extend or replace the tuple to change what is checked::

    import gradwatch
    from gradwatch.rules import DEFAULT_RULES, VanishingGradient

    rules = tuple(r for r in DEFAULT_RULES if r.id != "vanishing_gradient")
    analyzer = gradwatch.Analyzer(rules=rules + (VanishingGradient(ratio_threshold=1e-4),))
"""

from __future__ import annotations

from gradwatch.rules.base import Rule, RuleContext, Symptom
from gradwatch.rules.dead_relu import DeadRelu
from gradwatch.rules.exploding import ExplodingGradient
from gradwatch.rules.nonfinite import NonfiniteGradient
from gradwatch.rules.saturation import Saturation
from gradwatch.rules.vanishing import VanishingGradient
from gradwatch.rules.zero_gradient import ZeroGradient

DEFAULT_RULES: tuple[Rule, ...] = (
    NonfiniteGradient(),
    ZeroGradient(),
    ExplodingGradient(),
    VanishingGradient(),
    DeadRelu(),
    Saturation(),
)

RULE_IDS: tuple[str, ...] = tuple(rule.id for rule in DEFAULT_RULES)

__all__ = [
    "DEFAULT_RULES",
    "RULE_IDS",
    "DeadRelu",
    "ExplodingGradient",
    "NonfiniteGradient",
    "Rule",
    "RuleContext",
    "Saturation",
    "Symptom",
    "VanishingGradient",
    "ZeroGradient",
]

"""The fast subset of the scenario zoo (benchmarks/scenarios): every faulty run is
found by its rules within 50 steps of its onset, no healthy run raises a warning.

The full zoo and its table: ``python benchmarks/detect.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.detect import DETECT_WITHIN, run_torch  # noqa: E402
from benchmarks.scenarios import Scenario, torch_scenarios  # noqa: E402
from benchmarks.scenarios.expected_fixes import expert_set  # noqa: E402

FAST = [s for s in torch_scenarios() if s.fast]
# Misses we know and report in docs/benchmarks.md: the lr spike's gradient burst lasts
# steps 61-69, between the default schedule's samples at 60 and 70.
KNOWN_MISSES = {("dead_relu_lr_spike", "exploding_gradient")}
# First fixes we know are wrong, reported in docs/rules.md: none (the exp scenario's
# forward-pass overflow is told apart by the activations' NaN/Inf counts, issue #14).
KNOWN_WRONG_FIRST: set[tuple[str, str]] = set()


def test_zoo_covers_every_rule_with_two_causes_and_healthy_traps() -> None:
    from gradwatch.rules import RULE_IDS

    scenarios = torch_scenarios()
    assert len(scenarios) >= 20
    for rule in RULE_IDS:
        assert sum(rule in s.expected_rules for s in scenarios) >= 2, rule
    assert sum(s.healthy for s in scenarios) >= 8


@pytest.mark.parametrize("scn", FAST, ids=[s.name for s in FAST])
def test_scenario_detection(scn: Scenario) -> None:
    result = run_torch(scn)
    found = set(result["found"])
    if scn.healthy:
        assert not found, result
        return
    expected = {r for r in scn.expected_rules if (scn.name, r) not in KNOWN_MISSES}
    assert expected <= found, result
    assert found <= scn.expected_rules, f"extra findings: {found - scn.expected_rules}"
    for rule in expected:
        assert result["first_step"][rule] < DETECT_WITHIN, (rule, result["first_step"])
    _assert_right_first_fix(scn, result, KNOWN_WRONG_FIRST)


def _assert_right_first_fix(scn: Scenario, result: dict, known_wrong: set) -> None:
    """Every found expected rule with an expert set ranks a fix of that set first."""
    for rule in sorted(scn.expected_rules & set(result["found"])):
        expert = expert_set(scn.framework, scn.name, rule)
        if expert is None or (scn.name, rule) in known_wrong:
            continue
        assert result["top_fix"][rule] in expert, (rule, result["top_fix"][rule], expert)


def test_every_faulty_fast_scenario_has_an_expert_set() -> None:
    missing = [
        (s.name, r)
        for s in FAST
        for r in s.expected_rules
        if expert_set("torch", s.name, r) is None
    ]
    assert not missing

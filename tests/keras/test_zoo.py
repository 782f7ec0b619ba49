"""The fast subset of the Keras scenario zoo (benchmarks/scenarios/keras_zoo.py):
faulty runs are found by their rules, healthy runs raise no warning.

The full zoo and its table: ``python benchmarks/detect.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("sklearn")

# The zoo's Keras labels were verified with tf.GradientTape (benchmarks/verify_labels.py);
# on the torch backend the hand-written BCE does not reach NaN, so its label would not hold.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="Keras zoo labels are verified on the TensorFlow backend",
)

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.detect import DETECT_WITHIN, run_keras  # noqa: E402
from benchmarks.scenarios import Scenario, keras_scenarios  # noqa: E402
from benchmarks.scenarios.expected_fixes import expert_set  # noqa: E402

FAST = [s for s in keras_scenarios() if s.fast]
# First fixes we know are wrong, reported in docs/rules.md: none (the exp scenario's
# forward-pass overflow is told apart by the activations' NaN/Inf counts, issue #14).
KNOWN_WRONG_FIRST: set[tuple[str, str]] = set()


def test_keras_zoo_has_ten_scenarios_with_healthy_traps() -> None:
    scenarios = keras_scenarios()
    assert len(scenarios) >= 10
    assert sum(s.healthy for s in scenarios) >= 5


@pytest.mark.parametrize("scn", FAST, ids=[s.name for s in FAST])
def test_keras_scenario_detection(scn: Scenario) -> None:
    result = run_keras(scn)
    found = set(result["found"])
    if scn.healthy:
        assert not found, result
        return
    assert scn.expected_rules <= found, result
    assert found <= scn.expected_rules, f"extra findings: {found - scn.expected_rules}"
    for rule in scn.expected_rules:
        assert result["first_step"][rule] < DETECT_WITHIN, (rule, result["first_step"])
    # Every found expected rule with an expert set ranks a fix of that set first.
    for rule in sorted(scn.expected_rules):
        expert = expert_set("keras", scn.name, rule)
        if expert is not None and (scn.name, rule) not in KNOWN_WRONG_FIRST:
            assert result["top_fix"][rule] in expert, (rule, result["top_fix"][rule], expert)

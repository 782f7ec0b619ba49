"""Analyzer behaviour: grouping, persistence, on_finding, guard, bounded memory."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from synth import grad_step, noisy, rule_ids, run

from gradwatch import Analyzer, FindingError, GradwatchWarning, StepStats, module_of
from gradwatch.rules import Rule, RuleContext, Symptom


def test_module_of_groups_parameters_by_module_path():
    assert module_of("encoder.layers.3.linear1.weight") == "encoder.layers.3.linear1"
    assert module_of("dense_3/kernel") == "dense_3"
    assert module_of("w") == "w"


def test_parameters_of_one_module_combine_into_one_group_norm():
    an = Analyzer(strict=True)
    s = grad_step(0, [3.0, 4.0, 1.0], names=["fc1.weight", "fc1.bias", "fc2.weight"])
    an.observe_stats(s)
    layers = {ls.name: ls for ls in an.report().layers}
    assert list(layers) == ["fc1", "fc2"]
    assert layers["fc1"].typical_norm == pytest.approx(5.0)  # sqrt(3^2 + 4^2)
    assert layers["fc1"].numel == 2048


def test_observe_accepts_raw_arrays_and_matches_hand_computed_stats():
    an = Analyzer(strict=True)
    an.observe(0, grads={"a.weight": np.array([[3.0, 0.0], [0.0, -4.0]])})
    (layer,) = an.report().layers
    assert layer.typical_norm == pytest.approx(5.0)
    assert layer.max_abs == pytest.approx(4.0)
    assert layer.zero_frac == pytest.approx(0.5)


def test_layers_unfrozen_mid_run_take_their_place_in_model_order():
    an = Analyzer(strict=True)
    for step in range(5):
        an.observe_stats(grad_step(step, [1.0, 1.0], names=["fc1.weight", "fc2.weight"]))
    for step in range(5, 10):
        names = ["fc0.weight", "fc1.weight", "fc2.weight"]
        an.observe_stats(grad_step(step, [1.0, 1.0, 1.0], names=names))
    assert [ls.name for ls in an.report().layers] == ["fc0", "fc1", "fc2"]
    assert an.report().layers[0].steps == 5


def test_on_finding_fires_once_per_finding():
    seen = []
    an = Analyzer(on_finding=seen.append, strict=True)
    run(100, lambda s, r: grad_step(s, [1e-7, 1.0]), analyzer=an)
    assert [f.rule for f in seen] == ["vanishing_gradient"]


def test_finding_error_from_on_finding_is_never_swallowed():
    def stop(finding):
        raise FindingError(finding)

    an = Analyzer(on_finding=stop)  # not strict: internal errors would be swallowed
    with pytest.raises(FindingError):
        run(100, lambda s, r: grad_step(s, [1e-7, 1.0]), analyzer=an)


def test_an_exception_from_a_user_callback_propagates_and_monitoring_stays_on():
    def boom(finding):
        raise KeyError("user code")

    an = Analyzer(on_finding=boom)
    with pytest.raises(KeyError):
        run(100, lambda s, r: grad_step(s, [1e-7, 1.0]), analyzer=an)
    assert an.enabled


def test_check_every_still_catches_a_nan_between_checks_at_its_real_step():
    an = Analyzer(check_every=7, strict=True)

    def make(step: int, rng: np.random.Generator):
        return grad_step(step, [0.5, 1.0], nonfinite=[0, 1] if step == 23 else 0)

    run(40, make, analyzer=an)
    f = an.report().by_rule("nonfinite_gradient")
    assert f is not None and f.first_step == 23


def test_check_every_counts_persistence_in_steps():
    # Vanishing from step 0: warm-up 10 steps plus persistence 10 steps, checked every
    # 5 steps, opens at the first check at or after step 19.
    an = Analyzer(check_every=5, strict=True)
    run(60, lambda s, r: grad_step(s, [1e-7, 1.0]), analyzer=an)
    f = an.report().by_rule("vanishing_gradient")
    assert f is not None and f.first_step <= 15


class _Broken(Rule):
    id = "broken"

    def check(self, ctx: RuleContext) -> Symptom | None:
        raise ZeroDivisionError("rule bug")


def test_an_internal_error_warns_once_and_switches_monitoring_off():
    an = Analyzer(rules=[_Broken(warmup_steps=0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(20):
            an.observe_stats(grad_step(step, [1.0]))
    ours = [w for w in caught if issubclass(w.category, GradwatchWarning)]
    assert len(ours) == 1 and "ZeroDivisionError" in str(ours[0].message)
    assert not an.enabled
    assert an.report().steps_observed == 1
    assert any("internal error" in note for note in an.report().notes)


def test_strict_re_raises_internal_errors():
    an = Analyzer(rules=[_Broken(warmup_steps=0)], strict=True)
    with pytest.raises(ZeroDivisionError):
        an.observe_stats(grad_step(0, [1.0]))


def test_mismatched_stats_are_rejected_at_construction():
    with pytest.raises(ValueError, match="grad_norm"):
        StepStats(step=0, grad_layers=("a",), grad_norm=())
    with pytest.raises(ValueError, match="unknown kind"):
        StepStats(
            step=0,
            act_layers=("a",),
            act_kinds=("wobbly",),
            act_inactive_frac=(0.0,),
            act_dead_frac=(0.0,),
            act_tail_frac=(0.0,),
            act_is_output=(False,),
        )


def test_memory_is_bounded_by_window_bins_and_layers_not_steps():
    # 500 layers: what a 1,000,000-step run holds is what a 2,000-step run holds,
    # because every buffer is a fixed ring or a fixed number of merged bins.
    an = Analyzer(check_every=50)
    rng = np.random.default_rng(0)
    norms = list(rng.uniform(0.1, 1.0, 500))
    sizes = []
    for step in range(2000):
        an.observe_stats(grad_step(step, norms))
        if step in (999, 1999):
            sizes.append(an.nbytes())
    assert sizes[0] == sizes[1]
    assert sizes[1] < 30 * 2**20  # "a few tens of MB" for 500 layers
    assert len(an.report().flow.bin_steps) <= 128


def test_findings_sort_most_severe_first():
    def make(step: int, rng: np.random.Generator):
        return grad_step(step, noisy([1e-8, 1.0], rng), nonfinite=[0, 1] if step == 40 else 0)

    an = run(60, make)
    assert [f.severity for f in an.findings] == ["error", "warning"]
    assert rule_ids(an) == {"nonfinite_gradient", "vanishing_gradient"}

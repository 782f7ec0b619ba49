"""Each rule on hand-built statistics: a positive, a negative and a borderline case."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from synth import decaying, grad_step, noisy, rule_ids, run

from gradwatch import Analyzer, StepStats
from gradwatch.layer_info import LayerInfo
from gradwatch.rules import DeadRelu, ExplodingGradient, Saturation, VanishingGradient

SIGMOID_ACTS = {f"act{i}": ("sigmoid", 0.0, 0.0, 0.05) for i in range(9)}
RELU_ACTS = {f"act{i}": ("relu", 0.5, 0.2, 0.0) for i in range(9)}


def healthy(step: int, rng: np.random.Generator):
    return grad_step(step, noisy([0.5, 0.8, 1.0, 0.7, 0.9, 1.2, 0.6, 0.4, 0.3, 1.0], rng))


# --- vanishing_gradient -------------------------------------------------------------


def test_vanishing_deep_sigmoid_stack_names_first_layers_and_ranks_activation_fixes():
    # The acceptance case: norms shrinking x0.25 per layer through a sigmoid stack.
    an = run(60, lambda s, rng: grad_step(s, noisy(decaying(10, 0.25), rng), acts=SIGMOID_ACTS))
    f = an.report().by_rule("vanishing_gradient")
    assert f is not None and f.severity == "warning"
    assert f.layers[0] == "fc0" and "fc9" not in f.layers
    assert {"he_init", "leaky_relu"} & {fx.id for fx in f.fixes[:2]}
    assert f.evidence["first_last_norm_ratio"] == pytest.approx(0.25**9, rel=0.5)
    assert f.evidence["per_layer_decay"] == pytest.approx(0.25, rel=0.1)


def test_steady_decay_through_a_deep_stack_is_vanishing_without_an_extreme_ratio():
    # x0.6 per layer over 10 layers: first/last = 1e-2, above AUTOTRAINER's 1e-3, but a
    # steady geometric shrink through the depth (a deep sigmoid net with N(0,1) init).
    an = run(60, lambda s, rng: grad_step(s, noisy(decaying(10, 0.6), rng, 0.1)))
    f = an.report().by_rule("vanishing_gradient")
    assert f is not None and f.layers[0] == "fc0"
    assert f.evidence["per_layer_decay"] == pytest.approx(0.6, rel=0.1)


@pytest.mark.parametrize(("depth", "factor"), [(10, 0.8), (5, 0.5)])
def test_mild_decay_or_shallow_nets_stay_quiet(depth, factor):
    an = run(60, lambda s, rng: grad_step(s, noisy(decaying(depth, factor), rng, 0.1)))
    assert "vanishing_gradient" not in rule_ids(an, "info")


def test_vanishing_in_relu_net_recommends_normalisation_or_residuals_first():
    an = run(60, lambda s, rng: grad_step(s, noisy(decaying(10, 0.25), rng), acts=RELU_ACTS))
    f = an.report().by_rule("vanishing_gradient")
    assert f is not None
    assert f.fixes[0].id in {"batch_norm", "residual"}


def test_healthy_norms_raise_nothing():
    an = run(300, healthy)
    assert rule_ids(an, "info") == set()
    assert an.report().healthy


def test_vanishing_borderline_on_the_ratio_threshold():
    # First/last = 2e-3 (just above AUTOTRAINER's 1e-3) must stay quiet even with a
    # tiny first-layer norm; 5e-4 must fire.
    def at(ratio: float):
        return lambda s, rng: grad_step(s, [1e-5, 1e-3, 1e-5 / ratio])

    assert "vanishing_gradient" not in rule_ids(run(60, at(2e-3)))
    assert "vanishing_gradient" in rule_ids(run(60, at(5e-4)))


def test_vanishing_needs_a_small_absolute_norm_unless_the_ratio_is_extreme():
    # Ratio 1e-4 but first-layer norm 0.01: AUTOTRAINER's absolute floor keeps it quiet.
    assert "vanishing_gradient" not in rule_ids(run(60, lambda s, r: grad_step(s, [0.01, 100.0])))
    # Ratio 1e-6 fires whatever the scale (loss reduction changes absolute norms).
    assert "vanishing_gradient" in rule_ids(run(60, lambda s, r: grad_step(s, [0.01, 1e4])))


def test_tiny_gradients_everywhere_are_convergence_not_vanishing():
    an = run(100, lambda s, rng: grad_step(s, noisy([1e-9] * 6, rng)))
    assert "vanishing_gradient" not in rule_ids(an)


def test_frozen_first_layers_are_never_vanishing():
    # fc0 and fc1 frozen (no gradient at all): the live first layer is fc2, healthy.
    names = ["fc2.weight", "fc3.weight", "fc4.weight"]
    an = run(100, lambda s, rng: grad_step(s, noisy([0.5, 0.7, 1.0], rng), names=names))
    assert "vanishing_gradient" not in rule_ids(an, "info")


def test_dead_first_layer_is_left_to_dead_relu_not_vanishing():
    zero = [0.95, 0.0, 0.0]
    an = run(60, lambda s, r: grad_step(s, [1e-9, 0.5, 1.0], zero_frac=zero))
    assert "vanishing_gradient" not in rule_ids(an, "info")


def test_one_noisy_dip_does_not_fire_persistence():
    def dip(step: int, rng: np.random.Generator):
        norms = [1e-7, 1.0] if step == 30 else [0.5, 1.0]
        return grad_step(step, norms)

    assert rule_ids(run(100, dip), "info") == set()


def test_vanishing_hysteresis_keeps_the_finding_active_near_the_threshold():
    # Fires at ratio 1e-4, then hovers at 1.5e-3: above the turn-on threshold but
    # inside the hysteresis band, so the episode continues to the end.
    def make(step: int, rng: np.random.Generator):
        ratio = 1e-4 if step < 60 else 1.5e-3
        return grad_step(step, [5e-5, 5e-5 / ratio])

    f = run(150, make).report().by_rule("vanishing_gradient")
    assert f is not None and f.last_step == 149
    plain = run(150, lambda s, r: grad_step(s, [5e-5, 5e-5 / 1.5e-3]))
    assert "vanishing_gradient" not in rule_ids(plain)


# --- exploding_gradient ---------------------------------------------------------------


def test_exploding_across_layers_puts_initialisation_first():
    an = run(60, lambda s, rng: grad_step(s, noisy(decaying(6, 4.0), rng)))
    f = an.report().by_rule("exploding_gradient")
    assert f is not None
    assert f.evidence["first_last_norm_ratio"] > 70
    assert f.fixes[0].id == "he_init"
    assert "gradient_clipping" in [x.id for x in f.fixes]


def test_exploding_across_steps_suggests_clipping_calibrated_on_healthy_norms():
    def make(step: int, rng: np.random.Generator):
        scale = 1.0 if step < 60 else 1.5 ** (step - 60)
        return grad_step(step, noisy([0.3 * scale, 0.4 * scale, 0.5 * scale], rng, 0.1))

    f = run(90, make).report().by_rule("exploding_gradient")
    assert f is not None and f.first_step > 60
    assert f.fixes[0].id == "gradient_clipping"
    healthy_total = math.sqrt(0.3**2 + 0.4**2 + 0.5**2)
    assert f.evidence["suggested_max_norm"] == pytest.approx(2 * healthy_total, rel=0.2)
    assert f"{f.evidence['suggested_max_norm']:.3g}" in f.fixes[0].text


def test_explosion_inside_the_warm_up_is_caught_against_the_initial_norm():
    # Norms jump 1e5x at step 4 and stay there: no healthy window exists after warm-up.
    def make(step: int, rng: np.random.Generator):
        scale = 1.0 if step < 4 else 1e5
        return grad_step(step, noisy([0.5 * scale, 1.0 * scale], rng, 0.1))

    f = run(60, make).report().by_rule("exploding_gradient")
    assert f is not None and f.fixes[0].id == "gradient_clipping"
    assert f.evidence["suggested_max_norm"] == pytest.approx(2 * np.hypot(0.5, 1.0), rel=0.2)


def _sized_step(step: int, grad: float, weight: float):
    # Flat norms across layers and steps: only the size relative to the weights tells.
    return replace(grad_step(step, [grad] * 4), param_norm=(weight,) * 4)


def test_gradients_huge_relative_to_the_weights_are_exploding():
    f = run(60, lambda s, r: _sized_step(s, 1e5, 32.0)).report().by_rule("exploding_gradient")
    assert f is not None
    assert f.evidence["grad_to_weight_ratio"] == pytest.approx(1e5 / 32)
    assert f.fixes[0].id == "he_init"


def test_gradient_to_weight_borderline():
    assert "exploding_gradient" not in rule_ids(run(60, lambda s, r: _sized_step(s, 90.0, 1.0)))
    assert "exploding_gradient" in rule_ids(run(60, lambda s, r: _sized_step(s, 110.0, 1.0)))


def test_one_zero_initialised_layer_is_not_a_size_explosion():
    def make(step: int, rng: np.random.Generator):
        return replace(grad_step(step, [0.5, 0.5, 0.5, 0.5]), param_norm=(5.0, 5.0, 5.0, 0.0))

    assert "exploding_gradient" not in rule_ids(run(60, make), "info")


def test_exploding_borderline_layer_ratio():
    assert "exploding_gradient" not in rule_ids(run(60, lambda s, r: grad_step(s, [60.0, 1.0])))
    assert "exploding_gradient" in rule_ids(run(60, lambda s, r: grad_step(s, [80.0, 1.0])))


def test_slow_norm_growth_of_normal_training_is_not_exploding():
    # Norms that triple over 300 steps (a loss landscape sharpening) are normal.
    def make(step: int, rng: np.random.Generator):
        return grad_step(step, noisy([0.5 * 3 ** (step / 300), 1.0], rng))

    assert "exploding_gradient" not in rule_ids(run(300, make), "info")


# --- nonfinite_gradient ---------------------------------------------------------------


def test_nan_gradient_is_an_error_at_once_naming_the_layer():
    def make(step: int, rng: np.random.Generator):
        return grad_step(step, [0.5, 1.0], nonfinite=[0, 3] if step == 25 else 0)

    f = run(40, make).report().by_rule("nonfinite_gradient")
    assert f is not None and f.severity == "error"
    assert f.first_step == 25 and f.layers == ("fc1",)
    assert f.fixes[0].id == "stable_loss"  # no growth before: the loss produced the NaN


def test_nan_after_growth_ranks_clipping_first():
    def make(step: int, rng: np.random.Generator):
        scale = 1.0 if step < 30 else 3.0 ** (step - 30)
        return grad_step(step, [0.5 * scale, scale], nonfinite=[5, 5] if step == 38 else 0)

    f = run(40, make).report().by_rule("nonfinite_gradient")
    assert f is not None and f.fixes[0].id == "gradient_clipping"


def _sampled_every_5(step: int, total: float, norms=(0.5, 1.0)):
    """Per-layer stats on every 5th step, only the total norm on the others."""
    if step % 5 == 0:
        return grad_step(step, list(norms))
    return StepStats(step=step, grad_total_norm=total)


def test_nan_total_norm_between_samples_is_caught_at_its_step():
    def make(step: int, rng: np.random.Generator):
        return _sampled_every_5(step, math.nan if step == 33 else 1.1)

    f = run(50, make).report().by_rule("nonfinite_gradient")
    assert f is not None and f.first_step == 33 and f.severity == "error"


def test_a_spike_between_samples_is_caught_from_total_norms():
    def make(step: int, rng: np.random.Generator):
        return _sampled_every_5(step, 2000.0 if step == 41 else float(np.exp(rng.normal(0, 0.1))))

    f = run(80, make).report().by_rule("exploding_gradient")
    assert f is not None and f.evidence["norm_spike"] > 100


def test_gradscaler_calibration_skips_are_not_a_finding():
    # GradScaler halves its scale on the first few overflowing steps: normal.
    def make(step: int, rng: np.random.Generator):
        if step < 5:
            return grad_step(step, [], skipped=True)
        return grad_step(step, noisy([0.5, 1.0], rng))

    assert rule_ids(run(80, make), "info") == set()


def test_sustained_skipped_steps_are_an_error():
    def make(step: int, rng: np.random.Generator):
        if step >= 20 and step % 4 != 0:
            return grad_step(step, [], skipped=True)
        return grad_step(step, [0.5, 1.0])

    f = run(60, make).report().by_rule("nonfinite_gradient")
    assert f is not None and f.severity == "error"
    assert f.evidence["skipped_step_rate"] > 0.5


# --- dead_relu ------------------------------------------------------------------------


def _relu_run(dead: float, steps: int = 60, output_dead: float = 0.0, **kw):
    acts = {
        "act0": ("relu", dead, dead, 0.0),
        "act1": ("relu", 0.3, 0.1, 0.0),
        "out": ("relu", output_dead, output_dead, 0.0),
    }
    return run(steps, lambda s, r: grad_step(s, [0.5, 1.0], acts=acts, output="out", **kw))


def test_dead_relu_fires_on_a_mostly_dead_layer():
    f = _relu_run(0.8).report().by_rule("dead_relu")
    assert f is not None and f.layers == ("act0",)
    assert f.fixes[0].id == "leaky_relu"
    assert f.evidence["dead_unit_fraction"] == pytest.approx(0.8)


def test_normal_relu_sparsity_is_quiet():
    assert "dead_relu" not in rule_ids(_relu_run(0.3), "info")


def test_dead_relu_borderline():
    assert "dead_relu" not in rule_ids(_relu_run(0.5))  # SageMaker: more than 50%
    assert "dead_relu" in rule_ids(_relu_run(0.55))


def test_output_relu_is_not_judged():
    assert "dead_relu" not in rule_ids(_relu_run(0.2, output_dead=0.95), "info")


def test_fully_dead_layer_is_an_error():
    f = _relu_run(1.0).report().by_rule("dead_relu")
    assert f is not None and f.severity == "error"


def test_dead_relu_falls_back_to_zero_gradients_of_relu_fed_layers():
    relu_fed = Analyzer(strict=True)
    relu_fed.set_layer_info({"fc0.weight": LayerInfo(feeds="relu")})
    an = run(60, lambda s, r: grad_step(s, [0.5, 1.0], zero_frac=[0.9, 0.1]), relu_fed)
    f = an.report().by_rule("dead_relu")
    assert f is not None and f.layers == ("fc0",)


def test_dead_relu_fallback_blames_no_layer_without_a_relu_after_it():
    an = run(60, lambda s, r: grad_step(s, [0.5, 1.0], zero_frac=[0.9, 0.1]))
    assert an.report().by_rule("dead_relu") is None


def test_zero_gradient_fallback_is_off_when_activations_are_observed():
    acts = {"act0": ("leaky_relu", 0.5, 0.0, 0.0)}
    an = run(60, lambda s, r: grad_step(s, [0.5, 1.0], zero_frac=[0.9, 0.1], acts=acts))
    assert "dead_relu" not in rule_ids(an, "info")


# --- saturation -----------------------------------------------------------------------


def _sat_run(tails: list[float], kind: str = "sigmoid", output_tail: float = 0.0):
    acts = {f"act{i}": (kind, 0.0, 0.0, t) for i, t in enumerate(tails)}
    acts["out"] = ("sigmoid", 0.0, 0.0, output_tail)
    return run(60, lambda s, r: grad_step(s, [0.5, 1.0], acts=acts, output="out"))


def test_saturation_fires_on_hidden_layers_in_their_tails():
    f = _sat_run([0.7, 0.8, 0.9], kind="tanh").report().by_rule("saturation")
    assert f is not None and f.layers == ("act0", "act1", "act2")
    assert f.fixes[0].id == "xavier_init"


def test_confident_sigmoid_output_is_not_saturation():
    assert "saturation" not in rule_ids(_sat_run([0.05, 0.05], output_tail=0.99), "info")


def test_saturation_borderline():
    assert "saturation" not in rule_ids(_sat_run([0.5, 0.1]))
    assert "saturation" in rule_ids(_sat_run([0.55, 0.1]))


def test_saturation_only_at_the_input_layer_points_at_the_inputs():
    f = _sat_run([0.95, 0.05, 0.05]).report().by_rule("saturation")
    assert f is not None and f.fixes[0].id == "normalize_inputs"


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "parameter"),
    [
        (lambda: VanishingGradient(ratio_threshold=-1.0), "ratio_threshold"),
        (lambda: ExplodingGradient(growth_factor=math.nan), "growth_factor"),
        (lambda: DeadRelu(window=0), "window"),
        (lambda: Saturation(persistence=0), "persistence"),
        (lambda: Analyzer(window=0), "window"),
        (lambda: Analyzer(rules=["vanishing_gradient", "no_such_rule"]), "no_such_rule"),
        (lambda: Analyzer(rules=[VanishingGradient(), VanishingGradient()]), "duplicate"),
        (lambda: Analyzer(window=10), r"window=10 is smaller than \w+\.window"),
    ],
)
def test_bad_configuration_is_a_value_error_naming_the_parameter(factory, parameter):
    with pytest.raises(ValueError, match=parameter):
        factory()


def test_rules_can_be_selected_by_id_and_replaced():
    an = Analyzer(rules=["dead_relu", VanishingGradient(ratio_threshold=1e-2)], strict=True)
    assert [r.id for r in an.rules] == ["dead_relu", "vanishing_gradient"]
    run(60, lambda s, r: grad_step(s, [5e-5, 1e-2]), analyzer=an)  # ratio 5e-3
    assert rule_ids(an) == {"vanishing_gradient"}


# --- zero_gradient ----------------------------------------------------------------------


def test_zero_gradient_fires_when_every_gradient_is_exactly_zero():
    an = run(60, lambda s, r: grad_step(s, [0.0, 0.0, 0.0], zero_frac=1.0))
    f = an.report().by_rule("zero_gradient")
    assert f is not None and f.severity == "error"
    assert f.fixes[0].id == "connected_graph"  # zero from the first step: a cut graph
    assert rule_ids(an, "info") == {"zero_gradient"}  # not dead_relu, not vanishing


def test_zero_gradient_is_quiet_when_one_layer_still_moves():
    an = run(60, lambda s, r: grad_step(s, [0.0, 0.0, 1e-12], zero_frac=[1.0, 1.0, 0.99]))
    assert "zero_gradient" not in rule_ids(an, "info")


def test_zero_gradient_borderline_persistence():
    def make(onset):
        return lambda s, r: grad_step(s, [0.5, 1.0] if s < onset else [0.0, 0.0])

    # Zeros from step 45 of 60: 15 steps, past warm-up and persistence (10): fires.
    assert "zero_gradient" in rule_ids(run(60, make(45)))
    # From step 55: 5 steps of zeros, under the persistence: no finding yet.
    assert "zero_gradient" not in rule_ids(run(60, make(55)), "info")


def test_zero_gradient_mid_run_points_at_a_dead_output_first():
    acts = {"out": ("relu", 1.0, 1.0, 0.0)}

    def make(s, r):
        norms = [0.5, 1.0] if s < 30 else [0.0, 0.0]
        return grad_step(s, norms, acts=acts if s >= 30 else None, output="out")

    f = run(80, make).report().by_rule("zero_gradient")
    assert f is not None and f.fixes[0].id == "output_activation"
    assert f.evidence["zero_since_first_step"] == 0.0


def test_zero_gradient_counts_total_norm_only_steps():
    # Per-layer statistics every 10th step, the fused total norm in between.
    def make(s, r):
        if s % 10 == 0:
            return grad_step(s, [0.0, 0.0], zero_frac=1.0)
        return StepStats(step=s, grad_total_norm=0.0)

    assert "zero_gradient" in rule_ids(run(60, make))

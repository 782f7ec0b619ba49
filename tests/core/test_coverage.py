"""Coverage in the report, the input-judged kinds, and fixes that assume only what was seen."""

from __future__ import annotations

import math

import numpy as np
import pytest
from synth import decaying, grad_step, noisy, run

import gradwatch
from gradwatch.activations import (
    DYING_KINDS,
    JUDGED_ON_INPUT,
    SATURATING_KINDS,
    activation_stats_from_input,
    input_tail_bound,
    kind_from_name,
)
from gradwatch.layer_info import LayerInfo
from gradwatch.monitor import Monitor
from gradwatch.render import coverage_line
from gradwatch.report import Coverage, Report


def _monitored(params: list[str], sites: dict[str, str], modules: dict[str, str]) -> Report:
    m = Monitor(where="test", show=False, strict=True)
    rng = np.random.default_rng(0)
    m.observe([grad_step(s, noisy([0.3, 0.4], rng, 0.1)) for s in range(30)])
    m.set_coverage(params, sites, modules)
    return m.report()


def test_coverage_counts_observed_parameters_and_sites_by_kind() -> None:
    report = _monitored(
        ["fc0.weight", "fc0.bias", "fc1.weight", "head.weight"],
        {"net#relu:0": "relu", "net#relu:1": "relu", "act": "gelu"},
        {"act": "gelu", "lonely": "other"},
    )
    assert report.coverage == Coverage(
        parameters_trainable=4,
        parameters_observed=3,
        layers_not_observed=("head",),
        activation_sites={"gelu": 1, "relu": 2},
        activation_modules=2,
        activation_modules_not_observed=("lonely",),
    )


def test_coverage_round_trips_through_json_and_old_reports_still_load() -> None:
    report = _monitored(["fc0.weight", "x.weight"], {"a": "relu"}, {})
    again = Report.from_json(report.to_json())
    assert again == report and again.coverage == report.coverage
    raw = report.to_dict()
    del raw["coverage"]
    assert Report.from_dict(raw).coverage is None
    raw["coverage"] = {**report.to_dict()["coverage"], "surprise": 1}
    with pytest.raises(ValueError, match="unknown coverage keys"):
        Report.from_dict(raw)


def test_headline_is_never_healthy_over_layers_nobody_saw() -> None:
    partial = _monitored(["fc0.weight", "fc1.weight", "a.weight", "b.weight"], {}, {})
    lines = partial.render(width=100).splitlines()
    assert lines[0].startswith("gradwatch: healthy where observed; 2 layers not observed")
    assert lines[1] == (
        "judged: 2 of 4 trainable parameters (not observed: a, b); no activation observed"
    )
    full = _monitored(["fc0.weight", "fc1.weight"], {"s": "relu"}, {})
    lines = full.render(width=100).splitlines()
    assert lines[0].startswith("gradwatch: gradients look healthy")
    assert lines[1] == "judged: 2 of 2 trainable parameters; activations: 1 relu site"


def test_a_report_without_coverage_renders_as_before() -> None:
    report = run(30, lambda s, r: grad_step(s, [0.3, 0.4])).report()
    assert report.coverage is None
    assert not report.render().splitlines()[1].startswith("judged:")


def test_coverage_line_shortens_long_lists() -> None:
    cov = Coverage(9, 4, tuple(f"l{i}" for i in range(5)), {}, 5, ("a", "b", "c", "d"))
    assert coverage_line(cov) == (
        "judged: 4 of 9 trainable parameters (not observed: l0, l1, l2 and 2 more); "
        "no activation observed; 4 of 5 activation modules not observed (a, b, c ...)"
    )


# --- GELU / SiLU / ELU / softplus: judged on the input -----------------------------


@pytest.mark.parametrize(
    ("fn", "bound"),
    [
        ("gelu", -3.0217),
        ("gelu_tanh", -3.0094),
        ("silu", -6.1429),
        ("mish", -6.1587),
        ("elu", math.log(0.01)),
        ("softplus", math.log(0.01 / 0.99)),
        ("hardswish", -3.0),
    ],
)
def test_input_tail_bounds_are_where_the_slope_falls_under_1_percent(fn: str, bound: float) -> None:
    assert input_tail_bound(fn) == pytest.approx(bound, abs=2e-3)


def test_input_judged_kinds_can_die_and_saturate_and_the_modules_are_known() -> None:
    assert JUDGED_ON_INPUT <= DYING_KINDS and JUDGED_ON_INPUT <= SATURATING_KINDS
    assert kind_from_name("NewGELUActivation") == "gelu"
    assert kind_from_name("GELUTanh") == "gelu"
    assert kind_from_name("SiLUActivation") == "silu"
    assert kind_from_name("QuickGELUActivation") == "gelu"


def test_dead_means_flat_on_the_whole_batch_not_negative_output() -> None:
    z = np.array([[-5.0, -0.5, 1.0], [-4.0, -0.3, -9.0]])  # unit 1: y < 0 but slope ~0.2
    inactive, dead, tail = activation_stats_from_input(z, "gelu", "gelu")
    assert dead == pytest.approx(1 / 3)  # only unit 0
    assert inactive == tail == pytest.approx(3 / 6)
    # borderline: just above the bound is alive
    b = input_tail_bound("gelu")
    assert activation_stats_from_input([[b + 1e-6]], "gelu", "gelu")[1] == 0.0
    assert activation_stats_from_input([[b - 1e-6]], "gelu", "gelu")[1] == 1.0


def _gelu_step(step: int, rng: np.random.Generator, dead: float, tail: float):
    acts = {f"block{i}#gelu:0": ("gelu", tail, dead, tail) for i in range(3)}
    return grad_step(step, noisy([0.3, 0.35, 0.4, 0.5], rng, 0.1), acts=acts)


def test_dead_gelu_units_fire_dead_relu_and_healthy_ones_do_not() -> None:
    dead = run(40, lambda s, r: _gelu_step(s, r, 0.9, 0.9)).report()
    finding = dead.by_rule("dead_relu")
    assert finding is not None and "flat negative tail" in finding.message
    sat = dead.by_rule("saturation")
    assert sat is not None and sat.fixes[0].id == "batch_norm"
    assert "sigmoid/tanh" not in sat.fixes[0].text
    healthy = run(40, lambda s, r: _gelu_step(s, r, 0.0, 0.01)).report()
    assert healthy.problems == ()


# --- fixes assume only what was seen -------------------------------------------------


def _vanishing(kinds: dict[str, str]):
    acts = {name: (kind, 0.1, 0.0, 0.0) for name, kind in kinds.items()}
    return lambda s, r: grad_step(s, noisy(decaying(8, 0.2, 1.0), r, 0.1), acts=acts)


def test_unknown_activations_get_no_fix_that_assumes_relu() -> None:
    f = run(60, _vanishing({})).report().by_rule("vanishing_gradient")
    assert f is not None
    assert f.fixes[0].id == "leaky_relu"
    assert not any("ReLU-family layers" in fix.text for fix in f.fixes)
    assert "init_for_activation" in [fix.id for fix in f.fixes]


def test_seen_sigmoids_rank_leaky_relu_first() -> None:
    kinds = {f"net#sigmoid:{i}": "sigmoid" for i in range(7)}
    f = run(60, _vanishing(kinds)).report().by_rule("vanishing_gradient")
    assert f is not None and f.fixes[0].id == "leaky_relu"
    assert "he_init" in [fix.id for fix in f.fixes]


def test_dead_relu_from_gradients_alone_says_activations_were_not_observed() -> None:
    def make(step: int, rng: np.random.Generator):
        return grad_step(step, noisy([0.3, 0.4, 0.5], rng, 0.1), zero_frac=[0.9, 0.0, 0.0])

    relu_fed = gradwatch.Analyzer(strict=True)
    relu_fed.set_layer_info({"fc0.weight": LayerInfo(feeds="relu")})
    f = run(40, make, relu_fed).report().by_rule("dead_relu")
    assert f is not None and f.layers == ("fc0",)
    assert "activations were not observed" in f.message
    # Without the adapter saying a ReLU follows fc0, its zeros blame nothing.
    assert run(40, make).report().by_rule("dead_relu") is None


def test_fallback_console_text_says_where_observed() -> None:
    from gradwatch.monitor import render_for_console

    report = _monitored(["fc0.weight", "zz.weight"], {}, {})

    class Broken(Report):
        def render(self, width: int = 80, color: bool = False) -> str:
            raise RuntimeError("no rich")

    broken = Broken(**{f: getattr(report, f) for f in Report.__dataclass_fields__})
    text = render_for_console(broken, 80)
    assert "healthy where observed; 1 layers not observed" in text
    assert isinstance(gradwatch.Report.from_json(report.to_json()), Report)

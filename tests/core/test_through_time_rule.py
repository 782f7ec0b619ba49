"""``vanishing_gradient`` through time, judged on hand-built StepStats: a plain RNN whose
first time step gets a vanishing share of the last one's gradient is reported with
``gated_recurrence`` first; healthy ratios, gated layers and unknown layers are not."""

from __future__ import annotations

import math

import pytest

from gradwatch import Analyzer, StepStats
from gradwatch.layer_info import LayerInfo
from gradwatch.rules import VanishingGradient

# Parameter norms of a healthy-looking RNN + head: nothing for the layer branch to see.
_LAYERS = ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight")


def _step(step: int, first: float | None, last: float = 1e-3, length: int = 200) -> StepStats:
    time = {}
    if first is not None:
        time = {
            "time_layers": ("rnn",),
            "time_grad_first": (first,),
            "time_grad_last": (last,),
            "time_length": (length,),
        }
    return StepStats(
        step=step,
        grad_layers=_LAYERS,
        grad_norm=(0.02, 0.05, 0.1),
        grad_max_abs=(0.01, 0.01, 0.05),
        grad_mean_abs=(1e-3, 1e-3, 5e-3),
        grad_zero_frac=(0.0, 0.0, 0.0),
        grad_nonfinite=(0, 0, 0),
        grad_numel=(128, 1024, 64),
        **time,  # type: ignore[arg-type]
    )


def _analyzer(kind: str | None = "RNN") -> Analyzer:
    an = Analyzer(rules=[VanishingGradient()], strict=True)
    if kind is not None:
        info = LayerInfo(recurrent=True, kind=kind)
        an.set_layer_info({name: info for name in _LAYERS[:2]})
    return an


def _run(an: Analyzer, first: float | None, steps: int = 40, every: int = 1, **kw: float) -> None:
    an.observe_stats(
        [_step(i, first if i % every == 0 else None, **kw) for i in range(steps)]  # type: ignore[arg-type]
    )


def test_plain_rnn_vanishing_through_time_is_reported_with_gated_recurrence_first() -> None:
    an = _analyzer()
    _run(an, first=1e-3 * 1e-12)
    (finding,) = an.findings
    assert finding.rule == "vanishing_gradient"
    assert finding.fixes[0].id == "gated_recurrence"
    assert finding.layers == ("rnn",)
    assert finding.evidence["through_time_ratio"] == pytest.approx(1e-12)
    assert finding.evidence["time_steps"] == 200
    assert finding.evidence["per_step_factor"] == pytest.approx(1e-12 ** (1 / 199))
    assert "first of 200 time steps of rnn is 1.0e-12 of the last one's" in finding.message


def test_a_gradient_underflowing_to_zero_is_reported_as_such() -> None:
    an = _analyzer()
    _run(an, first=0.0)
    (finding,) = an.findings
    assert finding.evidence["through_time_ratio"] == 0.0
    assert "underflows to 0" in finding.message


@pytest.mark.parametrize("ratio", [1.0, 0.05, 1e-3, 2e-5])
def test_ratios_above_the_threshold_stay_quiet(ratio: float) -> None:
    an = _analyzer()
    _run(an, first=1e-3 * ratio)
    assert not an.findings


@pytest.mark.parametrize("kind", ["LSTM", "GRU", None])
def test_gated_or_unknown_layers_are_not_judged_through_time(kind: str | None) -> None:
    # A gated layer's gates set its per-step factor (a small ratio is learned forgetting);
    # an adapter that says nothing of the layer leaves its gating unknown.
    an = _analyzer(kind)
    _run(an, first=1e-3 * 1e-12)
    assert not an.findings


def test_sparse_samples_are_enough_and_too_few_are_not() -> None:
    # Measured on every 5th step only (a sampled schedule): still judged.
    an = _analyzer()
    _run(an, first=1e-15, every=5)
    assert [f.rule for f in an.findings] == ["vanishing_gradient"]
    # Two measurements in the whole run: fewer than min_time_samples, no judgement.
    an = _analyzer()
    an.observe_stats([_step(i, 1e-15 if i in (12, 13) else None) for i in range(40)])
    assert not an.findings


@pytest.mark.parametrize("last", [0.0, math.nan, math.inf])
def test_no_usable_last_step_gradient_means_no_judgement(last: float) -> None:
    an = _analyzer()
    _run(an, first=1e-15, last=last)
    assert not an.findings


def test_time_window_is_kept_per_layer_and_bounded() -> None:
    an = _analyzer()
    _run(an, first=1e-15, steps=100)
    view = an.stats.time.view()
    assert view.columns == ("rnn",)
    assert view.n_steps == an.window
    assert view["length"][-1, 0] == 200


def test_the_threshold_is_a_parameter() -> None:
    an = Analyzer(rules=[VanishingGradient(time_ratio_threshold=1e-20)], strict=True)
    an.set_layer_info({"rnn.weight_hh_l0": LayerInfo(recurrent=True, kind="RNN")})
    _run(an, first=1e-3 * 1e-12)
    assert not an.findings
    with pytest.raises(ValueError, match="time_ratio_threshold"):
        VanishingGradient(time_ratio_threshold=-1.0)


def test_every_vanishing_plain_layer_is_named_the_worst_first() -> None:
    an = Analyzer(rules=[VanishingGradient()], strict=True)
    info = LayerInfo(recurrent=True, kind="RNN")
    an.set_layer_info({"enc.weight_hh_l0": info, "dec.weight_hh_l0": info})
    steps = [
        StepStats(
            step=i,
            time_layers=("enc", "dec", "gated"),
            time_grad_first=(1e-20, 1e-12, 1e-30),
            time_grad_last=(1.0, 1.0, 1.0),
            time_length=(300, 100, 300),
        )
        for i in range(40)
    ]
    an.observe_stats(steps)
    (finding,) = an.findings
    assert finding.layers == ("enc", "dec")  # "gated" has no word on its gating
    assert finding.evidence["time_steps"] == 300
    assert "of enc is 1.0e-20" in finding.message and "Also in dec." in finding.message

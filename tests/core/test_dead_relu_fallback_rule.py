"""``dead_relu``'s gradient-zero fallback and its layer naming, on hand-built StepStats
with :meth:`Analyzer.set_layer_info` (issue #14): exact-zero gradients blame only
layers that feed a ReLU."""

from __future__ import annotations

import pytest
from synth import grad_step, rule_ids, run

from gradwatch import Analyzer
from gradwatch.layer_info import LayerInfo


def _analyzer(feeds: dict[str, LayerInfo]) -> Analyzer:
    an = Analyzer(strict=True)
    an.set_layer_info(feeds)
    return an


def _zeros(zero_frac: list[float], info: dict[str, LayerInfo], **kw: object) -> Analyzer:
    norms = [0.5] * len(zero_frac)
    return run(60, lambda s, r: grad_step(s, norms, zero_frac=zero_frac, **kw), _analyzer(info))


def test_fallback_fires_for_a_relu_fed_layer_group() -> None:
    an = _zeros([0.9, 0.1, 0.0], {"fc0.weight": LayerInfo(feeds="relu")})
    f = an.report().by_rule("dead_relu")
    assert f is not None and f.layers == ("fc0",)
    assert "exactly zero" in f.message and f.evidence["relu_fed_layers"] == 1.0


def test_fallback_fires_for_relu6() -> None:
    an = _zeros([0.9, 0.1], {"fc0.weight": LayerInfo(feeds="relu6")})
    assert "dead_relu" in rule_ids(an)


def test_fallback_is_silent_without_layer_info() -> None:
    # The same zeros with no word from the adapter: an embedding or a recurrent cell
    # has as many exact zeros, so they are no evidence of a ReLU.
    assert "dead_relu" not in rule_ids(_zeros([0.9, 0.1, 0.0], {}), "info")


@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "gelu", "silu", "leaky_relu", "softmax"])
def test_fallback_is_silent_for_layers_that_feed_no_relu(kind: str) -> None:
    # Their derivative is exactly 0 nowhere on a half-line: exact zeros are not their death.
    an = _zeros([0.9, 0.1], {"fc0.weight": LayerInfo(feeds=kind)})
    assert "dead_relu" not in rule_ids(an, "info")


def test_fallback_is_silent_for_an_embedding_and_a_recurrent_cell() -> None:
    info = {
        "emb.weight": LayerInfo(kind="Embedding"),
        "rnn.weight_hh_l0": LayerInfo(recurrent=True, kind="LSTM", fan_in=32),
        "head.weight": LayerInfo(fan_in=32, kind="Linear"),
    }
    names = list(info)
    an = run(
        60,
        lambda s, r: grad_step(s, [0.5, 0.5, 0.5], names=names, zero_frac=[0.98, 0.95, 0.0]),
        _analyzer(info),
    )
    assert "dead_relu" not in rule_ids(an, "info")


def test_only_the_relu_fed_groups_are_named() -> None:
    info = {"fc0.weight": LayerInfo(feeds="relu"), "fc2.weight": LayerInfo(feeds="relu")}
    f = _zeros([0.9, 0.95, 0.8, 0.0], info).report().by_rule("dead_relu")
    assert f is not None and f.layers == ("fc0", "fc2")  # fc1 has zeros but feeds no ReLU


def test_fallback_threshold_borderline() -> None:
    info = {"fc0.weight": LayerInfo(feeds="relu")}
    assert "dead_relu" not in rule_ids(_zeros([0.69, 0.0], info), "info")  # AUTOTRAINER: 70%
    assert "dead_relu" in rule_ids(_zeros([0.71, 0.0], info))


def test_fallback_ignores_tiny_groups() -> None:
    info = {"fc0.weight": LayerInfo(feeds="relu")}
    assert "dead_relu" not in rule_ids(_zeros([1.0, 0.0], info, numel=16), "info")


# --- with activations observed: the sites' feeding layers are named ------------------

_SITES = ("net#relu:0", "net#relu:1", "net#relu:2")


def _sites_run(dead: list[float], zero_frac: list[float], info: dict[str, LayerInfo]) -> Analyzer:
    acts = {site: ("relu", d, d, 0.0) for site, d in zip(_SITES, dead, strict=True)}
    acts["net#softmax:0"] = ("softmax", 0.0, 0.0, 0.0)
    norms = [0.5] * len(zero_frac)
    return run(
        60,
        lambda s, r: grad_step(s, norms, zero_frac=zero_frac, acts=acts, output="net#softmax:0"),
        _analyzer(info),
    )


_RELU_FED = {f"fc{i}.weight": LayerInfo(feeds="relu") for i in range(3)}


def test_every_relu_site_dead_names_every_relu_fed_layer() -> None:
    f = _sites_run([1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.9], _RELU_FED).report().by_rule("dead_relu")
    assert f is not None and f.layers == ("fc0", "fc1", "fc2")  # fc3 feeds the softmax
    assert "net#relu:0" in f.message


def test_one_dead_site_names_its_feeder_told_apart_by_its_zero_gradients() -> None:
    # fc1 feeds the dead ReLU: its gradient is mostly exact zeros; fc0 and fc2 learn.
    f = _sites_run([0.1, 0.9, 0.1], [0.05, 0.9, 0.1, 0.0], _RELU_FED).report().by_rule("dead_relu")
    assert f is not None and f.layers == ("fc1",)


def test_feeders_not_told_apart_leave_the_site_named() -> None:
    # fc2 has as many zeros as fc1 (its inputs are dead): which one feeds the dead site
    # is unknown, so the site is named rather than a guess.
    f = _sites_run([0.1, 0.9, 0.1], [0.05, 0.9, 0.9, 0.0], _RELU_FED).report().by_rule("dead_relu")
    assert f is not None and f.layers == ("net#relu:1",)


def test_sites_without_layer_info_are_named_as_sites() -> None:
    f = _sites_run([1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], {}).report().by_rule("dead_relu")
    assert f is not None and f.layers == _SITES


def test_zero_gradients_never_open_a_finding_when_relu_sites_are_alive() -> None:
    an = _sites_run([0.2, 0.2, 0.2], [0.9, 0.9, 0.9, 0.0], _RELU_FED)
    assert "dead_relu" not in rule_ids(an, "info")

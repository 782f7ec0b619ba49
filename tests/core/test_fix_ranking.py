"""Fix ranking from the evidence (issue #14): the cause functions of
``gradwatch.rules.causes`` on hand-built StepStats, one case per cause (and its
counter-case, so each can fail), and the rules' first fix for each cause."""

from __future__ import annotations

import math

import pytest

from gradwatch import StepStats
from gradwatch.fixes import fix
from gradwatch.initial_scale import initial_scales
from gradwatch.layer_info import LayerInfo
from gradwatch.rules import (
    DeadRelu,
    ExplodingGradient,
    NonfiniteGradient,
    VanishingGradient,
    causes,
)
from gradwatch.rules.base import RuleContext
from gradwatch.run_statistics import RunStatistics, module_of


def _linear(name: str, fan_in: int, out: int, w_rms: float, b_rms: float = 0.0) -> list[tuple]:
    """(name, numel, weight norm) of a Linear's weight and bias."""
    return [
        (f"{name}.weight", fan_in * out, w_rms * math.sqrt(fan_in * out)),
        (f"{name}.bias", out, b_rms * math.sqrt(out)),
    ]


def _step(step: int, tensors: list[tuple], grad: float = 0.1, scale: float = 1.0) -> StepStats:
    """One step: each tensor gets gradient norm ``grad``; weight norms times ``scale``."""
    n = len(tensors)
    return StepStats(
        step=step,
        grad_layers=tuple(t[0] for t in tensors),
        grad_norm=(grad,) * n,
        grad_max_abs=(grad,) * n,
        grad_mean_abs=(grad / 10,) * n,
        grad_zero_frac=(0.0,) * n,
        grad_nonfinite=(0,) * n,
        grad_numel=tuple(t[1] for t in tensors),
        param_norm=tuple(t[2] * scale for t in tensors),
    )


def _ctx(
    steps: list[StepStats],
    kinds: frozenset[str] = frozenset(),
    info: dict[str, LayerInfo] | None = None,
) -> RuleContext:
    stats = RunStatistics(window=64, history_bins=8)
    for s in steps:
        stats.add(s)
    return RuleContext(
        step=steps[-1].step,
        grads=stats.grads.view(),
        acts=stats.acts.view(),
        act_kinds=(),
        act_is_output=(),
        run=stats.run.view(),
        active=False,
        baseline_total_norm=stats.baseline_total_norm,
        initial_grad_to_weight=stats.initial_grad_to_weight,
        hidden_kinds=kinds,
        layer_info=info or {},
        initial_scales=stats.initial_scales,
    )


def _mlp(w_rms_times_sqrt_fan_in: float, b_rms: float = 0.0) -> list[tuple]:
    layers = []
    for i, fan_in in enumerate((64, 128, 128)):
        layers += _linear(f"fc{i}", fan_in, 128, w_rms_times_sqrt_fan_in / math.sqrt(fan_in), b_rms)
    return layers


def _steady(tensors: list[tuple], n: int = 20, grad: float = 0.1) -> list[StepStats]:
    return [_step(i, tensors, grad) for i in range(n)]


# --- the evidence ---------------------------------------------------------------------


def test_fan_in_is_inferred_from_weight_and_bias_sizes() -> None:
    scales = initial_scales(_step(0, _linear("conv", 3 * 9, 16, 0.1)), module_of)
    assert scales["conv"].fan_in == 27
    assert scales["conv"].weight_rms == pytest.approx(0.1)
    # A norm layer's scale and shift have the same size: no fan-in.
    norm = [("ln.weight", 32, 5.6), ("ln.bias", 32, 0.0)]
    assert initial_scales(_step(0, norm), module_of)["ln"].fan_in is None


def test_tiny_uniform_init_is_too_small() -> None:
    # U(+-0.05) has RMS 0.05/sqrt(3); on fan-in 128 that is 0.33 of LeCun's scale.
    ctx = _ctx(_steady(_mlp(0.05 / math.sqrt(3) * math.sqrt(128))))
    assert causes.init_too_small(ctx) and not causes.init_too_large(ctx)


def test_he_init_is_neither_small_nor_large() -> None:
    ctx = _ctx(_steady(_mlp(math.sqrt(2))))
    assert causes.init_scale(ctx) == pytest.approx(math.sqrt(2))
    assert not causes.init_too_small(ctx) and not causes.init_too_large(ctx)


def test_large_init_is_too_large() -> None:
    ctx = _ctx(_steady(_mlp(0.5 * 8)))  # N(0, 0.5) on width 64
    assert causes.init_too_large(ctx)


def test_adapter_fan_in_is_used_when_sizes_cannot_tell() -> None:
    lone = [("fc.weight", 64 * 128, 0.01 * math.sqrt(64 * 128))]  # no bias
    assert causes.init_scale(_ctx(_steady(lone))) is None
    ctx = _ctx(_steady(lone), info={"fc": LayerInfo(fan_in=64)})
    assert causes.init_scale(ctx) == pytest.approx(0.08)


def test_large_bias_is_named_and_ordinary_bias_is_not() -> None:
    assert causes.large_bias_groups(_ctx(_steady(_mlp(1.4, b_rms=3.0)))) == ("fc0", "fc1", "fc2")
    assert causes.large_bias_groups(_ctx(_steady(_mlp(1.4, b_rms=0.8)))) == ()


def _rnn(gates: int, h: int = 32, n_in: int = 8) -> list[tuple]:
    return [
        ("rnn.weight_ih_l0", gates * h * n_in, 1.0),
        ("rnn.weight_hh_l0", gates * h * h, 1.0),
        ("rnn.bias_ih_l0", gates * h, 0.1),
        ("rnn.bias_hh_l0", gates * h, 0.1),
        *_linear("head", h, 10, 0.1),
    ]


def test_recurrence_and_its_gates_from_the_framework_names() -> None:
    lstm = _ctx(_steady(_rnn(gates=4)))
    assert causes.recurrent_groups(lstm) == ("rnn",)
    assert not causes.plain_recurrence(lstm)
    assert causes.plain_recurrence(_ctx(_steady(_rnn(gates=1))))
    assert causes.recurrent_groups(_ctx(_steady(_mlp(1.4)))) == ()


def test_weight_jump_counts_consecutive_steps_only() -> None:
    layers = _mlp(1.4)
    jumped = [_step(i, layers, scale=1.0 if i < 5 else 3.0) for i in range(10)]
    assert causes.weight_jump(_ctx(jumped)) == pytest.approx(2.0)
    sparse = [_step(i * 10, layers, scale=1.0 if i < 5 else 3.0) for i in range(10)]
    assert causes.weight_jump(_ctx(sparse)) == 0.0
    assert causes.weight_jump(_ctx(_steady(layers))) == pytest.approx(0.0)


def test_a_rise_after_ordinary_first_steps_points_at_the_learning_rate() -> None:
    layers = _mlp(1.4)
    rising = [_step(i, layers, grad=0.1 if i < 10 else 5.0) for i in range(20)]
    ctx = _ctx(rising)
    assert causes.rose_after_ordinary_start(ctx)
    assert causes.explosion_cause(ctx) == "learning_rate"
    assert not causes.rose_after_ordinary_start(_ctx(_steady(layers)))


def test_huge_from_the_first_step_is_no_learning_rate_rise() -> None:
    # Gradients 1000x the weights at step 0 already: the init did it.
    tiny = _mlp(1e-3)
    rising = [_step(i, tiny, grad=1.0 if i < 10 else 50.0) for i in range(20)]
    assert not causes.rose_after_ordinary_start(_ctx(rising))


def test_explosion_causes_strongest_evidence_first() -> None:
    assert causes.explosion_cause(_ctx(_steady(_mlp(4.0)))) == "init"
    assert causes.explosion_cause(_ctx(_steady(_rnn(gates=1)))) == "recurrence"
    assert causes.explosion_cause(_ctx(_steady(_mlp(1.4)))) == "unknown"


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ({"tanh"}, "xavier_init"),
        ({"relu"}, "he_init"),
        ({"relu", "sigmoid"}, "init_for_activation"),
        (set(), "init_for_activation"),
    ],
)
def test_init_fix_fits_the_activations_seen(kinds: set[str], expected: str) -> None:
    assert causes.init_fix(frozenset(kinds)) == expected


# --- the rules' first fix -------------------------------------------------------------


def _first(symptom: object) -> str:
    assert symptom is not None
    return symptom.fixes[0].id  # type: ignore[attr-defined]


def test_exploding_updates_are_found_and_blame_the_learning_rate() -> None:
    # The gradient norm stays moderate, but one step multiplies the weights' size 5x
    # (an LSTM under SGD at lr=200).
    layers = _rnn(gates=4)
    steps = [_step(i, layers, scale=1.0 if i < 3 else 5.0) for i in range(15)]
    symptom = ExplodingGradient().check(_ctx(steps))
    assert symptom is not None and symptom.evidence["weight_norm_jump"] == pytest.approx(4.0)
    assert _first(symptom) == "lower_learning_rate"
    assert ExplodingGradient().check(_ctx(_steady(layers, 15))) is None


def test_one_77x_spike_in_an_lstm_opens_no_finding() -> None:
    layers = _rnn(gates=4)
    steps = [_step(i, layers, grad=7.7 if i == 20 else 0.1) for i in range(40)]
    assert ExplodingGradient().check(_ctx(steps, kinds=frozenset({"sigmoid", "tanh"}))) is None


def test_a_recurrent_explosion_clips_first_and_names_gating_for_a_plain_rnn() -> None:
    layers = _rnn(gates=1)
    steps = [_step(i, layers, grad=0.1 * 1.6**i) for i in range(20)]
    ranked = [f.id for f in ExplodingGradient().check(_ctx(steps)).fixes]  # type: ignore[union-attr]
    assert ranked[:2] == ["gradient_clipping", "gated_recurrence"]


def test_an_explosion_from_a_large_init_fixes_the_init_first() -> None:
    steps = [_step(i, _mlp(4.0), grad=0.1 * 2.0**i) for i in range(20)]
    symptom = ExplodingGradient().check(_ctx(steps, kinds=frozenset({"relu"})))
    assert _first(symptom) == "he_init"


def test_nan_after_an_lr_explosion_lowers_the_learning_rate_first() -> None:
    layers = _mlp(1.4)
    steps = [_step(i, layers, grad=0.1 if i < 8 else 100.0) for i in range(10)]
    bad = _step(10, layers)
    nan = StepStats(**{**{f: getattr(bad, f) for f in bad.__slots__}, "grad_nonfinite": (1,) * 6})
    ctx = _ctx([*steps, nan], kinds=frozenset({"relu"}))
    assert _first(NonfiniteGradient().check(ctx)) == "lower_learning_rate"


def test_nan_at_an_ordinary_scale_is_the_loss_first() -> None:
    layers = _mlp(1.4)
    bad = _step(10, layers)
    nan = StepStats(**{**{f: getattr(bad, f) for f in bad.__slots__}, "grad_nonfinite": (1,) * 6})
    ctx = _ctx([*_steady(layers, 10), nan], kinds=frozenset({"relu"}))
    ranked = [f.id for f in NonfiniteGradient().check(ctx).fixes]  # type: ignore[union-attr]
    assert ranked[:2] == ["stable_loss", "stable_activation"]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (_mlp(1.4, b_rms=3.0), "bias_init"),  # biases at -3
        (_mlp(0.2), "he_init"),  # U(+-0.05)-sized weights
        (_mlp(1.4), "leaky_relu"),  # no cause in the evidence: the symptom's own fix
    ],
)
def test_dead_relu_first_fix_follows_the_cause(layers: list[tuple], expected: str) -> None:
    ctx = _ctx(_steady(layers), kinds=frozenset({"relu"}))
    assert DeadRelu()._fixes(ctx)[0].id == expected


@pytest.mark.parametrize(
    ("layers", "expected"),
    [(_mlp(0.16), "xavier_init"), (_mlp(1.0), "leaky_relu")],  # N(0, 0.02) on 64 / Xavier
)
def test_vanishing_tanh_first_fix_follows_the_init_scale(
    layers: list[tuple], expected: str
) -> None:
    ctx = _ctx(_steady(layers), kinds=frozenset({"tanh"}))
    assert VanishingGradient._fixes(ctx, depth=8)[0].id == expected


def test_new_fix_ids_speak_the_framework_of_the_report() -> None:
    for fid in ("bias_init", "stable_activation", "gated_recurrence"):
        torch_text = fix(fid).spelled("torch").text
        keras_text = fix(fid).spelled("keras").text
        assert "nn." in torch_text or "torch" in torch_text, torch_text
        assert "keras" in keras_text or "ops." in keras_text or "_initializer" in keras_text
        assert "keras" not in torch_text and "nn." not in keras_text

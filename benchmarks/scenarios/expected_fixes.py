"""The judge of the right-fix-first rate: for every faulty zoo scenario, per expected
rule, the fix ids an expert would try first.

Each set is written from the bug that was built into the scenario (its ``cause``),
never from what gradwatch answers: a fix is in the set when, applied alone, it removes
the built-in cause. A finding's first fix is *right* when its id is in the set of its
(scenario, rule); a faulty scenario's expected rule with no entry here counts as *no
judgement* (shown, never a pass). ``benchmarks/detect.py`` applies it.

Example:
    >>> first_fix_verdict("torch", "dead_relu_negative_bias", "dead_relu", "bias_init")
    'right'
    >>> first_fix_verdict("torch", "no_such_scenario", "dead_relu", "bias_init")
    'no judgement'
"""

from __future__ import annotations

# Sets shared by several scenarios, one per built-in cause.
_SWAP_SQUASHING = frozenset({"leaky_relu", "relu"})  # sigmoid/tanh chains
_INIT_TANH = frozenset({"xavier_init", "init_for_activation"})  # tanh/sigmoid init scale
_INIT_RELU = frozenset({"he_init", "init_for_activation"})  # ReLU init scale
_LR = frozenset({"lower_learning_rate"})  # the learning rate is too high
_BIAS = frozenset({"bias_init"})  # a bias set far from zero
_STABLE_LOSS = frozenset({"stable_loss"})  # log(0), sqrt(0) in the loss
_EXP = frozenset({"stable_activation"})  # an activation overflowing in the forward pass
# A plain RNN whose recurrent weights amplify: clip (Pascanu et al. 2013) or gate it.
_RECURRENT = frozenset({"gradient_clipping", "gated_recurrence"})

# (framework, scenario) -> {rule id: fix ids an expert tries first}.
EXPECTED_FIXES: dict[tuple[str, str], dict[str, frozenset[str]]] = {
    # --- torch_zoo ------------------------------------------------------------------
    ("torch", "vanishing_sigmoid_deep"): {"vanishing_gradient": _SWAP_SQUASHING},
    ("torch", "vanishing_tanh_tiny_init"): {"vanishing_gradient": _INIT_TANH},
    # 20 plain conv+ReLU layers: depth without normalisation or skips (default init is
    # 1/sqrt(3) of He's scale, so He init is also a remedy).
    ("torch", "vanishing_deep_plain_cnn"): {
        "vanishing_gradient": frozenset({"residual", "batch_norm", "he_init"}),
        "dead_relu": frozenset({"batch_norm", "he_init", "leaky_relu", "residual"}),
    },
    ("torch", "exploding_large_init"): {
        "exploding_gradient": _INIT_RELU,
        "nonfinite_gradient": _INIT_RELU,
    },
    ("torch", "exploding_huge_lr"): {"exploding_gradient": _LR, "nonfinite_gradient": _LR},
    ("torch", "exploding_rnn_recurrent_weights"): {"exploding_gradient": _RECURRENT},
    ("torch", "dead_relu_negative_bias"): {"dead_relu": _BIAS},
    # One lr=50 step: the learning rate (clipping would have capped that one step too).
    ("torch", "dead_relu_lr_spike"): {
        "dead_relu": _LR,
        "exploding_gradient": frozenset({"lower_learning_rate", "gradient_clipping"}),
    },
    ("torch", "saturation_large_init"): {"saturation": _INIT_TANH},
    ("torch", "saturation_unnormalized_inputs"): {"saturation": frozenset({"normalize_inputs"})},
    ("torch", "nonfinite_naive_bce"): {"nonfinite_gradient": _STABLE_LOSS},
    ("torch", "nonfinite_sqrt_distance"): {"nonfinite_gradient": _STABLE_LOSS},
    ("torch", "zero_gradient_dead_output"): {"zero_gradient": frozenset({"output_activation"})},
    # round() has a zero derivative: the loss does not depend on the parameters through
    # it, as through a detached graph.
    ("torch", "zero_gradient_rounded_predictions"): {
        "zero_gradient": frozenset({"loss_depends_on_params", "connected_graph"})
    },
    # --- torch_causes ---------------------------------------------------------------
    ("torch", "nonfinite_exp_activation"): {"exploding_gradient": _EXP, "nonfinite_gradient": _EXP},
    ("torch", "dead_relu_tiny_uniform_init"): {"dead_relu": _INIT_RELU},
    ("torch", "vanishing_tanh_tiny_uniform_init"): {"vanishing_gradient": _INIT_TANH},
    ("torch", "saturation_sigmoid_gate_bias"): {"saturation": _BIAS},
    # lr=200 is the bug; clipping alone also bounds each update.
    ("torch", "exploding_lstm_sgd_lr200"): {
        "exploding_gradient": frozenset({"lower_learning_rate", "gradient_clipping"})
    },
    ("torch", "exploding_transformer_sgd_lr"): {"exploding_gradient": _LR},
    # --- torch_recurrent ------------------------------------------------------------
    # A plain tanh RNN over 200 time steps: the gradient decays through time.
    ("torch", "vanishing_rnn_through_time"): {
        "vanishing_gradient": frozenset({"gated_recurrence"})
    },
    # --- keras_recurrent ------------------------------------------------------------
    # A plain tanh SimpleRNN over 200 time steps (alone, or each half of a Bidirectional).
    ("keras", "vanishing_simple_rnn_through_time"): {
        "vanishing_gradient": frozenset({"gated_recurrence"})
    },
    ("keras", "vanishing_bidirectional_rnn_through_time"): {
        "vanishing_gradient": frozenset({"gated_recurrence"})
    },
    # --- keras_zoo ------------------------------------------------------------------
    ("keras", "vanishing_sigmoid_deep"): {"vanishing_gradient": _SWAP_SQUASHING},
    ("keras", "vanishing_tanh_tiny_init"): {"vanishing_gradient": _INIT_TANH},
    ("keras", "exploding_large_init"): {
        "exploding_gradient": _INIT_RELU,
        "nonfinite_gradient": _INIT_RELU,
    },
    ("keras", "exploding_huge_lr"): {"exploding_gradient": _LR, "nonfinite_gradient": _LR},
    ("keras", "dead_relu_negative_bias"): {"dead_relu": _BIAS},
    ("keras", "saturation_large_init"): {"saturation": _INIT_TANH},
    ("keras", "saturation_unnormalized_inputs"): {"saturation": frozenset({"normalize_inputs"})},
    ("keras", "nonfinite_naive_bce"): {"nonfinite_gradient": _STABLE_LOSS},
    # --- keras_late -----------------------------------------------------------------
    # A schedule that jumps the learning rate 50x at step 150.
    ("keras", "exploding_late_lr_jump"): {"exploding_gradient": _LR, "nonfinite_gradient": _LR},
    # --- keras_causes ---------------------------------------------------------------
    ("keras", "dead_relu_tiny_uniform_init"): {"dead_relu": _INIT_RELU},
    ("keras", "saturation_sigmoid_gate_bias"): {"saturation": _BIAS},
    ("keras", "nonfinite_exp_activation"): {"exploding_gradient": _EXP, "nonfinite_gradient": _EXP},
    ("keras", "exploding_lstm_sgd_lr200"): {
        "exploding_gradient": frozenset({"lower_learning_rate", "gradient_clipping"})
    },
}

JUDGE = "first fix in the expert set of benchmarks/scenarios/expected_fixes.py"


def expert_set(framework: str, scenario: str, rule: str) -> frozenset[str] | None:
    """The fix ids an expert tries first for ``rule`` on ``scenario``, or ``None``."""
    return EXPECTED_FIXES.get((framework, scenario), {}).get(rule)


def first_fix_verdict(framework: str, scenario: str, rule: str, first_fix: str) -> str:
    """``"right"``, ``"wrong"`` or ``"no judgement"`` (no expert set for the pair)."""
    expected = expert_set(framework, scenario, rule)
    if expected is None:
        return "no judgement"
    return "right" if first_fix in expected else "wrong"


__all__ = ["EXPECTED_FIXES", "JUDGE", "expert_set", "first_fix_verdict"]

"""Host reductions and activation regions against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.activations import activation_stats_from_array, kind_from_name, tail_bounds
from gradwatch.reduce import grad_stats_from_array, step_stats_from_arrays


def test_grad_stats_by_hand():
    norm, max_abs, mean_abs, zero, nonfinite, numel = grad_stats_from_array(
        [[3.0, 0.0], [-4.0, 0.0]]
    )
    assert (norm, max_abs, mean_abs, zero, nonfinite, numel) == (5.0, 4.0, 1.75, 0.5, 0, 4)


def test_non_finite_entries_are_counted_and_excluded_from_the_scale():
    norm, max_abs, _, _, nonfinite, numel = grad_stats_from_array([3.0, np.nan, np.inf, -4.0])
    assert (norm, max_abs, nonfinite, numel) == (5.0, 4.0, 2, 4)


def test_empty_and_scalar_arrays():
    assert grad_stats_from_array(np.zeros((0, 3))) == (0.0, 0.0, 0.0, 0.0, 0, 0)
    assert grad_stats_from_array(np.float32(-2.0))[0] == 2.0


def test_tail_bounds_follow_the_derivative_fraction():
    lo, hi = tail_bounds("sigmoid", 0.01)
    assert lo * (1 - lo) == pytest.approx(0.01 / 4)  # sigmoid' = y(1-y), max 1/4
    lo, hi = tail_bounds("tanh", 0.01)
    assert 1 - hi**2 == pytest.approx(0.01)  # tanh' = 1 - y^2, max 1
    assert tail_bounds("relu") == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="derivative_fraction"):
        tail_bounds("tanh", 1.5)


def test_dead_units_must_be_inactive_for_the_whole_batch():
    # unit 0 always off, unit 1 on for one sample, unit 2 always on
    y = np.array([[0.0, 0.0, 1.0], [-0.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    inactive, dead, tail = activation_stats_from_array(y, "relu")
    assert dead == pytest.approx(1 / 3)
    assert inactive == pytest.approx(5 / 9)
    assert tail == 0.0


def test_channels_first_unit_axis():
    y = np.zeros((2, 4, 3, 3))  # N, C, H, W
    y[:, 1] = 1.0
    _, dead, _ = activation_stats_from_array(y, "relu", unit_axis=1)
    assert dead == pytest.approx(3 / 4)


def test_tail_fraction_of_sigmoid_outputs():
    y = 1 / (1 + np.exp(-np.array([-10.0, -1.0, 0.0, 1.0, 10.0])))
    assert activation_stats_from_array(y, "sigmoid")[2] == pytest.approx(2 / 5)


def test_kind_names_from_frameworks():
    assert kind_from_name("ReLU") == "relu"
    assert kind_from_name("Hardtanh") == "hard_tanh"
    assert kind_from_name("swish") == "silu"
    assert kind_from_name("whatever") == "other"


def test_step_stats_from_arrays_validates_activation_specs():
    with pytest.raises(ValueError, match="act1"):
        step_stats_from_arrays(0, activations={"act1": np.ones(3)})
    s = step_stats_from_arrays(0, activations={"out": (np.ones((2, 2)), "Sigmoid", -1, True)})
    assert s.act_kinds == ("sigmoid",) and s.act_is_output == (True,)

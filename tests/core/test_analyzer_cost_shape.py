"""The analyzer's fast paths (one tensor per layer group, columns in model order, a ring
that has not wrapped) give what the general paths give (issue #16)."""

from __future__ import annotations

import math

import numpy as np

from gradwatch import Analyzer, StepStats
from gradwatch.history import LayerTotals
from gradwatch.reduce import grad_stats_from_array
from gradwatch.window import Window


def _stats(step: int, names: tuple[str, ...], norms: list[float], params: list[float]) -> StepStats:
    n = len(names)
    return StepStats(
        step=step,
        grad_layers=names,
        grad_norm=tuple(norms),
        grad_max_abs=tuple(v / 2 for v in norms),
        grad_mean_abs=tuple(v / 4 for v in norms),
        grad_zero_frac=(0.25,) * n,
        grad_nonfinite=(0,) * n,
        grad_numel=(16,) * n,
        param_norm=tuple(params),
    )


def test_grouped_norms_of_1e200_weights_do_not_overflow() -> None:
    an = Analyzer(strict=True)
    an.observe_stats(_stats(0, ("fc.weight", "fc.bias"), [1e200, 1e200], [1e200, 1e200]))
    view = an.stats.grads.view()
    assert view["norm"][0, 0] == math.sqrt(2) * 1e200
    assert view["param_norm"][0, 0] == math.sqrt(2) * 1e200


def test_one_tensor_per_group_matches_the_grouped_arithmetic() -> None:
    names = ("a.weight", "b.weight", "c.weight")
    single = Analyzer(strict=True)
    single.observe_stats(_stats(0, names, [3.0, 0.0, math.nan], [1.0, 2.0, math.nan]))
    # The same layers, each group padded with an empty tensor: the grouped path.
    padded = Analyzer(strict=True)
    padded_names = (*names, "a.empty", "b.empty", "c.empty")
    stats = _stats(0, padded_names, [3.0, 0.0, math.nan, 0.0, 0.0, 0.0], [1.0, 2.0, math.nan] * 2)
    stats = StepStats(
        **{
            **{f: getattr(stats, f) for f in StepStats.field_names()},
            "grad_numel": (16, 16, 16, 0, 0, 0),
            "param_norm": (1.0, 2.0, math.nan, 0.0, 0.0, 0.0),
        }
    )
    padded.observe_stats(stats)
    a, b = single.stats.grads.view(), padded.stats.grads.view()
    assert a.columns == b.columns == ("a", "b", "c")
    for metric in ("norm", "max_abs", "mean_abs", "zero_frac", "nonfinite", "numel", "param_norm"):
        np.testing.assert_array_equal(a[metric], b[metric], err_msg=metric)


def test_window_views_are_the_same_before_and_after_the_ring_wraps_and_out_of_order() -> None:
    w = Window(size=3, metrics=("norm",))
    w.push(0, ("b",), {"norm": np.array([1.0])})
    w.push(1, ("a", "b"), {"norm": np.array([2.0, 3.0])})  # "a" stored after "b"
    view = w.view()
    assert view.columns == ("a", "b")
    np.testing.assert_array_equal(view["norm"], [[np.nan, 1.0], [2.0, 3.0]])
    for step in range(2, 6):  # wraps: rows gathered, columns gathered
        w.push(step, ("a", "b"), {"norm": np.array([float(step), -float(step)])})
    view = w.view()
    assert view.steps.tolist() == [3, 4, 5]
    np.testing.assert_array_equal(view["norm"], [[3.0, -3.0], [4.0, -4.0], [5.0, -5.0]])
    np.testing.assert_array_equal(w.view(last=2)["norm"], [[4.0, -4.0], [5.0, -5.0]])


def test_layer_totals_skip_nonfinite_and_zero_norms() -> None:
    totals = LayerTotals()
    for norms in ([1.0, 0.0, 10.0], [100.0, math.nan, math.inf]):
        arr = np.array(norms)
        totals.update(("a", "b", "c"), arr, arr, np.zeros(3), np.zeros(3), np.ones(3))
    d = totals.data
    assert d["log_norm_count"].tolist()[:3] == [2.0, 0.0, 1.0]
    assert d["log_norm_sum"].tolist()[:3] == [2.0, 0.0, 1.0]
    assert d["min_norm"].tolist()[:3] == [1.0, 0.0, 10.0]
    assert d["max_norm"].tolist()[:3] == [100.0, 0.0, 10.0]


def test_host_reduction_fast_path_matches_the_scaled_path() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(0, 1e-3, 1000)
    g[::7] = 0.0
    fast = grad_stats_from_array(g)
    scaled = grad_stats_from_array(g * 1e200)  # the scaled path
    assert fast[0] * 1e200 == scaled[0] or math.isclose(fast[0] * 1e200, scaled[0], rel_tol=1e-14)
    assert fast[3:] == scaled[3:]
    assert grad_stats_from_array(np.zeros(4)) == (0.0, 0.0, 0.0, 1.0, 0, 4)

"""The analyzer's cost shape (issue #16), never its timing: the fast paths (one tensor
per layer group, columns in model order, a ring that has not wrapped, batched totals and
reductions) give what the general paths give, a step's ingestion makes the same calls
whatever the number of layers and the length of the run, one view serves every rule of
a check, and the default schedule checks every step, then every 5th, and NaN at once."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from synth import grad_step

from gradwatch import Analyzer, StepStats
from gradwatch.analyzer import DENSE_CHECK_STEPS, SPARSE_CHECK_EVERY
from gradwatch.history import FlowHistory, LayerTotals
from gradwatch.reduce import grad_stats_from_array, grad_stats_from_arrays
from gradwatch.rules import DEFAULT_RULES, Rule, RuleContext, Symptom
from gradwatch.rules.base import median, window_median
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


def _calls(fn: Callable[[], object]) -> int:
    """Python and C function calls made by ``fn`` (a count, not a time)."""
    count = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def _ingestion_calls(n_layers: int, at_step: int) -> int:
    an = Analyzer(strict=True, check_every=10**9)  # rules never due: ingestion only
    names = tuple(f"l{i}.weight" for i in range(n_layers))
    for step in range(at_step):
        an.observe_stats(grad_step(step, [1.0] * n_layers, names=names))
    s = grad_step(at_step, [2.0] * n_layers, names=names)
    return _calls(lambda: an.observe_stats(s))


def test_a_steps_ingestion_makes_the_same_calls_for_3_or_300_layers_at_step_70_or_7000() -> None:
    # Steps 70 and 7000 are not multiples of the window (64): no batched fold of the totals.
    counts = {(n, at): _ingestion_calls(n, at) for n in (3, 300) for at in (70, 7000)}
    assert len(set(counts.values())) == 1, counts


def test_the_totals_fold_once_per_window_not_once_per_step() -> None:
    an = Analyzer(strict=True, check_every=10**9, window=64)
    folds = []
    original = an.stats.totals.update_rows
    an.stats.totals.update_rows = lambda *a: (folds.append(a[1].shape[0]), original(*a))[1]
    for step in range(640):
        an.observe_stats(grad_step(step, [1.0, 2.0]))
    assert folds == [64] * 9  # the 10th window is still in the ring
    an.report()
    assert folds == [64] * 10


def test_every_rule_of_a_check_reads_one_shared_read_only_view() -> None:
    seen: list[RuleContext] = []

    @dataclass(frozen=True)
    class Spy(Rule):
        id = "spy"
        warmup_steps: int = 0

        def check(self, ctx: RuleContext) -> Symptom | None:
            seen.append(ctx)
            return None

    an = Analyzer(rules=(Spy(), *DEFAULT_RULES), strict=True, check_every=1)
    for step in range(30):
        an.observe_stats(grad_step(step, [1.0, 2.0]))
    view = an.stats.grads.view()
    assert an.stats.grads.view() is view  # cached until the next push
    assert seen[-1].grads is view
    with pytest.raises(ValueError, match="read-only"):
        view["norm"][0, 0] = 5.0
    an.observe_stats(grad_step(30, [1.0, 2.0]))
    assert an.stats.grads.view() is not view


def _checked_steps(n_steps: int, nan_at: int | None = None, **kwargs: int) -> list[int]:
    checked: list[int] = []

    @dataclass(frozen=True)
    class Counter(Rule):
        id = "counter"
        warmup_steps: int = 0

        def check(self, ctx: RuleContext) -> Symptom | None:
            checked.append(ctx.step)
            return None

    an = Analyzer(rules=(Counter(),), strict=True, **kwargs)
    for step in range(n_steps):
        an.observe_stats(grad_step(step, [1.0], nonfinite=1 if step == nan_at else 0))
    return checked


def test_the_default_schedule_checks_every_step_then_every_5th_and_nan_at_once() -> None:
    dense = list(range(DENSE_CHECK_STEPS))
    sparse = list(range(DENSE_CHECK_STEPS - 1 + SPARSE_CHECK_EVERY, 400, SPARSE_CHECK_EVERY))
    assert _checked_steps(400) == dense + sparse
    with_nan = _checked_steps(400, nan_at=333)
    assert 333 in with_nan and 333 not in sparse
    assert _checked_steps(60, check_every=1) == list(range(60))  # explicit: as asked
    assert _checked_steps(60, nan_at=33, check_every=7) == list(range(6, 60, 7))


def _random_rows(rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    present = rng.random((rows, cols)) > 0.3
    norm = np.where(present, rng.choice([0.0, 1e-3, 2.0, np.nan, np.inf], (rows, cols)), np.nan)
    norm = np.where(
        present & (rng.random((rows, cols)) > 0.5), rng.lognormal(0, 3, norm.shape), norm
    )
    max_abs = np.where(present, rng.random((rows, cols)), np.nan)
    zero = np.where(present, rng.random((rows, cols)), np.nan)
    nonfinite = np.where(present, rng.integers(0, 3, (rows, cols)), np.nan)
    numel = np.where(present, rng.integers(0, 100, (rows, cols)), np.nan)
    return norm, max_abs, zero, nonfinite, numel, present


def test_batched_totals_equal_per_step_updates_exactly() -> None:
    rng = np.random.default_rng(1)
    names = ("a", "b", "c", "d")
    norm, max_abs, zero, nonfinite, numel, present = _random_rows(rng, 37, 4)
    stepwise, batched = LayerTotals(), LayerTotals()
    for r in range(37):
        cols = np.flatnonzero(present[r])
        sel = tuple(names[c] for c in cols)
        if sel:
            stepwise.update(sel, *(m[r, cols] for m in (norm, max_abs, zero, nonfinite, numel)))
    batched.update_rows(names, norm, max_abs, zero, nonfinite, numel, present)
    for key in LayerTotals._FIELDS:
        a = stepwise.data[key][[stepwise.columns.index[n] for n in names]]
        np.testing.assert_array_equal(a, batched.data[key][:4], err_msg=key)


@pytest.mark.parametrize("bins", [2, 4, 128])
def test_batched_flow_history_equals_per_step_adds_across_merges(bins: int) -> None:
    rng = np.random.default_rng(bins)
    norm = _random_rows(rng, 45, 3)[0]
    steps = np.arange(45) * 3
    stepwise, batched = FlowHistory(bins), FlowHistory(bins)
    for r in range(45):
        stepwise.add(int(steps[r]), ("a", "b", "c"), norm[r])
    batched.add_rows(steps[:20], ("a", "b", "c"), norm[:20])
    batched.add_rows(steps[20:], ("a", "b", "c"), norm[20:])
    a, b = stepwise.snapshot(), batched.snapshot()
    assert a[0] == b[0] and a[1] == b[1] and batched.stride == stepwise.stride
    np.testing.assert_array_equal(a[2], b[2])


def test_batched_host_reductions_equal_one_array_at_a_time() -> None:
    rng = np.random.default_rng(2)
    arrays = [rng.normal(0, 1e-2, 1000) for _ in range(5)] + [rng.normal(0, 1, 7), np.zeros(0)]
    arrays[1][::3] = 0.0
    arrays[2][5] = np.nan  # the scaled path, inside a batched group
    arrays[3] *= 1e200
    assert grad_stats_from_arrays(arrays) == [grad_stats_from_array(a) for a in arrays]


def test_window_median_fast_path_equals_nanmedian() -> None:
    rng = np.random.default_rng(3)
    full = rng.normal(size=(20, 6))
    holes = full.copy()
    holes[rng.random(holes.shape) < 0.3] = np.nan
    holes[:, 2] = np.nan  # an all-absent column
    for values in (full, full[:7], holes):  # no NaN (the fast path), odd rows, holes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice"
            expected = np.nanmedian(values, axis=0)
        np.testing.assert_array_equal(window_median(values), expected)


def test_median_helper_equals_np_median() -> None:
    rng = np.random.default_rng(4)
    for n in (1, 2, 5, 10, 40):
        values = rng.lognormal(0, 5, n)
        assert median(values) == float(np.median(values))
    assert median(np.array([1.0, np.inf])) == float(np.median([1.0, np.inf]))
    assert math.isnan(median(np.array([1.0, np.nan, 2.0])))
    assert math.isnan(median(np.zeros(0)))

"""A NaN born in the forward pass (an ``exp`` that overflows) ranks ``stable_activation``
first; a NaN born in the loss keeps ``stable_loss`` first (issue #14). Hand-built
StepStats through the Analyzer: no framework."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from synth import grad_step

from gradwatch import Analyzer, StepStats
from gradwatch.nonfinite_onset import NonfiniteOnset, onset_of
from gradwatch.rows import ACT_ROW_FIELDS, ACT_ROWS, step_stats_from_rows

NAN_STEP = 30
LAYERS = 3


def _step(
    step: int,
    norm: float,
    acts: dict[str, tuple[str, int]] | None,
    nonfinite_grads: bool = False,
) -> StepStats:
    """One step of a 3-layer run; ``acts`` maps a site to ``(kind, NaN/Inf entries)``
    (``None``: no activation sampled at this step)."""
    sites = acts or {}
    s = grad_step(
        step,
        [norm] * LAYERS,
        nonfinite=1 if nonfinite_grads else 0,
        acts={name: (kind, 0.0, 0.0, 0.0) for name, (kind, _) in sites.items()},
    )
    return dataclasses.replace(s, act_nonfinite=tuple(n for _, n in sites.values()))


def _norm(step: int, grow: bool) -> float:
    """1.0, or with ``grow`` 20x a step over the last 3 finite steps (8000x), as the exp
    scenario's norm rose 2978x just before its NaN."""
    return 20.0 ** max(0, step - (NAN_STEP - 4)) if grow else 1.0


def _run(
    onset_acts: dict[str, tuple[str, int]] | None,
    *,
    grow: bool,
    later_acts: dict[str, tuple[str, int]] | None = None,
    steps_after: int = 20,
) -> Analyzer:
    """Finite steps up to NAN_STEP (see :func:`_norm`), then NaN gradients from
    NAN_STEP on; the activations of the onset step are ``onset_acts``, those after it
    ``later_acts`` (the weights are NaN by then)."""
    an = Analyzer(strict=True)
    finite = {"1#exp:0": ("exp", 0), "relu0": ("relu", 0)}
    for step in range(NAN_STEP):
        an.observe_stats(_step(step, _norm(step, grow), finite))
    an.observe_stats(_step(NAN_STEP, math.nan, onset_acts, nonfinite_grads=True))
    for step in range(NAN_STEP + 1, NAN_STEP + 1 + steps_after):
        an.observe_stats(_step(step, math.nan, later_acts, nonfinite_grads=True))
    return an


def _fixes(an: Analyzer, rule: str) -> list[str]:
    finding = next(f for f in an.findings if f.rule == rule)
    return [f.id for f in finding.fixes]


EXP_OVERFLOWED = {"1#exp:0": ("exp", 20), "relu0": ("relu", 640)}


@pytest.mark.parametrize("grow", [True, False])
def test_an_exp_output_nonfinite_at_the_onset_ranks_stable_activation_first(grow: bool) -> None:
    an = _run(EXP_OVERFLOWED, grow=grow, later_acts=EXP_OVERFLOWED)
    assert _fixes(an, "nonfinite_gradient")[0] == "stable_activation"
    finding = next(f for f in an.findings if f.rule == "nonfinite_gradient")
    assert "1#exp:0 (exp)" in finding.message and f"step {NAN_STEP}" in finding.message
    assert finding.evidence["nonfinite_onset_step"] == NAN_STEP
    assert finding.evidence["activation_nonfinite_entries"] == 20
    assert finding.evidence["activations_nonfinite_at_onset"] == 2


def test_the_explosion_before_an_exp_overflow_is_the_activation_too() -> None:
    # The spike at the last finite step opens exploding_gradient after the onset (its
    # persistence is 5 steps), as in the exp scenario.
    an = _run(EXP_OVERFLOWED, grow=True, later_acts=EXP_OVERFLOWED)
    finding = next(f for f in an.findings if f.rule == "exploding_gradient")
    assert finding.last_step > NAN_STEP
    assert _fixes(an, "exploding_gradient")[0] == "stable_activation"
    finite = {"1#exp:0": ("exp", 0), "relu0": ("relu", 0)}
    loss_born = _run(finite, grow=True, later_acts=EXP_OVERFLOWED)
    assert _fixes(loss_born, "exploding_gradient")[0] != "stable_activation"


def test_all_outputs_finite_at_the_onset_is_the_loss_even_if_nan_weights_follow() -> None:
    # log(0) in the loss: the forward pass was finite; afterwards the NaN weights make
    # every output NaN, which says nothing of where the NaN was born.
    finite = {"1#exp:0": ("exp", 0), "relu0": ("relu", 0)}
    an = _run(finite, grow=False, later_acts=EXP_OVERFLOWED)
    assert _fixes(an, "nonfinite_gradient")[:2] == ["stable_loss", "stable_activation"]
    grown = _run(finite, grow=True, later_acts=EXP_OVERFLOWED)
    assert _fixes(grown, "nonfinite_gradient")[0] != "stable_activation"


def test_a_relu_output_nonfinite_at_the_onset_had_a_nonfinite_input() -> None:
    # A ReLU is Inf only when the layer before it overflowed (a large init): the
    # explosion's cause, not the activation's.
    overflowed_before = {"relu0": ("relu", 640), "relu1": ("relu", 3000)}
    an = _run(overflowed_before, grow=True, later_acts=overflowed_before)
    assert _fixes(an, "nonfinite_gradient")[0] != "stable_activation"
    assert "forward pass made it" not in next(
        f.message for f in an.findings if f.rule == "nonfinite_gradient"
    )


def test_an_onset_on_an_unsampled_step_is_not_judged_forward_born() -> None:
    # Sparse sampling: the onset step carries no activations, the next sampled step
    # runs on NaN weights already.
    an = _run(None, grow=False, later_acts=EXP_OVERFLOWED)
    assert _fixes(an, "nonfinite_gradient")[0] == "stable_loss"


def test_an_adapter_that_does_not_count_is_not_judged_forward_born() -> None:
    an = Analyzer(strict=True)
    for step in range(NAN_STEP):
        an.observe_stats(_step(step, 1.0, {"1#exp:0": ("exp", 0)}))
    uncounted = dataclasses.replace(
        _step(NAN_STEP, math.nan, {"1#exp:0": ("exp", 0)}, nonfinite_grads=True),
        act_nonfinite=(),
    )
    an.observe_stats(uncounted)
    assert _fixes(an, "nonfinite_gradient")[0] == "stable_loss"


def test_one_nonfinite_exp_entry_is_enough_and_zero_is_not() -> None:
    one = _run({"1#exp:0": ("exp", 1)}, grow=False)
    none = _run({"1#exp:0": ("exp", 0)}, grow=False)
    assert _fixes(one, "nonfinite_gradient")[0] == "stable_activation"
    assert _fixes(none, "nonfinite_gradient")[0] == "stable_loss"


def test_the_onset_is_kept_after_it_leaves_the_window() -> None:
    an = _run(EXP_OVERFLOWED, grow=False, later_acts=EXP_OVERFLOWED, steps_after=150)
    assert an.stats.nonfinite_onset is not None and an.stats.nonfinite_onset.step == NAN_STEP
    assert an.stats.run.view().steps[0] > NAN_STEP  # out of the 64-step window
    assert _fixes(an, "nonfinite_gradient")[0] == "stable_activation"


def test_an_unknown_kind_may_overflow_and_tanh_cannot() -> None:
    def onset(kind: str) -> NonfiniteOnset:
        s = _step(0, math.nan, {"act": (kind, 4)}, nonfinite_grads=True)
        return onset_of(s)

    assert onset("other").overflowed == ("act",)
    assert onset("exp").overflowed == ("act",)
    assert onset("tanh").forward_born and onset("tanh").overflowed == ()


# --- the row and StepStats layout -----------------------------------------------------


def test_a_row_with_no_finite_entry_is_seen_with_its_count() -> None:
    nan = math.nan
    rows = np.array([[0.0, 0.0, 0.0, 0.0], [nan, nan, nan, 64.0], [nan] * ACT_ROWS])
    s = step_stats_from_rows(
        3,
        act_layers=("a", "b", "unseen"),
        act_kinds=("relu", "exp", "relu"),
        act_is_output=(False, False, False),
        act_rows=rows,
    )
    assert ACT_ROW_FIELDS[-1] == "nonfinite"
    assert s.act_layers == ("a", "b") and s.act_nonfinite == (0, 64)
    assert math.isnan(s.act_inactive_frac[1])


def test_act_nonfinite_is_checked_with_its_family_or_left_empty() -> None:
    base = {
        "step": 0,
        "act_layers": ("a", "b"),
        "act_kinds": ("exp", "relu"),
        "act_inactive_frac": (0.0, 0.0),
        "act_dead_frac": (0.0, 0.0),
        "act_tail_frac": (0.0, 0.0),
        "act_is_output": (False, False),
    }
    assert StepStats(**base).act_nonfinite == ()
    assert StepStats(**base, act_nonfinite=(1, 0)).act_nonfinite == (1, 0)
    with pytest.raises(ValueError, match="act_nonfinite has 1 entries, act_layers has 2"):
        StepStats(**base, act_nonfinite=(1,))


def test_observe_counts_nonfinite_activation_entries_from_arrays() -> None:
    an = Analyzer(strict=True)
    y = np.ones((4, 8))
    y[0, :3] = np.inf
    y[1, 0] = np.nan
    an.observe(0, grads={"fc.weight": np.full((2, 2), np.nan)}, activations={"e": (y, "exp")})
    onset = an.stats.nonfinite_onset
    assert onset is not None and onset.entries == (4,) and onset.kinds == ("exp",)

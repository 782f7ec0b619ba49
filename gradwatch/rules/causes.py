"""Which cause the evidence points at: small functions of a :class:`RuleContext` that the
rules' fix ranking reads, so the first fix addresses the cause, not only the symptom.

* init scale: each layer's weight RMS times sqrt(fan-in) (1 is LeCun/Xavier's scale,
  sqrt(2) He's), from :attr:`RuleContext.initial_scales` (fan-in from the adapter's
  :class:`~gradwatch.layer_info.LayerInfo` when given, else inferred from sizes);
* bias size: a bias RMS beyond what any initializer gives;
* learning rate: the weights change by a large part of their size in one step, or the
  gradient rose only after ordinary first steps;
* recurrence: recurrent layers, and whether they are plain (ungated) RNNs;
* activation kinds seen (:attr:`RuleContext.hidden_kinds`);
* an activation that overflowed: at the run's first step with NaN/Inf gradients, an
  activation whose kind can overflow (``exp``) already had NaN/Inf outputs
  (:attr:`RuleContext.nonfinite_onset`).

Example:
    >>> init_fix(frozenset({"tanh"}))
    'xavier_init'
"""

from __future__ import annotations

import math

import numpy as np

from gradwatch.activations import SQUASHING
from gradwatch.fixes import Fix, fix, fixes
from gradwatch.rules.base import RuleContext

# weight RMS x sqrt(fan_in) below this is too small: under 70% of the smallest scale a
# framework ships by default (torch's kaiming_uniform(a=sqrt(5)): 1/sqrt(3) = 0.577).
SMALL_INIT = 0.4
# above this too large: over twice He's sqrt(2), the largest default (He et al. 2015).
LARGE_INIT = 3.0
# A bias RMS above this pins units: He/Xavier keep pre-activations near unit variance
# and every framework initialises biases to 0 (torch at most 1/sqrt(fan_in)), so a bias
# of 2 holds a unit two standard deviations off centre.
LARGE_BIAS = 2.0
# One step changing the weights' norm by a quarter of itself: healthy updates are ~1e-3
# of the weights (Karpathy, CS231n); our zoo's healthy runs stay under 0.031 (Adam 1e-2
# on an LSTM), SGD at lr=200 on an LSTM changes it 4.6x.
WEIGHT_JUMP = 0.25
# First steps with gradients this many times the weights: huge from the start
# (ExplodingGradient.relative_threshold's principle).
HUGE_AT_START = 100.0
# The gradient norm this many times the initial one counts as having risen.
RISE = 10.0

_RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "softplus"})


def init_scales(ctx: RuleContext) -> dict[str, float]:
    """weight RMS x sqrt(fan-in) per non-recurrent layer group whose fan-in is known."""
    out: dict[str, float] = {}
    for group, scale in ctx.initial_scales.items():
        info = ctx.layer_info.get(group)
        fan_in = info.fan_in if info is not None and info.fan_in is not None else scale.fan_in
        recurrent = scale.recurrent or (info is not None and info.recurrent)
        if fan_in is None or recurrent or not math.isfinite(scale.weight_rms):
            continue
        out[group] = scale.weight_rms * math.sqrt(fan_in)
    return out


def init_scale(ctx: RuleContext) -> float | None:
    """The median over layers of :func:`init_scales`, or ``None`` when none is known."""
    scales = list(init_scales(ctx).values())
    return float(np.median(scales)) if scales else None


def init_too_small(ctx: RuleContext) -> bool:
    """The weights started far below the He/Xavier scale for their fan-in."""
    scale = init_scale(ctx)
    return scale is not None and scale < SMALL_INIT


def init_too_large(ctx: RuleContext) -> bool:
    """The weights started far above the He/Xavier scale for their fan-in."""
    scale = init_scale(ctx)
    return scale is not None and scale > LARGE_INIT


def large_bias_groups(ctx: RuleContext) -> tuple[str, ...]:
    """Layer groups whose bias started with an RMS above :data:`LARGE_BIAS`."""
    return tuple(
        g
        for g, s in ctx.initial_scales.items()
        if s.bias_rms is not None and s.bias_rms > LARGE_BIAS
    )


def recurrent_groups(ctx: RuleContext) -> tuple[str, ...]:
    """Layer groups of recurrent layers (adapter's word or the framework's weight names)."""
    told = {g for g, info in ctx.layer_info.items() if info.recurrent}
    seen = {g for g, s in ctx.initial_scales.items() if s.recurrent}
    return tuple(sorted(told | seen))


def plain_recurrence(ctx: RuleContext) -> bool:
    """A recurrent layer without gates (``nn.RNN``, ``SimpleRNN``) is in the model."""
    kinds = {info.kind for info in ctx.layer_info.values() if info.recurrent}
    if kinds & {"RNN", "SimpleRNN"}:
        return True
    return any(s.recurrent and s.gates == 1 for s in ctx.initial_scales.values())


def weight_jump(ctx: RuleContext, window: int | None = None) -> float:
    """The largest relative change of the total weight norm between two consecutive
    steps among the newest ``window`` observed steps (all when ``None``): a lower bound
    on |update| / |weights|; 0 without weight norms."""
    view = ctx.grads
    rows = slice(max(0, view.n_steps - window), None) if window else slice(None)
    params = view["param_norm"][rows]
    steps = view.steps[rows]
    if steps.size < 2 or params.size == 0:
        return 0.0
    present = ~np.isnan(params)
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.sqrt(np.nansum(np.where(present, params, 0.0) ** 2, axis=1))
    same_columns = (present[1:] == present[:-1]).all(axis=1)
    consecutive = np.diff(steps) == 1
    before, after = total[:-1], total[1:]
    ok = consecutive & same_columns & np.isfinite(before) & np.isfinite(after) & (before > 0)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(after[ok] - before[ok]) / before[ok]))


def rose_after_ordinary_start(ctx: RuleContext) -> bool:
    """The gradient was ordinary in the first steps (not huge against the weights) and
    rose over :data:`RISE` times its initial norm later: a step did it, not the init."""
    baseline = ctx.baseline_total_norm
    initial = ctx.initial_grad_to_weight
    if baseline is None or baseline <= 0 or (initial is not None and initial > HUGE_AT_START):
        return False
    totals = ctx.run["total_norm"][:, 0]
    totals = totals[np.isfinite(totals)]
    return bool(totals.size and totals.max() > RISE * baseline)


def overflowed_activations(ctx: RuleContext) -> tuple[str, ...]:
    """The activation sites that turned NaN/Inf in the forward pass of the run's first
    step with NaN/Inf gradients, of a kind that overflows a finite input (``exp``):
    see :attr:`~gradwatch.nonfinite_onset.NonfiniteOnset.overflowed`."""
    onset = ctx.nonfinite_onset
    return onset.overflowed if onset is not None else ()


def explosion_cause(ctx: RuleContext, window: int | None = None) -> str:
    """``"activation"``, ``"init"``, ``"learning_rate"``, ``"recurrence"`` or
    ``"unknown"``: what an explosion's evidence points at, the strongest evidence first.
    An activation that overflowed comes first: exp's derivative is its own output, so
    it amplifies the gradient as its input grows, whatever set the input growing."""
    if overflowed_activations(ctx):
        return "activation"
    if init_too_large(ctx):
        return "init"
    if weight_jump(ctx, window) > WEIGHT_JUMP:
        return "learning_rate"
    if recurrent_groups(ctx):
        return "recurrence"
    if rose_after_ordinary_start(ctx) and init_scale(ctx) is not None:
        return "learning_rate"
    return "unknown"


def init_fix(hidden_kinds: frozenset[str]) -> str:
    """The init fix that fits the activations seen: Xavier for sigmoid/tanh only, He for
    ReLU-family only, and the activation-neutral text otherwise."""
    squashing = bool(hidden_kinds & SQUASHING)
    relu = bool(hidden_kinds & _RELU_FAMILY)
    if squashing and not relu:
        return "xavier_init"
    if relu and not squashing:
        return "he_init"
    return "init_for_activation"


def explosion_fixes(
    ctx: RuleContext, clip: Fix, init_first: bool, window: int | None = None
) -> tuple[Fix, ...]:
    """The fixes of an explosion, ranked by :func:`explosion_cause`; ``clip`` is the
    run's calibrated clipping fix. An unknown cause keeps the symptom's own order:
    initialization first when ``init_first`` (huge from the start, or amplified layer
    after layer), clipping first otherwise."""
    cause = explosion_cause(ctx, window)
    init = fix(init_fix(ctx.hidden_kinds))
    lower = fix("lower_learning_rate")
    if cause == "activation":
        return (fix("stable_activation"), clip, lower)
    if cause == "init":
        return (init, clip, lower)
    if cause == "learning_rate":
        return (lower, clip, init)
    if cause == "recurrence":
        # Clip first (Pascanu et al. 2013); a plain RNN is better replaced by a gated one.
        gated = (fix("gated_recurrence"),) if plain_recurrence(ctx) else ()
        return (clip, *gated, lower)
    others = fixes("lower_learning_rate", "he_init", "xavier_init")
    if init_first:  # clipping would only mask it
        return (others[1], clip, others[2], others[0])
    return (clip, *others)


__all__ = [
    "HUGE_AT_START",
    "LARGE_BIAS",
    "LARGE_INIT",
    "RISE",
    "SMALL_INIT",
    "WEIGHT_JUMP",
    "explosion_cause",
    "explosion_fixes",
    "init_fix",
    "init_scale",
    "init_scales",
    "init_too_large",
    "init_too_small",
    "large_bias_groups",
    "overflowed_activations",
    "plain_recurrence",
    "recurrent_groups",
    "rose_after_ordinary_start",
    "weight_jump",
]

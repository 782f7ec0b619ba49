"""``exploding_gradient``: gradient norms blow up across layers or across steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.fixes import clipping_fix
from gradwatch.rules.base import (
    Rule,
    RuleContext,
    Symptom,
    format_layers,
    median,
    nanmax,
    window_median,
)
from gradwatch.rules.causes import WEIGHT_JUMP, explosion_fixes, weight_jump

# The usual default max-norm (fairseq, HF Trainer) when the run offers nothing to calibrate on.
_DEFAULT_MAX_NORM = 1.0


@dataclass(frozen=True)
class ExplodingGradient(Rule):
    """Flags gradient norms that grow geometrically backwards through the layers, or
    grow without bound from step to step.

    Two signals, either of which fires:

    * **across layers**: the first live group's median norm is more than
      ``ratio_threshold`` times the last group's (AUTOTRAINER's rule: backprop
      amplifies the signal layer after layer);
    * **across steps**: the median total norm of the newest quarter of the window is
      more than ``growth_factor`` times the median of its oldest quarter, or than the
      run's initial norm (an explosion inside the first steps leaves no healthy
      window to compare with);
    * **in the weights**: one step changed the norm of the weights by more than
      ``weight_jump`` of itself (gradient times learning rate exploded, even when the
      gradient norm itself stays moderate, as an LSTM under SGD at lr=200 does).

    Args:
        ratio_threshold: first/last norm ratio above which gradients explode.
            Defaults to ``70`` (AUTOTRAINER, Zhang et al., ICSE 2021).
        spike_factor: a single total norm this many times the median of the norms
            before it in the window counts as explosive. Defaults to ``100`` (our zoo:
            a ReLU RNN with recurrent gain 1.5 spikes 125x at step 31, the classic
            cliff of Pascanu et al. 2013; healthy zoo runs stay under 15x).
        relative_threshold: median over layers of |g| / |w| (gradient norm over the
            norm of the weights it updates) above which gradients are explosive from
            the start, when the adapter reports weight norms. Defaults to ``100``:
            healthy updates move weights ~1e-3 of their size per step (Karpathy,
            CS231n); at a typical SGD learning rate of 1e-2 such a gradient moves each
            layer by its own size, 1000x that. Catches large initialization, where
            norms are huge but neither grow nor differ between layers (N(0, 1) on
            width 32 in Keras: ~700).
        growth_factor: total-norm growth inside the window that counts as explosive.
            Defaults to ``100`` (two orders of magnitude in ``window`` steps; healthy
            runs change norm by far less, see the scenario zoo).
        weight_jump: relative one-step change of the total weight norm above which
            the updates explode. Defaults to
            :data:`gradwatch.rules.causes.WEIGHT_JUMP` (``0.25``: healthy updates are
            ~1e-3 of the weights, Karpathy CS231n; our healthy zoo runs stay under 0.031).
        window: steps looked at. Defaults to ``40`` so the growth signal compares two
            10-step quarters.
        hysteresis: once active, thresholds are relaxed by this factor. Defaults to ``2``.

    Example:
        >>> ExplodingGradient(growth_factor=1e3).growth_factor
        1000.0
    """

    id = "exploding_gradient"

    ratio_threshold: float = 70.0
    growth_factor: float = 100.0
    spike_factor: float = 100.0
    relative_threshold: float = 100.0
    weight_jump: float = WEIGHT_JUMP
    window: int = 40
    persistence: int = 5
    hysteresis: float = 2.0

    def check(self, ctx: RuleContext) -> Symptom | None:
        relax = self.hysteresis if ctx.active else 1.0
        view = ctx.grads
        rows = slice(max(0, view.n_steps - self.window), None)
        norm = window_median(view["norm"][rows])
        live = np.flatnonzero(~np.isnan(norm) & (norm > 0))
        layer_ratio = float(norm[live[0]] / norm[live[-1]]) if live.size >= 2 else 1.0
        weights = window_median(view["param_norm"][rows])
        weighed = live[np.isfinite(weights[live]) & (weights[live] > 0)]
        # The median over layers: a zero-initialised layer (ReZero, Fixup) is not a cause.
        relative = median(norm[weighed] / weights[weighed]) if weighed.size else 0.0
        total = ctx.run["total_norm"][rows, 0]
        total = total[np.isfinite(total)]
        growth = 1.0
        quarter = max(1, self.window // 4)
        baseline = ctx.baseline_total_norm
        # Also with fewer finite norms than a quarter: the run went non-finite (our zoo:
        # N(0, 0.5) init grows the norm 3e13x in 4 steps, then NaN).
        if total.size >= min(quarter, 2):
            late = median(total[-quarter:])
            early = median(total[:quarter]) if total.size >= 2 * quarter else late
            references = [r for r in (early, baseline) if r is not None and r > 0]
            growth = max((late / r for r in references), default=1.0)
        spike = 1.0
        peak = int(np.argmax(total)) if total.size else 0
        if peak >= 3:
            before = median(total[:peak])
            spike = float(total[peak]) / before if before > 0 else 1.0
        by_layers = layer_ratio > self.ratio_threshold / relax
        by_size = relative > self.relative_threshold / relax
        by_spike = spike > self.spike_factor / relax
        by_steps = growth > self.growth_factor / relax or by_spike
        jump = weight_jump(ctx, self.window)
        by_weights = jump > self.weight_jump / relax
        if not (by_layers or by_steps or by_size or by_weights):
            return None
        if by_layers:
            cut = norm[live[-1]] * math.sqrt(self.ratio_threshold / relax)
            affected = tuple(view.columns[i] for i in live if norm[i] > cut)
            message = (
                f"Gradient norms grow {layer_ratio:.3g}x from the last layer back to the "
                f"first ({format_layers(affected)}), so early weights take huge steps."
            )
        elif by_size and not by_steps:
            big = tuple(view.columns[i] for i in weighed if norm[i] > weights[i])
            affected = big or tuple(view.columns[i] for i in weighed)
            message = (
                f"Gradients are {relative:.3g}x the size of the weights they update, so "
                f"any ordinary learning rate throws each layer far off in one step."
            )
        elif by_weights and not by_steps:
            affected = tuple(view.columns[i] for i in weighed) or tuple(
                view.columns[i] for i in live
            )
            message = (
                f"One optimizer step changed the size of the weights by {jump:.0%}; "
                f"the updates are exploding and throw the model far off."
            )
        elif by_spike and not growth > self.growth_factor / relax:
            affected = tuple(view.columns[i] for i in live)
            message = (
                f"The total gradient norm spiked {spike:.3g}x above its typical level; "
                f"one such step can throw the weights far off."
            )
        else:
            affected = tuple(view.columns[i] for i in live)
            message = (
                f"The total gradient norm grew {growth:.3g}x above its healthy level "
                f"and is heading for Inf/NaN."
            )
        latest = float(total[-1]) if total.size else math.nan
        evidence = {
            "first_last_norm_ratio": layer_ratio,
            "norm_growth": growth,
            "norm_spike": spike,
            "grad_to_weight_ratio": relative,
            "total_norm": latest,
            "max_layer_norm": float(nanmax(norm[live])) if live.size else math.nan,
            "weight_norm_jump": jump,
        }
        # Huge from the very first steps or amplified layer after layer: the
        # initialization is the cause, and the first steps are no healthy scale to
        # calibrate clipping on. Huge only later (a learning rate too high): clip.
        initial = ctx.initial_grad_to_weight
        huge_at_start = initial is not None and initial > self.relative_threshold
        init_cause = by_layers or (by_size and huge_at_start)
        calibrated = by_steps and not init_cause and baseline is not None and baseline > 0
        max_norm = 2.0 * baseline if calibrated and baseline is not None else _DEFAULT_MAX_NORM
        evidence["suggested_max_norm"] = max_norm
        clip = clipping_fix(max_norm, calibrated)
        ranked = explosion_fixes(ctx, clip, init_cause, self.window)
        score = max(
            jump / self.weight_jump if self.weight_jump > 0 else math.inf,
            layer_ratio / self.ratio_threshold,
            growth / self.growth_factor,
            spike / self.spike_factor,
            relative / self.relative_threshold,
        )
        return Symptom(affected, "warning", message, evidence, ranked, score=score)

"""``vanishing_gradient``: the first layers get a tiny fraction of the last layers' gradient,
or the first time steps of a plain RNN a tiny fraction of its last time step's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.activations import SQUASHING
from gradwatch.fixes import Fix, fixes
from gradwatch.rules.base import (
    Rule,
    RuleContext,
    Symptom,
    format_layers,
    recent_rows,
    window_median,
)
from gradwatch.rules.causes import init_fix, init_too_small

_RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "softplus"})
# Recurrent layers without gates (LayerInfo.kind as torch and Keras spell them).
_PLAIN_RECURRENT = frozenset({"RNN", "SimpleRNN"})


@dataclass(frozen=True)
class VanishingGradient(Rule):
    """Flags a gradient-norm collapse from the last layer group back to the first.

    Fires when, over the window median, the first live layer group's gradient norm is
    below ``ratio_threshold`` times the last group's **and** below
    ``first_norm_threshold`` in absolute terms (AUTOTRAINER's rule), or when the first
    group's mean |g| is below ``mean_abs_threshold`` (SageMaker Debugger's rule) while
    the last group's is ``1 / ratio_threshold`` times larger, or when the ratio is
    below ``severe_ratio_threshold`` whatever the absolute scale (the absolute floor
    depends on the loss reduction and batch size; five orders of magnitude do not).
    Gradients that are tiny
    everywhere (a converged model) are not vanishing: the rule is relational.

    Frozen layers (no gradient) are left out. Groups whose gradients are mostly exact
    zeros (``zero_frac >= dead_zero_frac``) are dead, not vanishing, and are left to
    ``dead_relu``.

    Through time: for a plain (ungated) recurrent layer (``LayerInfo.kind`` ``"RNN"`` or
    ``"SimpleRNN"``) whose adapter measured it (``RuleContext.time``), it also fires when
    the window median of ``time_grad_first / time_grad_last``, the gradient reaching the
    start of the sequence against the one at its end (RMS dL/dx_1 / RMS dL/dx_T in
    torch, dL/dh_0 / dL/dy_T in Keras), is below ``time_ratio_threshold``, even when every
    parameter's norm looks normal. A plain RNN multiplies the gradient by at most
    ||W_hh|| x max|tanh'| per step back (Bengio, Simard & Frasconi 1994; Pascanu et al.
    2013), and only a recurrent weight at the edge of exploding escapes that. Gated
    layers (LSTM, GRU) are not judged so: their gates set the per-step factor and learn
    it, and a small ratio is what they learned to forget (our scenarios: an LSTM and a GRU
    that learn a 20-step task over 200 steps measure window medians of 1e-42 to 2e-6).

    Args:
        ratio_threshold: first/last norm ratio below which gradients vanish.
            Defaults to ``1e-3`` (AUTOTRAINER, Zhang et al., ICSE 2021).
        first_norm_threshold: first-group norm below which it learns too slowly.
            Defaults to ``1e-4`` (AUTOTRAINER).
        severe_ratio_threshold: ratio below which no absolute floor is needed.
            Defaults to ``1e-5`` (our scenarios: healthy nets stay above 1e-2).
        decay_per_layer: a steady per-layer shrink factor of the per-entry (RMS)
            gradient, fitted across at least ``min_decay_depth`` layer groups, below
            which gradients vanish even when no single ratio is extreme. Defaults to
            ``0.7``: He et al. (2015) initialise so this factor is 1; sigmoid stacks
            (derivative <= 0.25) fall below it, as Glorot & Bengio (2010) measured.
        decay_ratio: and the first/last RMS ratio must be below this. Defaults to
            ``0.05`` (over an order of magnitude end to end).
        min_decay_depth: layer groups needed for the decay fit. Defaults to ``6``.
        mean_abs_threshold: first-group mean |g| floor. Defaults to ``1e-7``
            (SageMaker Debugger ``vanishing_gradient``).
        dead_zero_frac: zero-entry fraction above which a group counts as dead.
            Defaults to ``0.7`` (AUTOTRAINER's dying-ReLU threshold).
        time_ratio_threshold: first/last time-step gradient ratio (RMS of dL/d(input))
            of a plain RNN below which gradients vanish through time. Defaults to
            ``1e-5``, the five orders of magnitude of ``severe_ratio_threshold`` (our
            scenarios' window medians: a 200-step tanh RNN 2e-8 and below; plain RNNs
            that keep their gradient, 2e-3 and above over 10 steps, 1e-3 and above for
            a ReLU RNN over 32 steps).
        min_time_samples: sampled steps with a through-time measurement needed in the
            window. Defaults to ``3``.
        hysteresis: once active, thresholds are relaxed by this factor. Defaults to ``3``.

    Example:
        >>> VanishingGradient(ratio_threshold=1e-4).ratio_threshold
        0.0001
    """

    id = "vanishing_gradient"
    needs_finite_weights = True

    ratio_threshold: float = 1e-3
    first_norm_threshold: float = 1e-4
    severe_ratio_threshold: float = 1e-5
    decay_per_layer: float = 0.7
    decay_ratio: float = 0.05
    min_decay_depth: int = 6
    mean_abs_threshold: float = 1e-7
    dead_zero_frac: float = 0.7
    time_ratio_threshold: float = 1e-5
    min_time_samples: int = 3
    hysteresis: float = 3.0

    def check(self, ctx: RuleContext) -> Symptom | None:
        by_layers = self._check_layers(ctx)
        through_time = self._check_through_time(ctx)
        if by_layers is None or through_time is None:
            return by_layers or through_time
        return through_time if through_time.score >= by_layers.score else by_layers

    def _check_through_time(self, ctx: RuleContext) -> Symptom | None:
        """The through-time branch (see the class docstring)."""
        view = ctx.time
        plain = [
            i
            for i, name in enumerate(view.columns)
            if (info := ctx.layer_info.get(name)) is not None and info.kind in _PLAIN_RECURRENT
        ]
        if not plain or view.n_steps == 0:
            return None
        rows = recent_rows(view.steps, self.window, self.min_time_samples)
        first = view["grad_first"][rows][:, plain]
        last = view["grad_last"][rows][:, plain]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(
                np.isfinite(first) & np.isfinite(last) & (last > 0), first / last, np.nan
            )
        if int(np.count_nonzero(~np.isnan(ratios).all(axis=1))) < self.min_time_samples:
            return None
        ratio = window_median(ratios)
        length = window_median(view["length"][rows][:, plain])
        relax = self.hysteresis if ctx.active else 1.0
        limit = min(self.time_ratio_threshold * relax, 1.0)
        hit = [k for k in range(len(plain)) if ratio[k] < limit]
        if not hit:
            return None
        worst = min(hit, key=lambda k: float(ratio[k]))
        affected = tuple(view.columns[plain[k]] for k in hit)
        worst_ratio, steps = float(ratio[worst]), int(length[worst])
        # The mean per-step factor of the decay: ratio = factor ** (steps - 1).
        factor = worst_ratio ** (1.0 / max(steps - 1, 1))
        evidence = {
            "through_time_ratio": worst_ratio,
            "time_steps": float(steps),
            "per_step_factor": factor,
            "first_step_grad_rms": float(window_median(first[:, [worst]])[0]),
            "last_step_grad_rms": float(window_median(last[:, [worst]])[0]),
            "layers_affected": float(len(affected)),
        }
        share = "underflows to 0 against" if worst_ratio == 0.0 else f"is {worst_ratio:.1e} of"
        message = (
            f"The gradient reaching the first of {steps} time steps of "
            f"{view.columns[plain[worst]]} {share} the last one's (x{factor:.2f} per step "
            f"back), so the RNN cannot learn from the start of its sequences."
        )
        others = tuple(name for name in affected if name != view.columns[plain[worst]])
        if others:
            message += f" Also in {format_layers(others)}."
        score = -math.log10(max(worst_ratio, 1e-300))
        # A plain RNN: gates keep the gradient through time (or fewer steps to go back).
        return Symptom(
            affected, "warning", message, evidence, fixes("gated_recurrence"), score=score
        )

    def _check_layers(self, ctx: RuleContext) -> Symptom | None:
        """The first-layers-against-last-layers branch (see the class docstring)."""
        view = ctx.grads
        rows = slice(max(0, view.n_steps - self.window), None)
        norm = window_median(view["norm"][rows])
        mean_abs = window_median(view["mean_abs"][rows])
        zero = window_median(view["zero_frac"][rows])
        live = np.flatnonzero(~np.isnan(norm) & ~(zero >= self.dead_zero_frac))
        if live.size < 2:
            return None
        first, last = int(live[0]), int(live[-1])
        if not norm[last] > 0.0:
            return None
        relax = self.hysteresis if ctx.active else 1.0
        ratio_limit = min(self.ratio_threshold * relax, 1.0)
        ratio = float(norm[first] / norm[last])
        by_norm = ratio < ratio_limit and (
            norm[first] < self.first_norm_threshold * relax
            or ratio < self.severe_ratio_threshold * relax
        )
        by_mean = (
            mean_abs[first] < self.mean_abs_threshold * relax
            and mean_abs[last] >= self.mean_abs_threshold / self.ratio_threshold
        )
        depth = int(live.size)
        numel = window_median(view["numel"][rows])[live]
        rms = norm[live] / np.sqrt(np.maximum(numel, 1.0))
        decay, rms_ratio = _rms_decay(rms)
        by_decay = (
            depth >= self.min_decay_depth
            # Hysteresis on the fit stays narrow: 0.7 x 3**0.1 = 0.78 per layer.
            and decay < min(self.decay_per_layer * relax**0.1, 1.0)
            and rms_ratio < min(self.decay_ratio * relax, 1.0)
        )
        if not (by_norm or by_mean or by_decay):
            return None
        if by_norm or by_mean:
            names = [view.columns[i] for i in live[:-1] if norm[i] / norm[last] < ratio_limit]
        else:
            # Name the layers more than sqrt(decay_ratio) below the last one.
            cut = rms[-1] * np.sqrt(self.decay_ratio)
            names = [view.columns[live[i]] for i in range(depth - 1) if rms[i] < cut]
        affected = tuple(names) if names else (view.columns[first],)
        evidence = {
            "first_last_norm_ratio": ratio,
            "first_layer_norm": float(norm[first]),
            "last_layer_norm": float(norm[last]),
            "first_layer_mean_abs": float(mean_abs[first]),
            "per_layer_decay": decay,
            "first_last_rms_ratio": rms_ratio,
            "layers_affected": float(len(affected)),
        }
        message = (
            f"The first layers ({format_layers(affected)}) receive {ratio:.1e} of the last "
            f"layer's gradient norm, so they barely learn."
        )
        # Orders of magnitude lost from the last layer back to the first.
        score = -math.log10(max(min(ratio, rms_ratio), 1e-300))
        return Symptom(affected, "warning", message, evidence, self._fixes(ctx, depth), score=score)

    @staticmethod
    def _fixes(ctx: RuleContext, depth: int) -> tuple[Fix, ...]:
        if init_too_small(ctx):
            # Each layer shrinks the signal both ways: the init scale is the cause.
            init = init_fix(ctx.hidden_kinds)
            return fixes(init, "batch_norm", "leaky_relu", "residual")
        if ctx.hidden_kinds & SQUASHING:
            # Chained sigmoid/tanh derivatives (<= 0.25 each) are the cause: swap them.
            return fixes("leaky_relu", "he_init", "batch_norm", "residual")
        if ctx.hidden_kinds & _RELU_FAMILY:
            # Already ReLU: the depth itself is the problem, so normalise or bypass it.
            order = ("residual", "batch_norm") if depth >= 8 else ("batch_norm", "residual")
            return fixes(*order, "he_init")
        # No activation seen: no fix may assume one ("for ReLU-family layers").
        return fixes("leaky_relu", "init_for_activation", "batch_norm", "residual")


def _rms_decay(rms: np.ndarray) -> tuple[float, float]:
    """``(per-layer factor, first/last ratio)`` of per-entry gradient size; the factor
    is ``10**-slope`` of a least-squares line through log10 RMS over layer index."""
    positive = rms > 0
    if positive.sum() < 2 or not positive[-1]:
        return 1.0, 1.0
    logs = np.log10(rms[positive])
    index = np.flatnonzero(positive).astype(np.float64)
    slope = float(np.polyfit(index, logs, 1)[0])
    ratio = float(rms[0] / rms[-1]) if positive[0] else 0.0
    return 10.0 ** (-slope), ratio

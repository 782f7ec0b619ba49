"""``vanishing_gradient``: the first layers get a tiny fraction of the last layers' gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.activations import SQUASHING
from gradwatch.fixes import Fix, fixes
from gradwatch.rules.base import Rule, RuleContext, Symptom, format_layers, window_median

_RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "softplus"})


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
    hysteresis: float = 3.0

    def check(self, ctx: RuleContext) -> Symptom | None:
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

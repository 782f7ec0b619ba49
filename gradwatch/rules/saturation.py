"""``saturation``: sigmoid/tanh units pushed into their flat tails."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.activations import JUDGED_ON_INPUT, SATURATING_KINDS
from gradwatch.fixes import fixes
from gradwatch.rules.base import (
    Rule,
    RuleContext,
    Symptom,
    format_layers,
    hidden_columns,
    nanmax,
    sampled_median,
)
from gradwatch.rules.causes import init_fix, init_too_large, large_bias_groups


@dataclass(frozen=True)
class Saturation(Rule):
    """Flags hidden layers stuck in their activation's flat tails: sigmoid, tanh and
    their hard variants, ReLU6's top, and the negative tails of GELU, SiLU, ELU and
    softplus (judged on their input, see :mod:`gradwatch.activations`).

    A unit is in a tail when its derivative is below
    :data:`gradwatch.activations.DEFAULT_TAIL_DERIVATIVE_FRACTION` (1%) of its maximum.
    The rule fires when the window median of a hidden layer's tail fraction exceeds
    ``tail_fraction``. The model's output activation is never judged: a sigmoid or
    softmax output saturates on confident predictions, which is the goal.

    Args:
        tail_fraction: fraction of outputs in the tails that makes a layer saturated.
            Defaults to ``0.5`` (more than half the layer, as SageMaker Debugger's
            layer-level activation rules count it).
        min_samples: activation samples needed before judging. Defaults to ``3``.
        sparse_rows: with sparse sampling, the window is ``window`` steps but at least
            this many of the newest samples. Defaults to ``5`` (median of 5 samples:
            one odd batch cannot open a finding).
        hysteresis: once active, the tail fraction may fall by this factor before the
            finding clears. Defaults to ``1.25``.

    Example:
        >>> Saturation(tail_fraction=0.4).tail_fraction
        0.4
    """

    id = "saturation"
    needs_activations = True
    needs_finite_weights = True

    tail_fraction: float = 0.5
    min_samples: int = 3
    sparse_rows: int = 5
    hysteresis: float = 1.25

    def check(self, ctx: RuleContext) -> Symptom | None:
        cols = hidden_columns(ctx, SATURATING_KINDS)
        if not cols:
            return None
        view = ctx.acts
        median = sampled_median(ctx, cols, "tail", self.window, self.min_samples, self.sparse_rows)
        if median is None:
            return None
        relax = self.hysteresis if ctx.active else 1.0
        hit = np.flatnonzero(median > self.tail_fraction / relax)
        if hit.size == 0:
            return None
        layers = tuple(view.columns[cols[i]] for i in hit)
        worst = float(nanmax(median[hit]))
        evidence = {
            "tail_fraction": worst,
            "layers_saturated": float(hit.size),
            "squashing_layers": float(len(cols)),
            "first_layer_tail_fraction": float(median[0]),
        }
        message = (
            f"{worst:.0%} of the outputs of {format_layers(layers)} sit in the flat tails "
            f"of the activation, where the gradient is under 1% of its peak."
        )
        # Strongest at the first layer and far less after it: the raw inputs are too large.
        rest = median[1:]
        input_driven = median[0] > self.tail_fraction and (
            rest.size == 0 or bool(nanmax(rest) < 0.5 * median[0])
        )
        if large_bias_groups(ctx):
            # A large bias pins the units in a tail from the first step (a gate at +8).
            ranked = fixes("bias_init", "xavier_init", "batch_norm")
        elif init_too_large(ctx):
            ranked = fixes(init_fix(ctx.hidden_kinds), "batch_norm", "normalize_inputs")
        elif all(ctx.act_kinds[cols[i]] in JUDGED_ON_INPUT for i in hit):
            # The negative tail of a ReLU-like: pre-activations pushed far below zero.
            ranked = fixes("batch_norm", "he_init", "normalize_inputs")
        elif input_driven:
            ranked = fixes("normalize_inputs", "xavier_init", "batch_norm")
        else:
            ranked = fixes("xavier_init", "batch_norm", "normalize_inputs")
        return Symptom(layers, "warning", message, evidence, ranked, score=worst)

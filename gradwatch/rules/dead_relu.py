"""``dead_relu``: ReLU units stuck at zero for whole batches, so they get no gradient."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.activations import CAN_DIE, DYING_KINDS
from gradwatch.fixes import Fix, fixes
from gradwatch.rules.base import (
    Rule,
    RuleContext,
    Symptom,
    format_layers,
    hidden_columns,
    nanmax,
    sampled_median,
    window_median,
)


@dataclass(frozen=True)
class DeadRelu(Rule):
    """Flags hidden ReLU-family layers where most units are dead.

    A unit is dead in a step when it outputs ``<= 0`` for every sample of the batch
    (so its incoming weights get exactly zero gradient); for GELU, SiLU, ELU and
    softplus, when its derivative is under 1% of its peak for every sample (its input
    is in the flat negative tail, see :mod:`gradwatch.activations`). The rule fires when the
    window median of a layer's dead fraction exceeds ``dead_fraction``. Normal ReLU
    sparsity (20-30% of units idle on a batch) stays well below it.

    Without activation statistics the rule falls back to the gradients: a weight
    group with at least ``zero_grad_fraction`` exact-zero entries is dying
    (AUTOTRAINER). That fallback only runs when no ReLU activation was observed,
    because sparse layers such as embeddings also have many zero gradients.

    Args:
        dead_fraction: fraction of dead units that makes a layer dead. Defaults to
            ``0.5`` (SageMaker Debugger ``dead_relu``: more than 50% of a layer).
        zero_grad_fraction: zero-gradient fraction for the fallback. Defaults to
            ``0.7`` (AUTOTRAINER; DeepDiagnosis uses the same 70% on outputs).
        min_samples: activation samples needed before judging. Defaults to ``3``.
        sparse_rows: with sparse sampling, the window is ``window`` steps but at least
            this many of the newest samples. Defaults to ``5`` (median of 5 samples:
            one odd batch cannot open a finding).
        hysteresis: once active, the dead fraction may fall by this factor before the
            finding clears. Defaults to ``1.25``.

    Example:
        >>> DeadRelu(dead_fraction=0.6).dead_fraction
        0.6
    """

    id = "dead_relu"
    needs_activations = True
    needs_finite_weights = True

    dead_fraction: float = 0.5
    zero_grad_fraction: float = 0.7
    min_samples: int = 3
    sparse_rows: int = 5
    hysteresis: float = 1.25

    def check(self, ctx: RuleContext) -> Symptom | None:
        relax = self.hysteresis if ctx.active else 1.0
        relu_cols = hidden_columns(ctx, DYING_KINDS)
        if relu_cols:
            return self._from_activations(ctx, relu_cols, relax)
        if ctx.hidden_kinds:
            return None  # activations are observed and none can die
        return self._from_gradients(ctx, relax)

    def _from_activations(self, ctx: RuleContext, cols: list[int], relax: float) -> Symptom | None:
        view = ctx.acts
        median = sampled_median(ctx, cols, "dead", self.window, self.min_samples, self.sparse_rows)
        if median is None:
            return None
        hit = np.flatnonzero(median > self.dead_fraction / relax)
        if hit.size == 0:
            return None
        layers = tuple(view.columns[cols[i]] for i in hit)
        worst = float(nanmax(median[hit]))
        inactive = sampled_median(
            ctx, cols, "inactive", self.window, self.min_samples, self.sparse_rows
        )
        evidence = {
            "dead_unit_fraction": worst,
            "layers_dead": float(hit.size),
            "relu_layers": float(len(cols)),
            "inactive_output_fraction": (
                float(nanmax(inactive)) if inactive is not None else float("nan")
            ),
        }
        if all(ctx.act_kinds[cols[i]] in CAN_DIE for i in hit):
            how = "output zero for whole batches, so they get no gradient"
        else:
            how = "sit in the flat negative tail for whole batches (under 1% of the peak slope)"
        message = (
            f"{worst:.0%} of the units in {format_layers(layers)} {how} and have stopped learning."
        )
        severity = "error" if worst >= 0.99 else "warning"
        return Symptom(layers, severity, message, evidence, self._fixes(ctx), score=worst)

    def _from_gradients(self, ctx: RuleContext, relax: float) -> Symptom | None:
        run = ctx.run
        totals = run["total_norm"][run.steps > ctx.step - self.window, 0]
        totals = totals[np.isfinite(totals)]
        if totals.size and not bool(np.any(totals != 0.0)):
            return None  # every gradient is zero: zero_gradient's case, not dying units
        view = ctx.grads
        rows = slice(max(0, view.n_steps - self.window), None)
        zero = window_median(view["zero_frac"][rows])
        numel = window_median(view["numel"][rows])
        # Groups with more than a handful of entries; a 1-element bias is no evidence.
        hit = np.flatnonzero((zero >= self.zero_grad_fraction / relax) & (numel > 16))
        if hit.size == 0:
            return None
        layers = tuple(view.columns[i] for i in hit)
        worst = float(nanmax(zero[hit]))
        evidence = {"zero_gradient_fraction": worst, "layers_dead": float(hit.size)}
        message = (
            f"{worst:.0%} of the gradient entries of {format_layers(layers)} are exactly "
            f"zero, the signature of dead units (ReLU units stuck at zero, if the layers "
            f"use ReLU: no activation was observed)."
        )
        return Symptom(layers, "warning", message, evidence, self._fixes(ctx), score=worst)

    def _fixes(self, ctx: RuleContext) -> tuple[Fix, ...]:
        baseline = ctx.baseline_total_norm
        view = ctx.run
        totals = view["total_norm"][:, 0]
        spike = (
            baseline is not None
            and baseline > 0
            and totals.size > 0
            and bool(nanmax(totals) > 10 * baseline)
        )
        # He init is "for ReLU-family layers": only named once such layers were seen.
        init = "he_init" if ctx.hidden_kinds else "init_for_activation"
        if spike:
            # Units died after a gradient spike: a too-large step knocked them out.
            return fixes("lower_learning_rate", "leaky_relu", init)
        return fixes("leaky_relu", "lower_learning_rate", init)

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
from gradwatch.rules.causes import init_too_small, large_bias_groups


@dataclass(frozen=True)
class DeadRelu(Rule):
    """Flags hidden ReLU-family layers where most units are dead.

    A unit is dead in a step when it outputs ``<= 0`` for every sample of the batch
    (so its incoming weights get exactly zero gradient); for GELU, SiLU, ELU and
    softplus, when its derivative is under 1% of its peak for every sample (its input
    is in the flat negative tail, see :mod:`gradwatch.activations`). The rule fires when the
    window median of a layer's dead fraction exceeds ``dead_fraction``. Normal ReLU
    sparsity (20-30% of units idle on a batch) stays well below it.

    A finding names the *layers* that feed the dead activations when the adapter's
    :class:`~gradwatch.layer_info.LayerInfo` tells them apart (a functional ``F.relu``
    in ``forward()`` is a site such as ``net#relu:0``; the finding names ``conv1``):
    every layer group that feeds a dead site's kind, when each site of that kind is
    dead; else, for ReLU and ReLU6, the groups among them whose gradient also has more
    than ``dead_fraction`` exact zeros (a dead unit's incoming weights get none), if
    there is exactly one per dead site. Otherwise it names the sites.

    Without activation statistics the rule falls back to the gradients: a layer group
    with at least ``zero_grad_fraction`` exact-zero gradient entries is dying
    (AUTOTRAINER), but only when its layer info says it feeds a ReLU or ReLU6 (seen, or
    inferred from the module type): theirs is the only derivative that is exactly 0
    on a half-line, so exact zeros are their signature. Groups with no layer info, or
    that feed anything else, are never blamed: embeddings (rows of tokens not in the
    batch) and recurrent cells (saturated gates after an explosion) also have
    exact-zero gradients. A ReLU-fed layer right after dead units has zero gradients
    too (its dead inputs) and is named with them. The fallback only runs when no
    hidden activation was observed at all.

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

    def _zero_fraction(self, ctx: RuleContext) -> tuple[np.ndarray, np.ndarray]:
        """Window medians of each layer group's exact-zero gradient fraction and size."""
        view = ctx.grads
        rows = slice(max(0, view.n_steps - self.window), None)
        return window_median(view["zero_frac"][rows]), window_median(view["numel"][rows])

    def _feeding_layers(
        self, ctx: RuleContext, cols: list[int], dead: np.ndarray, relax: float
    ) -> tuple[str, ...]:
        """The layer groups that feed the dead sites ``cols[i] for i in dead``, kind by
        kind where the layer info tells them apart, else those sites' names."""
        zero, numel = self._zero_fraction(ctx)
        groups = ctx.grads.columns
        sites = ctx.acts.columns
        named: list[str] = []
        for kind in dict.fromkeys(ctx.act_kinds[cols[i]] for i in dead):
            dead_sites = [sites[cols[i]] for i in dead if ctx.act_kinds[cols[i]] == kind]
            fed = [
                j
                for j, g in enumerate(groups)
                if (info := ctx.layer_info.get(g)) is not None and info.feeds == kind
            ]
            # Every site of this kind dead (the model's output included): all its feeders are.
            all_dead = len(dead_sites) == sum(k == kind for k in ctx.act_kinds)
            if fed and not all_dead and kind in CAN_DIE:
                # A dead ReLU unit's incoming weights get exactly zero gradient.
                fed = [j for j in fed if zero[j] > self.dead_fraction / relax and numel[j] > 16]
                if len(fed) != len(dead_sites):
                    fed = []  # layers after dead inputs have zeros too: not told apart
            elif not all_dead:
                fed = []
            named += [groups[j] for j in fed] if fed else dead_sites
        return tuple(dict.fromkeys(named))

    def _from_activations(self, ctx: RuleContext, cols: list[int], relax: float) -> Symptom | None:
        view = ctx.acts
        median = sampled_median(ctx, cols, "dead", self.window, self.min_samples, self.sparse_rows)
        if median is None:
            return None
        hit = np.flatnonzero(median > self.dead_fraction / relax)
        if hit.size == 0:
            return None
        sites = tuple(view.columns[cols[i]] for i in hit)
        layers = self._feeding_layers(ctx, cols, hit, relax)
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
        where = format_layers(sites)
        if layers != sites:
            where = f"the activations after {format_layers(layers)} ({where})"
        message = f"{worst:.0%} of the units in {where} {how} and have stopped learning."
        severity = "error" if worst >= 0.99 else "warning"
        return Symptom(layers, severity, message, evidence, self._fixes(ctx), score=worst)

    def _from_gradients(self, ctx: RuleContext, relax: float) -> Symptom | None:
        run = ctx.run
        totals = run["total_norm"][run.steps > ctx.step - self.window, 0]
        totals = totals[np.isfinite(totals)]
        if totals.size and not bool(np.any(totals != 0.0)):
            return None  # every gradient is zero: zero_gradient's case, not dying units
        view = ctx.grads
        zero, numel = self._zero_fraction(ctx)
        info = ctx.layer_info
        # Exact zeros are a dead ReLU's signature only in a layer known to feed one.
        relu_fed = np.array(
            [(i := info.get(g)) is not None and i.feeds in CAN_DIE for g in view.columns],
            dtype=bool,
        )
        # Groups with more than a handful of entries; a 1-element bias is no evidence.
        hit = np.flatnonzero(relu_fed & (zero >= self.zero_grad_fraction / relax) & (numel > 16))
        if hit.size == 0:
            return None
        layers = tuple(view.columns[i] for i in hit)
        worst = float(nanmax(zero[hit]))
        evidence = {
            "zero_gradient_fraction": worst,
            "layers_dead": float(hit.size),
            "relu_fed_layers": float(relu_fed.sum()),
        }
        message = (
            f"{worst:.0%} of the gradient entries of {format_layers(layers)} are exactly "
            f"zero, the signature of dead ReLU units (zero for whole batches) in these "
            f"layers or right before them; their activations were not observed."
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
        if large_bias_groups(ctx):
            # A bias far below zero holds the units off from the first step.
            return fixes("bias_init", "leaky_relu", init)
        if init_too_small(ctx):
            # Tiny weights leave the bias to decide the sign of every unit: fix the scale.
            return fixes(init, "leaky_relu", "lower_learning_rate")
        if spike:
            # Units died after a gradient spike: a too-large step knocked them out.
            return fixes("lower_learning_rate", "leaky_relu", init)
        return fixes("leaky_relu", "lower_learning_rate", init)

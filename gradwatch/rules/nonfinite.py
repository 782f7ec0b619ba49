"""``nonfinite_gradient``: NaN or Inf in the gradients, or an AMP scaler skipping steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.fixes import fix, fixes
from gradwatch.rules.base import Rule, RuleContext, Symptom, format_layers
from gradwatch.rules.causes import explosion_fixes, overflowed_activations


@dataclass(frozen=True)
class NonfiniteGradient(Rule):
    """Flags NaN/Inf gradient entries at once, and optimizer steps skipped for them.

    One non-finite gradient that reaches ``optimizer.step()`` poisons the weights, so
    this rule needs no persistence. ``torch.amp.GradScaler`` skipping a step is
    different: it skips a few while it calibrates its scale and again every
    ``growth_interval`` steps by design, so only a sustained rate of skipped steps
    counts.

    Args:
        skipped_fraction: fraction of the window's steps that were skipped, above
            which the scaler is failing. Defaults to ``0.5``.
        min_skipped: and at least this many skipped steps. Defaults to ``8``
            (GradScaler's default ``init_scale=2**16`` can need several halvings
            before fp16 gradients fit; ``backoff_factor=0.5`` per skip).
        explosion_factor: if the last finite total norm exceeded the baseline by this
            factor, the NaN came from an explosion (clipping first); otherwise from the
            loss (a stable loss first). Defaults to ``10``. Either way, when an ``exp``
            (or unknown) activation's output was already NaN/Inf at the run's first
            step with NaN/Inf gradients (:attr:`RuleContext.nonfinite_onset`), the NaN
            was born in the forward pass and a stable activation comes first.
        window: steps looked at for the skip rate. Defaults to ``20``.

    Example:
        >>> NonfiniteGradient().persistence
        1
    """

    id = "nonfinite_gradient"

    skipped_fraction: float = 0.5
    min_skipped: int = 8
    explosion_factor: float = 10.0
    persistence: int = 1
    warmup_steps: int = 0

    def check(self, ctx: RuleContext) -> Symptom | None:
        view = ctx.grads
        run = ctx.run
        # Every step since the previous check, not only the newest one.
        fresh = view.steps > ctx.step - ctx.new_steps
        recent = view["nonfinite"][fresh]
        recent = np.where(np.isnan(recent), 0.0, recent)  # absent layers; counts are never Inf
        nonfinite = recent.sum(axis=0)
        bad = np.flatnonzero(nonfinite > 0)
        # Steps with only a total norm (not sampled per layer) count too.
        run_fresh = run.steps > ctx.step - ctx.new_steps
        bad_steps = run.steps[run_fresh][run["nonfinite"][run_fresh, 0] > 0]
        since = int(bad_steps[0]) if bad_steps.size else None
        rows = slice(max(0, run.n_steps - self.window), None)
        skipped = run["skipped"][rows, 0]
        n_skipped = int(skipped.sum())  # pushed every step: never NaN
        skip_rate = n_skipped / max(1, skipped.size)
        by_skips = n_skipped >= self.min_skipped and skip_rate > self.skipped_fraction
        if bad_steps.size == 0 and not by_skips:
            return None
        layers = tuple(view.columns[i] for i in bad)
        totals = ctx.run["total_norm"][:, 0]
        finite_totals = totals[np.isfinite(totals)]
        last_finite = float(finite_totals[-1]) if finite_totals.size else math.nan
        # The run's initial scale, or failing that the first finite norm in the window.
        baseline = ctx.baseline_total_norm
        if baseline is None and finite_totals.size:
            baseline = float(finite_totals[0])
        exploded = (
            baseline is not None and baseline > 0 and last_finite > self.explosion_factor * baseline
        )
        evidence = {
            "nonfinite_entries": float(nonfinite.sum()),
            "nonfinite_steps": float(bad_steps.size),
            "layers_nonfinite": float(bad.size),
            "skipped_steps_in_window": float(n_skipped),
            "skipped_step_rate": skip_rate,
            "last_finite_total_norm": last_finite,
        }
        if bad.size:
            message = (
                f"Gradients contain NaN/Inf in {format_layers(layers)}; "
                f"the next optimizer step would corrupt the weights."
            )
        elif bad_steps.size:
            message = (
                f"The gradient norm was NaN/Inf at step {int(bad_steps[0])}; "
                f"the optimizer step would corrupt the weights."
            )
        else:
            message = (
                f"The AMP grad scaler skipped {n_skipped} of the last {skipped.size} steps "
                f"because the gradients overflowed, so the model is not training."
            )
        overflowed = overflowed_activations(ctx)
        onset = ctx.nonfinite_onset
        if onset is not None and onset.activations_counted:
            evidence["nonfinite_onset_step"] = float(onset.step)
            evidence["activations_nonfinite_at_onset"] = float(len(onset.sites))
        if overflowed and onset is not None:
            # Born in the forward pass, weights still finite: the activation overflowed.
            site = overflowed[0]
            evidence["activation_nonfinite_entries"] = float(onset.entries[onset.sites.index(site)])
            message += (
                f" The forward pass made it: at step {onset.step} the output of {site} "
                f"({onset.kind_of(site)}) was already NaN/Inf while the weights were finite."
            )
        if exploded:
            # The NaN ended an explosion: rank by what caused the explosion (an overflowed
            # activation first, see explosion_cause).
            clip = fix("gradient_clipping")
            ranked = explosion_fixes(ctx, clip, False)
            if not overflowed:
                ranked = (*ranked, *fixes("stable_activation"))
        elif overflowed:
            ranked = fixes("stable_activation", "lower_learning_rate", "gradient_clipping")
        else:
            # Born at an ordinary scale with every observed activation finite (or none
            # observed at that step): a log/sqrt/division in the loss.
            ranked = fixes(
                "stable_loss", "stable_activation", "lower_learning_rate", "gradient_clipping"
            )
        score = float(nonfinite.sum()) + float(bad_steps.size) + n_skipped
        return Symptom(layers, "error", message, evidence, ranked, since=since, score=score)

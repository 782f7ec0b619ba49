"""``zero_gradient``: every observed gradient is exactly zero, so nothing learns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.activations import CAN_DIE
from gradwatch.fixes import fixes
from gradwatch.rules.base import Rule, RuleContext, Symptom


@dataclass(frozen=True)
class ZeroGradient(Rule):
    """Flags runs whose whole gradient is exactly zero, step after step.

    A healthy network's total gradient norm is never exactly ``0.0``: even a nearly
    converged one moves by rounding noise. Exact zeros across every parameter mean the
    loss does not reach the weights: a dead output activation (a ReLU or clamp on the
    logits that outputs 0 everywhere), a graph cut by ``.detach()``, ``.item()``,
    ``torch.no_grad()`` or ``tf.stop_gradient``, or a loss that does not depend on the
    parameters. The rule fires when the newest ``min_steps`` or more observed total
    norms are all exactly zero, for ``persistence`` steps.

    Args:
        min_steps: consecutive observed steps with a zero total norm needed. Defaults
            to ``5`` (the default schedules observe every step for the first 50, and a
            total norm on every 3rd step after that).
        persistence: steps the zeros must last. Defaults to ``10``, the rules' default:
            a plateau of exact zeros for 10 steps has no healthy explanation.

    Example:
        >>> ZeroGradient().persistence
        10
    """

    id = "zero_gradient"
    needs_finite_weights = True

    min_steps: int = 5

    def check(self, ctx: RuleContext) -> Symptom | None:
        run = ctx.run
        totals = run["total_norm"][:, 0]
        finite = np.isfinite(totals)
        steps = run.steps[finite]
        moved = np.flatnonzero(totals[finite] != 0.0)
        # The trailing run of exactly-zero total norms, newest step backwards.
        start = int(moved[-1]) + 1 if moved.size else 0
        zero_steps = steps[start:]
        if zero_steps.size < self.min_steps:
            return None
        # Non-zero gradients before the zeros: something died; zeros from the first
        # observed step (and a zero initial scale): the graph never reached the weights.
        since_start = moved.size == 0 and ctx.baseline_total_norm in (None, 0.0)
        layers = ctx.grads.columns
        evidence = {
            "zero_steps": float(zero_steps.size),
            "first_zero_step": float(zero_steps[0]),
            "zero_since_first_step": float(since_start),
            "layers_observed": float(len(layers)),
        }
        message = (
            f"Every gradient observed in steps {int(zero_steps[0])}-{int(zero_steps[-1])} is "
            f"exactly zero: the loss does not reach the weights, so nothing learns."
        )
        dead_output = any(
            out and kind in CAN_DIE
            for kind, out in zip(ctx.act_kinds, ctx.act_is_output, strict=True)
        )
        if dead_output:
            ranked = fixes("output_activation", "connected_graph", "loss_depends_on_params")
        elif since_start:
            ranked = fixes("connected_graph", "loss_depends_on_params", "output_activation")
        else:
            ranked = fixes("output_activation", "lower_learning_rate", "connected_graph")
        since = int(zero_steps[0])
        return Symptom(
            layers, "error", message, evidence, ranked, since=since, score=float(zero_steps.size)
        )

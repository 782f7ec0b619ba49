"""After NaN/Inf gradients reach the weights, dead_relu, saturation and vanishing_gradient
have no evidence, whatever the CPU's kernels return for relu(NaN) (issue #18)."""

from __future__ import annotations

import numpy as np
import pytest
from synth import grad_step, rule_ids, run

from gradwatch import Analyzer


def _relu_nan_to_zero(z: np.ndarray) -> np.ndarray:
    # What a select-based kernel (oneDNN on some CPUs) returns: NaN > 0 is false, so 0.
    return np.where(z > 0, z, 0.0)


def _relu_nan_propagates(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0)


def _nan_network_run(relu, steps: int = 80) -> Analyzer:
    """A 3-layer ReLU MLP trained with SGD on a loss that is NaN from step 0 (log of
    0), so the first update writes NaN into every weight."""
    rng = np.random.default_rng(0)
    w = [rng.normal(0, np.sqrt(2 / 8), (8, 16)), rng.normal(0, 0.25, (16, 16))]
    w.append(rng.normal(0, 0.25, (16, 1)))
    an = Analyzer(strict=True)
    for step in range(steps):
        x = rng.normal(size=(32, 8))
        z1 = x @ w[0]
        h1 = relu(z1)
        z2 = h1 @ w[1]
        h2 = relu(z2)
        out = h2 @ w[2]
        # d/d out of a hand-written log loss at 0: -1/0 -> -inf, times 0 -> NaN
        with np.errstate(all="ignore"):
            dout = np.full_like(out, -np.inf) * (out - out)
            g2 = h2.T @ dout
            dz2 = (dout @ w[2].T) * (z2 > 0)
            g1 = h1.T @ dz2
            dz1 = (dz2 @ w[1].T) * (z1 > 0)
            g0 = x.T @ dz1
        an.observe(
            step,
            grads={"fc0.weight": g0, "fc1.weight": g1, "fc2.weight": g2},
            activations={"act0": (h1, "relu"), "act1": (h2, "relu")},
        )
        with np.errstate(all="ignore"):
            w = [wi - 0.1 * gi for wi, gi in zip(w, (g0, g1, g2), strict=True)]
    return an


@pytest.mark.parametrize("relu", [_relu_nan_to_zero, _relu_nan_propagates])
def test_a_nan_network_gets_nonfinite_gradient_and_no_dead_relu(relu):
    an = _nan_network_run(relu)
    found = {f.rule for f in an.findings}
    assert found == {"nonfinite_gradient"}
    note = next(n for n in an.report().notes if "NaN/Inf gradients reached the weights" in n)
    assert "From step 0 on" in note and "dead_relu" in note


def test_nan_activations_are_never_counted_inactive():
    an = Analyzer(strict=True)
    nan = np.full((32, 16), np.nan)
    for step in range(40):
        an.observe(step, grads={"fc.weight": np.ones((4, 4))}, activations={"a": (nan, "relu")})
    assert "dead_relu" not in {f.rule for f in an.findings}


def _dead_layer(step: int, **kw) -> object:
    acts = {"act0": ("relu", 0.99, 0.95, 0.0)}
    return grad_step(step, [0.5, 1.0], acts=acts, **kw)


def test_skipped_amp_steps_leave_the_weights_finite_so_dead_relu_still_fires():
    # A GradScaler that skips every 4th step for overflow never applies the NaN.
    def make(step, rng):
        bad = step % 4 == 0
        return _dead_layer(step, nonfinite=[0, 1] if bad else 0, skipped=bad)

    assert "dead_relu" in rule_ids(run(80, make))


def test_one_applied_nan_suppresses_the_rules_only_while_it_is_in_the_window():
    # Applied at step 5 (the weights are NaN from then on, as far as the analyzer can
    # tell); 64 rows later it has left the window and a real dead layer is judged.
    def make(step, rng):
        return _dead_layer(step, nonfinite=[0, 1] if step == 5 else 0)

    early = run(60, make)
    assert "dead_relu" not in rule_ids(early)
    late = run(160, make)
    assert "dead_relu" in rule_ids(late)
    dead = late.report().by_rule("dead_relu")
    assert dead is not None and dead.first_step >= 5 + 64

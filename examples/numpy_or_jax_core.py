"""Feed the framework-free core ``Analyzer`` by hand, from any framework.

A hand-written numpy backprop through a deep sigmoid network (each sigmoid passes back
at most 1/4 of the gradient, the textbook vanishing-gradient setup). Any framework
works the same way: JAX, TensorFlow or torch arrays go in as they are (numpy or
DLPack). The analyzer takes plain arrays per layer and per step, and names the layers
that starve.

Run: ``python examples/numpy_or_jax_core.py [--steps 100]``
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

import gradwatch

DEPTH, WIDTH = 10, 32


def numpy_grads(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray):
    """Forward and backward of a sigmoid MLP with squared loss, by hand."""
    acts = [x]
    for w in weights[:-1]:
        acts.append(1.0 / (1.0 + np.exp(-(acts[-1] @ w))))
    out = acts[-1] @ weights[-1]
    delta = 2 * (out - y) / len(x)
    grads = [np.zeros_like(w) for w in weights]
    grads[-1] = acts[-1].T @ delta
    delta = delta @ weights[-1].T
    for i in range(len(weights) - 2, -1, -1):
        delta = delta * acts[i + 1] * (1 - acts[i + 1])  # sigmoid' from the output
        grads[i] = acts[i].T @ delta
        delta = delta @ weights[i].T
    return grads, acts[1:]


def main(steps: int) -> gradwatch.Report:
    rng = np.random.default_rng(0)
    sizes = [16] + [WIDTH] * DEPTH + [1]
    pairs = itertools.pairwise(sizes)
    weights = [rng.normal(0, 1 / np.sqrt(a), (a, b)) for a, b in pairs]
    analyzer = gradwatch.Analyzer()
    for step in range(steps):
        x = rng.normal(size=(64, 16))
        y = np.sin(x[:, :1])
        grads, acts = numpy_grads(weights, x, y)
        analyzer.observe(
            step,
            grads={f"layer{i}.weight": g for i, g in enumerate(grads)},
            activations={f"sigmoid{i}": (a, "sigmoid") for i, a in enumerate(acts)},
        )
        for w, g in zip(weights, grads, strict=True):
            w -= 0.1 * g
    report = analyzer.report()
    print(report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    report = main(parser.parse_args().steps)
    raise SystemExit(0 if report.by_rule("vanishing_gradient") else 1)

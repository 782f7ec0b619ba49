"""Hand-built StepStats for rule and analyzer tests: no framework involved."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from gradwatch import Analyzer, StepStats


def grad_step(
    step: int,
    norms: Sequence[float],
    *,
    names: Sequence[str] | None = None,
    zero_frac: Sequence[float] | float = 0.0,
    nonfinite: Sequence[int] | int = 0,
    numel: int = 1024,
    acts: dict[str, tuple[str, float, float, float]] | None = None,
    output: str | None = None,
    skipped: bool = False,
) -> StepStats:
    """One step with one weight tensor per layer ``fc{i}.weight`` and the given norms.

    ``acts`` maps an activation name to ``(kind, inactive, dead, tail)``; ``output``
    names the activation that produces the model output.
    """
    n = len(norms)
    layer_names = tuple(names) if names is not None else tuple(f"fc{i}.weight" for i in range(n))
    zf = [zero_frac] * n if isinstance(zero_frac, float | int) else list(zero_frac)
    nf = [nonfinite] * n if isinstance(nonfinite, int) else list(nonfinite)
    acts = acts or {}
    return StepStats(
        step=step,
        grad_layers=layer_names,
        grad_norm=tuple(float(v) for v in norms),
        grad_max_abs=tuple(float(v) / 4 for v in norms),
        grad_mean_abs=tuple(float(v) / np.sqrt(numel) for v in norms),
        grad_zero_frac=tuple(float(v) for v in zf),
        grad_nonfinite=tuple(int(v) for v in nf),
        grad_numel=(numel,) * n,
        act_layers=tuple(acts),
        act_kinds=tuple(v[0] for v in acts.values()),
        act_inactive_frac=tuple(v[1] for v in acts.values()),
        act_dead_frac=tuple(v[2] for v in acts.values()),
        act_tail_frac=tuple(v[3] for v in acts.values()),
        act_is_output=tuple(name == output for name in acts),
        skipped_step=skipped,
    )


def noisy(norms: Sequence[float], rng: np.random.Generator, sigma: float = 0.3) -> list[float]:
    """Norms times log-normal noise, as real per-step norms fluctuate."""
    return [float(v * np.exp(rng.normal(0.0, sigma))) for v in norms]


def decaying(depth: int, factor: float, last: float = 1.0) -> list[float]:
    """Norms that shrink by ``factor`` per layer from the last layer back to the first."""
    return [last * factor ** (depth - 1 - i) for i in range(depth)]


def run(
    steps: int,
    make: Callable[[int, np.random.Generator], StepStats],
    analyzer: Analyzer | None = None,
    seed: int = 0,
) -> Analyzer:
    """Feed ``steps`` steps built by ``make(step, rng)`` to a strict analyzer."""
    an = analyzer if analyzer is not None else Analyzer(strict=True)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        an.observe_stats(make(step, rng))
    return an


def rule_ids(an: Analyzer, min_severity: str = "warning") -> set[str]:
    """Ids of findings at or above ``min_severity``."""
    order = ("info", "warning", "error")
    return {f.rule for f in an.findings if order.index(f.severity) >= order.index(min_severity)}

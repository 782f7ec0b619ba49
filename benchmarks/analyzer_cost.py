"""Host cost of the bare :class:`gradwatch.Analyzer` per step (issue #16).

Run: ``python benchmarks/analyzer_cost.py``. Ten raw numpy layers of 1,000 entries
(``Analyzer.observe``: host reductions, then analysis) and the same steps already
reduced (``Analyzer.observe_stats``), with the rules checked every step (the bare
Analyzer's default) and every 5th step (the torch adapter's schedule); then the part
that is neither reduction nor rules (ingestion into the windows and totals). Microseconds
per step, median of 5 runs of 1,000 steps after 200 warm-up steps.
Targets: ``observe`` <= 100 us with the default schedule, ``observe_stats`` <= 30 us.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np

import gradwatch
from gradwatch.reduce import step_stats_from_arrays

LAYERS, ENTRIES, STEPS, WARMUP, RUNS = 10, 1_000, 1_000, 200, 5


def _per_step(feed: Callable[[gradwatch.Analyzer, int], None], **kwargs: int) -> float:
    runs = []
    for _ in range(RUNS):
        an = gradwatch.Analyzer(**kwargs)
        for step in range(WARMUP):
            feed(an, step)
        start = time.perf_counter()
        for step in range(WARMUP, WARMUP + STEPS):
            feed(an, step)
        runs.append((time.perf_counter() - start) / STEPS)
    return statistics.median(runs) * 1e6


def rows() -> str:
    rng = np.random.default_rng(0)
    grads = [
        {f"layer{i}.weight": rng.normal(0, 1e-2, ENTRIES) for i in range(LAYERS)} for _ in range(64)
    ]
    reduced = [step_stats_from_arrays(0, g) for g in grads]

    def raw(an: gradwatch.Analyzer, step: int) -> None:
        an.observe(step, grads=grads[step % 64])

    def stats(an: gradwatch.Analyzer, step: int) -> None:
        an.observe_stats(dataclasses.replace(reduced[step % 64], step=step))

    start = time.perf_counter()
    for step in range(STEPS):
        step_stats_from_arrays(step, grads[step % 64])
    reduce_us = (time.perf_counter() - start) / STEPS * 1e6
    lines = [
        f"### Analyzer per step: {LAYERS} numpy layers of {ENTRIES:,} entries",
        "",
        "| measurement | us/step |",
        "|---|---:|",
        f"| observe, rules every step (default) | {_per_step(raw):.0f} |",
        f"| observe, rules every 5th step | {_per_step(raw, check_every=5):.0f} |",
        f"| observe_stats, rules every step (default) | {_per_step(stats):.0f} |",
        f"| observe_stats, rules every 5th step | {_per_step(stats, check_every=5):.0f} |",
        f"| observe_stats, rules never checked (ingestion only) | "
        f"{_per_step(stats, check_every=10**6):.0f} |",
        f"| host reductions alone (step_stats_from_arrays) | {reduce_us:.0f} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(rows())

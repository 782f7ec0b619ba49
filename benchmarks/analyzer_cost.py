"""Host cost of the bare :class:`gradwatch.Analyzer` per step (issue #16).

Run: ``python benchmarks/analyzer_cost.py``. Ten raw numpy layers of 1,000 entries
(``Analyzer.observe``: host reductions, then analysis) and the same steps already
reduced (``Analyzer.observe_stats``), with the default rule schedule (every step for the
first ``DENSE_CHECK_STEPS`` = 50 steps, then every 5th: the rows below are measured
after it, so they show the sparse phase; the dense start costs what "every step" costs),
with the rules checked every step and every 5th step (the torch adapter's schedule);
then the part that is neither reduction nor rules (ingestion into the windows and
totals), the host reductions alone, and one check of the default rules (every step minus
ingestion). Microseconds per step, median of 5 runs of 1,000 steps after 200 warm-up
steps; the StepStats are built before timing (building them is the adapter's cost).
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


def _per_step(feed: Callable[[gradwatch.Analyzer, int], None], **kwargs: int | None) -> float:
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
    # Built before timing: a StepStats is the adapter's to build, not the analyzer's cost.
    steps = [dataclasses.replace(reduced[i % 64], step=i) for i in range(WARMUP + STEPS)]

    def raw(an: gradwatch.Analyzer, step: int) -> None:
        an.observe(step, grads=grads[step % 64])

    def stats(an: gradwatch.Analyzer, step: int) -> None:
        an.observe_stats(steps[step])

    start = time.perf_counter()
    for step in range(STEPS):
        step_stats_from_arrays(step, grads[step % 64])
    reduce_us = (time.perf_counter() - start) / STEPS * 1e6
    every = _per_step(stats, check_every=1)
    ingest = _per_step(stats, check_every=10**6)
    lines = [
        f"### Analyzer per step: {LAYERS} numpy layers of {ENTRIES:,} entries",
        "",
        "| measurement | us/step |",
        "|---|---:|",
        f"| observe, default schedule (after step 50: rules every 5th) | {_per_step(raw):.0f} |",
        f"| observe, rules every step | {_per_step(raw, check_every=1):.0f} |",
        f"| observe_stats, default schedule (after step 50) | {_per_step(stats):.0f} |",
        f"| observe_stats, rules every step | {every:.0f} |",
        f"| observe_stats, rules every 5th step | {_per_step(stats, check_every=5):.0f} |",
        f"| observe_stats, rules never checked (ingestion only) | {ingest:.0f} |",
        f"| host reductions alone (step_stats_from_arrays) | {reduce_us:.0f} |",
        f"| one check of the default rules (every step minus ingestion) | {every - ingest:.0f} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(rows())

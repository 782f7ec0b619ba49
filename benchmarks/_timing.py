"""Interleaved timing: the variants of one benchmark run in the same process,
alternating A B A B after a warm-up, so drift on a shared machine hits all of them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Median seconds per call of each variant, and each variant's median over rounds
    of its time divided by the baseline's time in the same round (paired, so a slow
    stretch of the machine that spans a round cancels out)."""

    medians: dict[str, float]
    ratios: dict[str, float]


def interleaved_medians(
    variants: dict[str, Callable[[], None]], *, warmup: int = 60, rounds: int = 40, reps: int = 5
) -> dict[str, float]:
    """Median seconds per call of each variant (see :func:`interleaved_timing`)."""
    return interleaved_timing(variants, warmup=warmup, rounds=rounds, reps=reps).medians


def interleaved_timing(
    variants: dict[str, Callable[[], None]],
    *,
    warmup: int = 60,
    rounds: int = 40,
    reps: int = 5,
    baseline: str | None = None,
) -> Timing:
    """Each round runs every variant ``reps`` times back to back and records the mean;
    medians are over ``rounds``. The order rotates by one variant each round, so what
    ran just before (cache and allocator state) hits every variant alike. ``warmup``
    calls of each variant come first (allocator, caches, and gradwatch's dense first
    steps). Ratios are against ``baseline`` (default: the first variant).
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for r in range(rounds):
        for name, fn in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - start) / reps)
    base = samples[baseline or next(iter(variants))]
    return Timing(
        medians={name: statistics.median(values) for name, values in samples.items()},
        ratios={
            name: statistics.median(v / b for v, b in zip(values, base, strict=True))
            for name, values in samples.items()
        },
    )


def markdown_table(
    title: str, base_s: float, rows: dict[str, float], ratios: dict[str, float] | None = None
) -> str:
    """A markdown table of step times and ratios against ``base_s`` (or, when given,
    the paired ``ratios`` of :class:`Timing`)."""
    lines = [f"### {title}", "", "| variant | median step (ms) | ratio |", "|---|---:|---:|"]
    lines.append(f"| unmonitored | {base_s * 1e3:.2f} | 1.000 |")
    for name, seconds in rows.items():
        ratio = ratios[name] if ratios is not None else seconds / base_s
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {ratio:.3f} |")
    return "\n".join(lines)

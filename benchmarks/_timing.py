"""Interleaved median timing: the variants of one benchmark run in the same process,
alternating A B A B after a warm-up, so drift on a shared machine hits all of them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    variants: dict[str, Callable[[], None]], *, warmup: int = 60, rounds: int = 40, reps: int = 5
) -> dict[str, float]:
    """Median seconds per call of each variant.

    Each round runs every variant ``reps`` times back to back, in a fixed order, and
    records the mean; the result is the median over ``rounds``. ``warmup`` calls of each
    variant come first (allocator, caches, and gradwatch's dense first steps).
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(values) for name, values in samples.items()}


def markdown_table(title: str, base_s: float, rows: dict[str, float]) -> str:
    """A markdown table of step times and ratios against ``base_s``."""
    lines = [f"### {title}", "", "| variant | median step (ms) | ratio |", "|---|---:|---:|"]
    lines.append(f"| unmonitored | {base_s * 1e3:.2f} | 1.000 |")
    for name, seconds in rows.items():
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {seconds / base_s:.3f} |")
    return "\n".join(lines)

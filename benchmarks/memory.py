"""Host memory over a long run: the analyzer fed synthetic statistics for 20,000 steps.

Run: ``python benchmarks/memory.py``. Prints the process RSS and the analyzer's own
buffer size at checkpoints. Flat numbers after the first checkpoint mean memory does
not grow with the length of the run.
"""

from __future__ import annotations

import numpy as np

from gradwatch import Analyzer, StepStats

LAYERS = 200
STEPS = 20_000
CHECKPOINTS = (1_000, 5_000, 10_000, 20_000)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rows() -> str:
    rng = np.random.default_rng(0)
    names = tuple(f"layer{i}.weight" for i in range(LAYERS))
    analyzer = Analyzer(check_every=10)
    lines = [
        f"### Memory: analyzer fed synthetic stats, {LAYERS} layers, {STEPS:,} steps",
        "",
        "| step | RSS (MiB) | analyzer buffers (MiB) |",
        "|---:|---:|---:|",
    ]
    for step in range(STEPS):
        norms = tuple(float(v) for v in rng.lognormal(0.0, 0.3, LAYERS))
        analyzer.observe_stats(
            StepStats(
                step=step,
                grad_layers=names,
                grad_norm=norms,
                grad_max_abs=norms,
                grad_mean_abs=norms,
                grad_zero_frac=(0.0,) * LAYERS,
                grad_nonfinite=(0,) * LAYERS,
                grad_numel=(1024,) * LAYERS,
            )
        )
        if step + 1 in CHECKPOINTS:
            lines.append(f"| {step + 1:,} | {_rss_mib():.1f} | {analyzer.nbytes() / 2**20:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(rows())

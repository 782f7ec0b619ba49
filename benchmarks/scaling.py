"""How gradwatch's per-step cost grows with the number of layers.

Run: ``python benchmarks/scaling.py``. For plain ReLU MLPs of 10, 100 and 500 linear
layers (width 32, batch 64, CPU, one thread) it prints the extra milliseconds per step
that every-step gradient statistics cost (watched minus unmonitored, interleaved
medians), and the same per layer. Linear growth shows as a flat per-layer column.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import interleaved_medians

DEPTHS = (10, 100, 500)


def _step_fn(depth: int, watched: bool):
    import torch
    from gradwatch.adapters.torch import every

    import gradwatch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(32, 32), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 10))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if watched:
        gradwatch.watch(
            model,
            opt,
            grad_schedule=every(1),
            activation_schedule=every(1),
            on_finding="ignore",
            show=False,
        )
    x = torch.randn(64, 32)
    y = torch.randint(0, 10, (64,))

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step


def rows(rounds: int = 15) -> str:
    """A markdown table of gradwatch's every-step cost per step and per layer."""
    import torch

    torch.set_num_threads(1)
    lines = [
        "### Scaling: every-step statistics + activations, ReLU MLP width 32, batch 64",
        "",
        "| linear layers | unmonitored (ms) | gradwatch cost (ms/step) | per layer (us) |",
        "|---:|---:|---:|---:|",
    ]
    for depth in DEPTHS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            medians = interleaved_medians(
                {"base": _step_fn(depth, False), "watched": _step_fn(depth, True)},
                warmup=20,
                rounds=rounds,
                reps=3,
            )
        cost = medians["watched"] - medians["base"]
        lines.append(
            f"| {depth + 1} | {medians['base'] * 1e3:.2f} | {cost * 1e3:.2f} | "
            f"{cost / (depth + 1) * 1e6:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(rows())

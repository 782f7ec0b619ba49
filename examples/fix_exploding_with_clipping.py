"""Apply the fixes the report ranks for an explosion: a lower learning rate, then clipping.

A tanh MLP trained with SGD + momentum at a learning rate too high for it: within a
few steps the gradient norm grows by five orders of magnitude and the loss diverges.
gradwatch reports ``exploding_gradient``. The evidence points at the learning rate (the
norm was healthy at the first steps, then grew), so ``lower_learning_rate`` is ranked
first and ``gradient_clipping`` second, with a max-norm calibrated on the first, healthy
steps. The second run lowers the learning rate 10x and trains cleanly; the third keeps
the high learning rate and clips at the suggested value: it stays finite, but its
updates are still too large for the weights, and gradwatch says so.

Run: ``python examples/fix_exploding_with_clipping.py [--steps 150]``
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import gradwatch

LR = 0.1


def train(steps: int, max_norm: float | None, lr: float = LR) -> tuple[gradwatch.Report, float]:
    torch.manual_seed(0)
    x = torch.randn(1024, 16)
    y = x @ torch.randn(16, 1) * 3
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    with gradwatch.watch(model, optimizer, on_finding="ignore", show=False) as gw:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,))
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            if max_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
    return gw.report(show=False), losses[-1]


def main(steps: int) -> float | None:
    report, loss = train(steps, None)
    print(report)
    finding = report.by_rule("exploding_gradient")
    if finding is None:
        print("no exploding_gradient finding at this learning rate; nothing to fix")
        return None
    print("fixes, best first:", ", ".join(fix.id for fix in finding.fixes))
    lowered_report, lowered_loss = train(steps, None, lr=LR / 10)
    print(lowered_report)
    max_norm = finding.evidence["suggested_max_norm"]
    clipped_report, clipped_loss = train(steps, max_norm)
    print(
        f"lr {LR}: final loss {loss:.3g}; lr {LR / 10:g}: {lowered_loss:.3g}; "
        f"lr {LR} clipped at {max_norm:.3g}: {clipped_loss:.3g} "
        f"({'still' if clipped_report.by_rule('exploding_gradient') else 'no longer'} "
        f"reported exploding)"
    )
    healthy = lowered_report.by_rule("exploding_gradient") is None
    return lowered_loss if healthy and math.isfinite(clipped_loss) else math.inf


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    result = main(parser.parse_args().steps)
    raise SystemExit(0 if result is not None and math.isfinite(result) else 1)

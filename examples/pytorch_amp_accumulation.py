"""Autocast + GradScaler + gradient accumulation: gradwatch judges the unscaled gradients.

``GradScaler`` multiplies the loss by 65536 before backward, so raw gradients look
huge. gradwatch reads gradients at ``optimizer.step()``, after ``scaler.unscale_`` and
after the 4 accumulated micro-batches are summed, so the report shows the true scale
and no ``exploding_gradient``. On a machine without CUDA this runs bfloat16 autocast
on the CPU with the scaler enabled all the same.

Run: ``python examples/pytorch_amp_accumulation.py [--steps 100]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch

ACCUMULATE = 4


def main(steps: int) -> gradwatch.Report:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device)
    x = torch.randn(4096, 32, device=device)
    y = torch.randint(0, 10, (4096,), device=device)

    gw = gradwatch.watch(model, optimizer)
    for step in range(steps * ACCUMULATE):
        idx = torch.randint(0, len(x), (32,), device=device)
        with torch.autocast(device_type=device, dtype=dtype):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) / ACCUMULATE
        scaler.scale(loss).backward()
        if (step + 1) % ACCUMULATE == 0:
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    report = gw.report()
    gw.close()
    print(
        f"loss scale {scaler.get_scale():.0f}; largest gradient norm gradwatch saw: "
        f"{max(ls.max_norm for ls in report.layers):.3g}"
    )
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    report = main(parser.parse_args().steps)
    raise SystemExit(0 if report.healthy else 1)

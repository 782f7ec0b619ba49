"""An ordinary PyTorch training loop plus one line: ``gradwatch.watch(model, optimizer)``.

Trains a small He-initialised ReLU MLP on synthetic data. Nothing in the loop changes;
the report prints when the ``with`` block ends and should say the gradients are healthy.

Run: ``python examples/pytorch_drop_in.py [--steps 300]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch


def main(steps: int) -> gradwatch.Report:
    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x[:, :5].sum(1) > 0).long()
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    with gradwatch.watch(model, optimizer) as gw:  # the one added line
        for _step in range(steps):
            idx = torch.randint(0, len(x), (64,))
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return gw.report(show=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    report = main(parser.parse_args().steps)
    raise SystemExit(0 if report.healthy else 1)

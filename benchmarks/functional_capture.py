"""Cost of the functional-activation capture (the TorchFunctionMode) on sampled steps.

Every step is sampled for activations and none for gradients, so the difference is the
capture alone. Variants, interleaved in one process (benchmarks/_timing.py):

* ``unwatched``, and ``unwatched (A/A)``: the same loop twice, the noise floor;
* ``watched, mode off``: the watch's sampled-step hooks with the mode patched out;
* ``watched, mode on``: the default, F.relu sites seen and reduced on the device.

Run: ``.tox/torch/bin/python benchmarks/functional_capture.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_timing

import gradwatch


class FunctionalMLP(nn.Module):
    def __init__(self, depth: int = 8, width: int = 512) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class MnistNet(nn.Module):
    """pytorch/examples mnist/main.py's ``Net``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.fc1(torch.flatten(self.dropout1(x), 1)))
        return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if mode != "unwatched":
        never = lambda step: False  # noqa: E731
        gw = gradwatch.watch(
            model,
            opt,
            on_finding="ignore",
            show=False,
            grad_schedule=never,
            norm_schedule=never,
            activation_schedule=lambda step: True,
        )
        if mode == "mode off":
            gw._acts._functional.enter = lambda root: None  # type: ignore[method-assign]
        _step_fn.watches.append(gw)  # type: ignore[attr-defined]

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


_step_fn.watches = []  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds, warmup = (10, 10) if args.quick else (30, 30)
    cases = {
        "MLP 8x512, F.relu, batch 128": (
            FunctionalMLP,
            torch.randn(128, 512),
            torch.randint(0, 10, (128,)),
        ),
        "MNIST Net, batch 32": (MnistNet, torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))),
    }
    for title, (build, x, y) in cases.items():
        variants = {}
        for name in ("unwatched", "unwatched (A/A)", "watched, mode off", "watched, mode on"):
            torch.manual_seed(0)
            mode = "unwatched" if name.startswith("unwatched") else name.split(", ")[1]
            variants[name] = _step_fn(build(), x, y, mode)
        timing = interleaved_timing(variants, warmup=warmup, rounds=rounds, reps=3)
        print(f"\n{title}: median step, ratio to unwatched (paired)")
        for name, seconds in timing.medians.items():
            print(f"  {name:20s} {seconds * 1e3:8.2f} ms   {timing.ratios[name]:.3f}")
        off, on = timing.medians["watched, mode off"], timing.medians["watched, mode on"]
        print(f"  mode on / mode off: {on / off:.3f}")
    for gw in _step_fn.watches:  # type: ignore[attr-defined]
        gw.close()


if __name__ == "__main__":
    main()

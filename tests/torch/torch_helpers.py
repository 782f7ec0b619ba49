"""Small networks and a plain training loop shared by the torch adapter tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from gradwatch.adapters.torch import TorchWatch, every
from torch import nn
from torch.nn import functional as F

import gradwatch
from gradwatch.stats import StepStats

EVERY_STEP = every(1)


def watch_every_step(model: nn.Module, opt: object = None, **kw: object) -> TorchWatch:
    """A quiet watch that reduces gradients and activations on every step."""
    kwargs: dict[str, object] = {
        "grad_schedule": EVERY_STEP,
        "activation_schedule": EVERY_STEP,
        "on_finding": "ignore",
        "show": False,
    }
    kwargs.update(kw)
    return gradwatch.watch(model, opt, **kwargs)  # type: ignore[arg-type]


def mlp(
    act: Callable[[], nn.Module],
    depth: int,
    width: int = 64,
    *,
    std: float | None = None,
    bias: float | None = None,
    inp: int = 32,
) -> nn.Sequential:
    """``depth`` Linear+activation blocks and a linear head; ``std=None`` keeps torch's init."""
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(inp if i == 0 else width, width)
        if std is not None:
            nn.init.normal_(linear.weight, 0.0, std)
            nn.init.zeros_(linear.bias)
        if bias is not None:
            nn.init.constant_(linear.bias, bias)
        layers += [linear, act()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def he_relu_mlp(depth: int = 8, width: int = 64) -> nn.Sequential:
    return mlp(nn.ReLU, depth, width, std=math.sqrt(2.0 / width))


def train(
    model: nn.Module,
    steps: int = 60,
    lr: float = 0.01,
    *,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    seed: int = 0,
    **watch_kwargs: object,
) -> tuple[TorchWatch, gradwatch.Report]:
    """Train with plain SGD under a watch (every step sampled unless overridden)."""
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(64, 32, generator=gen)
    if y is None:
        y = torch.randn(x.shape[0], 1, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gw = watch_every_step(model, opt, **watch_kwargs)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    report = gw.report(show=False)
    gw.close()
    return gw, report


def record_stats(gw: TorchWatch) -> list[StepStats]:
    """Capture every StepStats the watch hands its analyzer."""
    seen: list[StepStats] = []
    original = gw.analyzer.observe_stats

    def spy(stats: StepStats | list[StepStats]) -> None:
        batch = [stats] if isinstance(stats, StepStats) else list(stats)
        seen.extend(batch)
        original(batch)

    gw.analyzer.observe_stats = spy  # type: ignore[method-assign]
    return seen


def rules_of(report: gradwatch.Report) -> set[str]:
    return {f.rule for f in report.findings}


class MnistNet(nn.Module):
    """pytorch/examples mnist/main.py's ``Net`` with its forward unchanged; ``side`` is
    the input's side (28 in the example), smaller to keep the test fast."""

    def __init__(self, side: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * ((side - 4) // 2) ** 2, 128)  # 9216 at side 28
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)

"""PyTorch recurrent scenarios: the gradient through time of ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``.

One task for all of them, on generated data: read a sequence of 4-feature vectors
(N(0, 1)) and say whether the first feature summed over its last 20 steps is positive
(many-to-one, a linear head on the last output, Adam lr 3e-3, batch 32). A plain tanh RNN
over 200 steps loses its gradient through time (dL/dx_1 is a median 1e-12 of dL/dx_T)
while its parameters' norms look normal; an LSTM, a GRU and a 10-step plain RNN on the
same task are the healthy twins.

The labels are checked without gradwatch by :func:`measure_through_time`: a forward
pre-hook on the recurrent layer hands it its input as a leaf that requires a gradient,
whose ``.grad`` after each backward pass gives the RMS of dL/dx at the first and the last
time step. A run is ``vanishing_gradient`` when its plain (ungated) recurrent layer's
median ratio, over steps 10 to 59, is below 1e-5; a healthy run's loss learns (last-10
mean below 80% of the first-5 mean). Run ``python -m benchmarks.scenarios.torch_recurrent``
to print the table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.scenarios import HEALTHY, Scenario
from benchmarks.scenarios.recurrent_task import (
    BATCH,
    FEATURES,
    HIDDEN,
    JUDGED,
    LABEL_STEPS,
    LONG,
    RATIO_THRESHOLD,
    SHORT,
)
from benchmarks.scenarios.torch_zoo import TorchRun, _loss_run, _setup


class SequenceClassifier(nn.Module):
    """A recurrent layer read at its last output, then a linear head (two classes)."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sequences(length: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches ``(x, y)``: x of shape (BATCH, length, FEATURES), y whether the
    first feature summed over the last ``LABEL_STEPS`` steps is positive."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(BATCH, length, FEATURES, generator=gen)
        yield x, (x[:, -LABEL_STEPS:, 0].sum(dim=1) > 0).long()


def _run(cell: type[nn.RNNBase], length: int, seed: int) -> TorchRun:
    _setup(seed)
    model = SequenceClassifier(cell)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _loss_run(model, opt, sequences(length, seed), F.cross_entropy)


def vanishing_rnn_through_time(seed: int) -> TorchRun:
    return _run(nn.RNN, LONG, seed)


def healthy_lstm_long_sequence(seed: int) -> TorchRun:
    return _run(nn.LSTM, LONG, seed)


def healthy_gru_long_sequence(seed: int) -> TorchRun:
    return _run(nn.GRU, LONG, seed)


def healthy_rnn_short_sequence(seed: int) -> TorchRun:
    return _run(nn.RNN, SHORT, seed)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "vanishing_rnn_through_time",
        "torch",
        frozenset({"vanishing_gradient"}),
        vanishing_rnn_through_time,
        100,
        "plain tanh nn.RNN over 200 time steps, many-to-one, torch default init",
    ),
    Scenario(
        "healthy_lstm_long_sequence",
        "torch",
        HEALTHY,
        healthy_lstm_long_sequence,
        100,
        "nn.LSTM on the same 200-step task: its gates learn what to keep",
    ),
    Scenario(
        "healthy_gru_long_sequence",
        "torch",
        HEALTHY,
        healthy_gru_long_sequence,
        100,
        "nn.GRU on the same 200-step task",
    ),
    Scenario(
        "healthy_rnn_short_sequence",
        "torch",
        HEALTHY,
        healthy_rnn_short_sequence,
        100,
        "plain tanh nn.RNN on the same task over 10 time steps",
    ),
)


# --- label check without gradwatch -------------------------------------------------------


def measure_through_time(scn: Scenario, seed: int = 0, steps: int | None = None) -> dict[str, Any]:
    """Train ``scn`` and measure, with plain hooks, RMS dL/dx_1 / RMS dL/dx_T of each
    recurrent layer at each step. Returns the median ratio over :data:`JUDGED` of the
    plain RNN layers (``math.inf`` without one), of all layers, and the losses."""
    run = scn.build(seed)
    layers = [(n, m) for n, m in run.model.named_modules() if isinstance(m, nn.RNNBase)]
    inputs: dict[str, torch.Tensor] = {}

    def tap(name: str, module: nn.RNNBase) -> Any:
        def pre_hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            # The scenarios feed data straight in: a leaf copy cuts no upstream gradient.
            x = args[0].detach().requires_grad_()
            inputs[name] = x
            return (x, *args[1:])

        return module.register_forward_pre_hook(pre_hook)

    ratios: dict[str, list[float]] = {name: [] for name, _ in layers}
    lengths: dict[str, int] = {}

    def read_grads(*_: Any) -> None:
        for name, module in layers:
            x = inputs.get(name)
            if x is None or x.grad is None:
                continue
            g = x.grad.double()
            axis = 1 if module.batch_first else 0
            lengths[name] = int(g.shape[axis])
            first = g.select(axis, 0).pow(2).mean().sqrt().item()
            last = g.select(axis, -1).pow(2).mean().sqrt().item()
            ratios[name].append(first / last if last > 0 else math.nan)

    handles = [tap(name, module) for name, module in layers]
    handles.append(run.optimizer.register_step_pre_hook(read_grads))
    losses = [run.step(i) for i in range(steps or scn.steps)]
    for handle in handles:
        handle.remove()
    judged = {
        n: [r for r in rs[JUDGED.start : JUDGED.stop] if math.isfinite(r)]
        for n, rs in ratios.items()
    }
    median = {n: statistics.median(rs) if rs else math.nan for n, rs in judged.items()}
    plain = [n for n, m in layers if m.mode in ("RNN_TANH", "RNN_RELU")]
    return {
        "through_time_ratio": median,
        "plain_ratio": min((median[n] for n in plain), default=math.inf),
        "time_steps": lengths,
        "loss_start": sum(losses[:5]) / 5,
        "loss_end": sum(losses[-10:]) / 10,
    }


def judge(m: dict[str, Any]) -> set[str]:
    """``{"vanishing_gradient"}`` when a plain RNN layer's median ratio is below
    :data:`RATIO_THRESHOLD`, else nothing."""
    return {"vanishing_gradient"} if m["plain_ratio"] < RATIO_THRESHOLD else set()


def main() -> int:
    bad = []
    print("| scenario | expected | measured | verified | dL/dx_1 / dL/dx_T (median) | loss |")
    print("|---|---|---|---|---|---|")
    for scn in SCENARIOS:
        m = measure_through_time(scn)
        found = judge(m)
        learns = m["loss_end"] < 0.8 * m["loss_start"]
        ok = found == set(scn.expected_rules) and (not scn.healthy or learns)
        bad += [] if ok else [scn.name]
        ratio = ", ".join(f"{n}: {r:.2g}" for n, r in m["through_time_ratio"].items())
        label = "healthy" if scn.healthy else ", ".join(sorted(scn.expected_rules))
        measured = ", ".join(sorted(found)) or ("healthy" if learns else "not learning")
        print(
            f"| {scn.name} | {label} | {measured} | {'yes' if ok else '**NO**'} | {ratio} "
            f"| {m['loss_start']:.3f} -> {m['loss_end']:.3f} |"
        )
    print(f"{len(SCENARIOS) - len(bad)}/{len(SCENARIOS)} labels verified")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""PyTorch scenarios of the causes published buggy models showed (issue #14): each one
has a known cause that decides which fix an expert tries first (see
``benchmarks/scenarios/expected_fixes.py``).

Every label was measured without gradwatch by ``benchmarks/verify_labels.py`` (an
optimizer step pre-hook reading ``p.grad``, forward hooks on the activation modules);
the "measured" line of each docstring gives that evidence (seed 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks.scenarios import HEALTHY, Scenario
from benchmarks.scenarios.torch_zoo import (
    TorchRun,
    _classifier_run,
    _PreLNTransformer,
    _setup,
    _sgd,
    mlp,
)


class _Exp(nn.Module):
    """``exp`` as a hidden activation (an exponential unit), as in the published models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def nonfinite_exp_activation(seed: int) -> TorchRun:
    """A hidden ``exp`` activation: the updates grow its input until exp(z) overflows
    float32 (z > 88) in the forward pass, and the loss and every gradient turn NaN.

    measured: total norm 2.4 at step 0, 7.2e3 at step 21 (2978x), NaN from step 22 on."""
    _setup(seed)
    model = nn.Sequential(nn.Linear(64, 64), _Exp(), nn.Linear(64, 10))
    return _classifier_run(model, _sgd(model, 0.05), seed)


def _uniform_init(model: nn.Module, limit: float) -> nn.Module:
    """Keras 1's old ``RandomUniform(-0.05, 0.05)`` on every weight, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.uniform_(module.weight, -limit, limit)
            nn.init.zeros_(module.bias)
    return model


def dead_relu_tiny_uniform_init(seed: int) -> TorchRun:
    """6 ReLU layers of width 128 with U(+-0.05) weights: each layer shrinks the signal
    ~4x, the biases soon outweigh it and pin units below zero.

    measured: 87% of a hidden layer's units dead (median), loss 2.30 -> 2.31;
    first/last RMS ratio 0.049 with 0.17 of the last layer's relative update (no vanishing)."""
    _setup(seed)
    model = _uniform_init(mlp([64] + [128] * 6 + [10], nn.ReLU), 0.05)
    return _classifier_run(model, _sgd(model, 0.1, momentum=0.9), seed)


def vanishing_tanh_tiny_uniform_init(seed: int) -> TorchRun:
    """8 tanh layers of width 64 with U(+-0.05) weights (std 0.029, a quarter of Xavier's).

    measured: first/last norm ratio 1e-4, relative update ratio 8e-4, loss stays 2.30."""
    _setup(seed)
    model = _uniform_init(mlp([64] + [64] * 8 + [10], nn.Tanh), 0.05)
    return _classifier_run(model, _sgd(model, 0.1), seed)


class _GatedMLP(nn.Module):
    """``relu(W x) * sigmoid(G x + b)``: a gated hidden layer whose gate bias starts at +8,
    so the gate sits at sigmoid(8) = 0.9997, where its slope is 0.13% of its peak."""

    def __init__(self, gate_bias: float) -> None:
        super().__init__()
        self.value = nn.Linear(64, 64)
        self.relu = nn.ReLU()
        self.gate = nn.Linear(64, 64)
        self.sigmoid = nn.Sigmoid()
        self.head = nn.Linear(64, 10)
        nn.init.kaiming_normal_(self.value.weight, nonlinearity="relu")
        nn.init.xavier_uniform_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.value(x)) * self.sigmoid(self.gate(x)))


def saturation_sigmoid_gate_bias(seed: int) -> TorchRun:
    """measured: 98% of the gate's outputs in the tails (median), loss 2.11 -> 0.065."""
    _setup(seed)
    model = _GatedMLP(gate_bias=8.0)
    return _classifier_run(model, _sgd(model, 0.05, momentum=0.9), seed)


class _LSTMClassifier(nn.Module):
    """A digit read as 8 rows of 8 pixels; the last hidden state classifies."""

    def __init__(self, hidden: int = 32, bidirectional: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.view(-1, 8, 8))
        return self.head(out[:, -1])


def exploding_lstm_sgd_lr200(seed: int) -> TorchRun:
    """An LSTM trained with plain SGD at lr=200 (a published model's learning rate).

    measured: total norm 0.21 at step 0, up to 25 (117x) within 50 steps; the
    weight norm grows 4.6x and 11x in the first two steps; loss 106 -> 49."""
    _setup(seed)
    model = _LSTMClassifier()
    return _classifier_run(model, _sgd(model, 200.0), seed)


def exploding_transformer_sgd_lr(seed: int) -> TorchRun:
    """The zoo's healthy pre-LN Transformer encoder (``nn.TransformerEncoder``, 3 layers),
    trained with SGD at lr=1, momentum 0.9 instead of AdamW at 1e-3.

    measured: total norm up 1062x within 50 steps, NaN only after step 80."""
    _setup(seed)
    model = _PreLNTransformer()
    return _classifier_run(model, _sgd(model, 1.0, momentum=0.9), seed)


def healthy_bilstm(seed: int) -> TorchRun:
    """A bidirectional LSTM with Adam: isolated gradient spikes are normal for LSTMs.

    measured: total norm at most 4.5x / 5.7x / 8.8x its first value (seeds 0-2), loss
    2.23 -> 0.14; the weight norm changes under 2.3% per step."""
    _setup(seed)
    model = _LSTMClassifier(bidirectional=True)
    return _classifier_run(model, torch.optim.Adam(model.parameters(), lr=1e-2), seed)


def _s(
    fn: Callable[[int], TorchRun],
    expected: str,
    cause: str,
    steps: int = 100,
    fast: bool = True,
) -> Scenario:
    labels = HEALTHY if expected == HEALTHY else frozenset(expected.split("+"))
    return Scenario(fn.__name__, "torch", labels, fn, steps, cause, 0, fast)


SCENARIOS: tuple[Scenario, ...] = (
    _s(
        nonfinite_exp_activation,
        "exploding_gradient+nonfinite_gradient",
        "hidden exp activation, SGD lr=0.05",
    ),
    _s(dead_relu_tiny_uniform_init, "dead_relu", "6 ReLU layers, U(+-0.05) init"),
    _s(vanishing_tanh_tiny_uniform_init, "vanishing_gradient", "8 tanh layers, U(+-0.05) init"),
    _s(saturation_sigmoid_gate_bias, "saturation", "relu(Wx) * sigmoid(Gx + 8) gated layer"),
    _s(exploding_lstm_sgd_lr200, "exploding_gradient", "LSTM, plain SGD at lr=200"),
    _s(
        exploding_transformer_sgd_lr,
        "exploding_gradient",
        "pre-LN Transformer, SGD lr=1 momentum 0.9",
        steps=60,
    ),
    _s(healthy_bilstm, HEALTHY, "bidirectional LSTM over the 8 rows, Adam 1e-2"),
)

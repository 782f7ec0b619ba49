"""PyTorch scenarios: each ``build(seed)`` returns a :class:`TorchRun` whose
``step(i)`` performs optimizer step ``i`` (forward, backward, step, zero_grad) the way
an ordinary training loop does, and returns the loss.

Data is scikit-learn's bundled digits (1797 8x8 images, 10 classes), no download.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.scenarios import HEALTHY, Scenario

BATCH = 64


@dataclass
class TorchRun:
    """A model, its optimizer and one training step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int], float]


# --- data -----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def digits(normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: x of shape (1797, 64), standardised per pixel unless ``normalize=False``
    (raw pixel intensities 0..16)."""
    x, y = _digits_raw()
    if normalize:
        x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-3)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def batches(
    x: torch.Tensor, y: torch.Tensor, seed: int, batch: int = BATCH
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled minibatches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0] - batch + 1, batch):
            idx = order[start : start + batch]
            yield x[idx], y[idx]


def _setup(seed: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)


# --- model builders -------------------------------------------------------------------


def mlp(
    sizes: list[int],
    act: Callable[[], nn.Module],
    *,
    std: float | None = None,
    he: bool = False,
    xavier: bool = False,
    bias: float | None = None,
    out_act: nn.Module | None = None,
) -> nn.Sequential:
    """Linear+activation blocks over ``sizes`` and a linear head (last size)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        hidden = i < len(sizes) - 2
        if std is not None:
            nn.init.normal_(linear.weight, 0.0, std)
            nn.init.zeros_(linear.bias)
        elif he:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        elif xavier:
            nn.init.xavier_normal_(linear.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(linear.bias)
        if bias is not None and hidden:
            nn.init.constant_(linear.bias, bias)
        layers.append(linear)
        if hidden:
            layers.append(act())
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


def _classifier_run(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    seed: int,
    *,
    normalize: bool = True,
    lr_at: Callable[[int], float] | None = None,
) -> TorchRun:
    x, y = digits(normalize)
    data = batches(x, y, seed)

    def step(i: int) -> float:
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(i)
        xb, yb = next(data)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return TorchRun(model, opt, step)


def _loss_run(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> TorchRun:
    """One plain step per call: ``loss_of(model(x), target)``, backward, step, zero_grad."""

    def step(i: int) -> float:
        xb, yb = next(data)
        loss = loss_of(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return TorchRun(model, opt, step)


def _sgd(model: nn.Module, lr: float, momentum: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


# --- faulty scenarios -----------------------------------------------------------------


def vanishing_sigmoid_deep(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [32] * 15 + [10], nn.Sigmoid)
    return _classifier_run(model, _sgd(model, 0.1), seed)


def vanishing_tanh_tiny_init(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [64] * 8 + [10], nn.Tanh, std=0.02)
    return _classifier_run(model, _sgd(model, 0.1), seed)


class _PlainCNN(nn.Module):
    """A deep stack of 3x3 conv + ReLU, no normalisation, no skip connections."""

    def __init__(self, depth: int, channels: int = 16) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        for i in range(depth):
            convs += [nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*convs)
        self.head = nn.Linear(channels * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def vanishing_deep_plain_cnn(seed: int) -> TorchRun:
    _setup(seed)
    model = _PlainCNN(depth=20)
    return _classifier_run(model, _sgd(model, 0.05, momentum=0.9), seed)


def exploding_large_init(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [64] * 6 + [10], nn.ReLU, std=0.5)
    return _classifier_run(model, _sgd(model, 0.01), seed)


def exploding_huge_lr(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [128] * 4 + [10], nn.ReLU, he=True)
    return _classifier_run(model, _sgd(model, 3.0, momentum=0.9), seed)


class _ReluRNN(nn.Module):
    def __init__(self, hidden: int = 32, gain: float = 1.5) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=gain)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.view(-1, 32, 2))  # a digit read as 32 steps of 2 pixels
        return self.head(out[:, -1])


def exploding_rnn_recurrent_weights(seed: int) -> TorchRun:
    _setup(seed)
    model = _ReluRNN(gain=1.5)
    return _classifier_run(model, _sgd(model, 0.1), seed)


def dead_relu_negative_bias(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [128] * 4 + [10], nn.ReLU, he=True, bias=-3.0)
    return _classifier_run(model, _sgd(model, 0.05), seed)


_SPIKE_STEP = 60


def dead_relu_lr_spike(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [128] * 3 + [10], nn.ReLU, he=True)
    opt = _sgd(model, 0.05)
    return _classifier_run(model, opt, seed, lr_at=lambda i: 50.0 if i == _SPIKE_STEP else 0.05)


def saturation_large_init(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [128] * 3 + [10], nn.Sigmoid, std=2.0)
    return _classifier_run(model, _sgd(model, 0.05), seed)


def saturation_unnormalized_inputs(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [64] * 3 + [10], nn.Tanh, xavier=True)
    return _classifier_run(model, _sgd(model, 0.01), seed, normalize=False)


def nonfinite_naive_bce(seed: int) -> TorchRun:
    """Binary 'digit >= 5' with BCE written by hand on raw pixels: once sigmoid(z)
    rounds to 1.0 in float32 (z > ~17), log(1 - p) is -inf and its gradient NaN."""
    _setup(seed)
    model = mlp([64, 64, 64, 1], nn.ReLU, he=True, out_act=nn.Sigmoid())
    x, y = digits(normalize=False)
    target = (y >= 5).float().unsqueeze(1)
    data = batches(x, target, seed)
    opt = _sgd(model, 0.01)
    return _loss_run(
        model, opt, data, lambda p, yb: -(yb * torch.log(p) + (1 - yb) * torch.log(1 - p)).mean()
    )


def nonfinite_sqrt_distance(seed: int) -> TorchRun:
    """A distance loss ``sqrt(sum((f(a) - f(b))**2))`` on pairs that include identical
    images: the derivative of sqrt at 0 is 0/0 = NaN."""
    _setup(seed)
    model = mlp([64, 64, 64, 16], nn.ReLU, he=True)
    x, y = digits()
    data = batches(x, y, seed)
    opt = _sgd(model, 0.01)

    def step(i: int) -> float:
        xb, yb = next(data)
        partner = torch.roll(xb, 1, 0)
        partner[:8] = xb[:8]  # some pairs are the same image
        same = torch.roll(yb, 1, 0) == yb
        same[:8] = True
        dist = torch.sqrt(((model(xb) - model(partner)) ** 2).sum(dim=1))
        loss = torch.where(same, dist, F.relu(2.0 - dist)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return TorchRun(model, opt, step)


def zero_gradient_dead_output(seed: int) -> TorchRun:
    """A regression head ending in ReLU whose bias starts at -10: the output is 0 for
    every sample, so d loss / d output is cut at the ReLU and every gradient is 0."""
    _setup(seed)
    model = mlp([64, 64, 64, 1], nn.ReLU, he=True, out_act=nn.ReLU())
    nn.init.constant_(model[-2].bias, -10.0)
    x, y = digits()
    target = y.float().unsqueeze(1) / 9.0
    data = batches(x, target, seed)
    return _loss_run(model, _sgd(model, 0.05), data, F.mse_loss)


def zero_gradient_rounded_predictions(seed: int) -> TorchRun:
    """The loss compares rounded predictions with the labels (accuracy-like): round()
    has derivative 0 everywhere, so the graph is connected but carries zeros."""
    _setup(seed)
    model = mlp([64, 64, 64, 1], nn.ReLU, he=True, out_act=nn.Sigmoid())
    x, y = digits()
    target = (y >= 5).float().unsqueeze(1)
    data = batches(x, target, seed)
    return _loss_run(model, _sgd(model, 0.05), data, lambda p, yb: F.mse_loss(torch.round(p), yb))


# --- healthy scenarios ----------------------------------------------------------------


def healthy_he_relu_mlp(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [128] * 4 + [10], nn.ReLU, he=True)
    return _classifier_run(model, _sgd(model, 0.05, momentum=0.9), seed)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(x + self.bn2(self.conv2(h)))


class _ResCNN(nn.Module):
    def __init__(self, blocks: int = 6, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[_ResBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x.view(-1, 1, 8, 8)))
        return self.head(h.mean(dim=(2, 3)))


def healthy_bn_residual_cnn(seed: int) -> TorchRun:
    _setup(seed)
    model = _ResCNN()
    return _classifier_run(model, _sgd(model, 0.05, momentum=0.9), seed)


class _PreLNTransformer(nn.Module):
    """Digits as 8 tokens (rows) of 8 features; 3 pre-LN encoder layers, mean pool."""

    def __init__(self, d_model: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.randn(1, 8, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x.view(-1, 8, 8)) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def healthy_preln_transformer(seed: int) -> TorchRun:
    _setup(seed)
    model = _PreLNTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return _classifier_run(model, opt, seed)


class _LSTMClassifier(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.view(-1, 8, 8))
        return self.head(out[:, -1])


def healthy_lstm(seed: int) -> TorchRun:
    _setup(seed)
    model = _LSTMClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _classifier_run(model, opt, seed)


def healthy_sigmoid_output_confident(seed: int) -> TorchRun:
    """'Is it a zero?' with an ``nn.Sigmoid`` output and ``BCELoss``: the output layer
    gets confident (most outputs in the sigmoid's tails), which is the goal."""
    _setup(seed)
    model = mlp([64, 64, 64, 1], nn.ReLU, he=True, out_act=nn.Sigmoid())
    x, y = digits()
    target = (y == 0).float().unsqueeze(1)
    data = batches(x, target, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _loss_run(model, opt, data, F.binary_cross_entropy)


def healthy_relu_sparsity(seed: int) -> TorchRun:
    """A small negative bias leaves 20-30% of the ReLU units idle on a whole batch."""
    _setup(seed)
    model = mlp([64] + [128] * 3 + [10], nn.ReLU, he=True, bias=-0.8)
    return _classifier_run(model, _sgd(model, 0.05, momentum=0.9), seed)


def healthy_frozen_backbone(seed: int) -> TorchRun:
    """The first three layers are frozen (a 'pretrained' backbone): no gradient at all."""
    _setup(seed)
    model = mlp([64] + [128] * 4 + [10], nn.ReLU, he=True)
    for module in list(model)[:6]:
        for p in module.parameters():
            p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return _classifier_run(model, opt, seed)


def healthy_amp_bf16_gradscaler(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [128] * 4 + [10], nn.ReLU, he=True)
    opt = _sgd(model, 0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    x, y = digits()
    data = batches(x, y, seed)

    def step(i: int) -> float:
        xb, yb = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xb), yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return float(loss.detach())

    return TorchRun(model, opt, step)


def healthy_grad_accumulation(seed: int) -> TorchRun:
    """Four micro-batches of 16 per optimizer step."""
    _setup(seed)
    model = mlp([64] + [128] * 4 + [10], nn.ReLU, he=True)
    opt = _sgd(model, 0.05, momentum=0.9)
    x, y = digits()
    data = batches(x, y, seed, batch=16)

    def step(i: int) -> float:
        total = 0.0
        for _ in range(4):
            xb, yb = next(data)
            loss = F.cross_entropy(model(xb), yb) / 4
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        return total

    return TorchRun(model, opt, step)


def healthy_lr_warmup(seed: int) -> TorchRun:
    """AdamW with a linear warm-up from 1e-6 to 3e-3 over 80 steps: tiny first updates."""
    _setup(seed)
    model = mlp([64] + [128] * 4 + [10], nn.GELU, he=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    return _classifier_run(
        model, opt, seed, lr_at=lambda i: 1e-6 + (3e-3 - 1e-6) * min(1.0, i / 80)
    )


def healthy_tanh_xavier_mlp(seed: int) -> TorchRun:
    _setup(seed)
    model = mlp([64] + [64] * 4 + [10], nn.Tanh, xavier=True)
    return _classifier_run(model, _sgd(model, 0.05, momentum=0.9), seed)


def healthy_shallow_sigmoid_mlp(seed: int) -> TorchRun:
    """Two sigmoid layers with default init: sigmoid alone is not a pathology."""
    _setup(seed)
    model = mlp([64, 64, 64, 10], nn.Sigmoid)
    return _classifier_run(model, _sgd(model, 0.5, momentum=0.9), seed)


# --- registry -------------------------------------------------------------------------


def _s(
    fn: Callable[[int], TorchRun],
    expected: str | frozenset[str],
    cause: str,
    steps: int = 100,
    onset: int = 0,
    fast: bool = True,
) -> Scenario:
    labels = HEALTHY if expected == HEALTHY else frozenset(str(expected).split("+"))
    return Scenario(fn.__name__, "torch", labels, fn, steps, cause, onset, fast)


SCENARIOS: tuple[Scenario, ...] = (
    _s(
        vanishing_sigmoid_deep,
        "vanishing_gradient",
        "15 sigmoid layers of width 32, torch default init",
    ),
    _s(vanishing_tanh_tiny_init, "vanishing_gradient", "8 tanh layers, N(0, 0.02) init"),
    _s(
        vanishing_deep_plain_cnn,
        "vanishing_gradient+dead_relu",
        "20 plain 3x3 conv+ReLU layers (16 ch), no BN, no skips, default init",
        fast=False,
    ),
    _s(
        exploding_large_init,
        "exploding_gradient+nonfinite_gradient",
        "6 ReLU layers, N(0, 0.5) init on width 64 (~2.8x gain per layer)",
    ),
    _s(
        exploding_huge_lr,
        "exploding_gradient+nonfinite_gradient",
        "He-init ReLU MLP, SGD lr=3 momentum 0.9",
    ),
    _s(
        exploding_rnn_recurrent_weights,
        "exploding_gradient",
        "ReLU RNN, recurrent weights orthogonal x1.5, 32 time steps, SGD lr=0.1",
    ),
    _s(dead_relu_negative_bias, "dead_relu", "He-init ReLU MLP with every hidden bias at -3"),
    _s(
        dead_relu_lr_spike,
        "dead_relu+exploding_gradient",
        f"healthy ReLU MLP hit by one lr=50 step at step {_SPIKE_STEP}",
        steps=160,
        onset=_SPIKE_STEP,
    ),
    _s(saturation_large_init, "saturation", "3 sigmoid layers, N(0, 2) init on width 128"),
    _s(
        saturation_unnormalized_inputs,
        "saturation",
        "tanh MLP, Xavier init, raw 0..16 pixel inputs",
    ),
    _s(
        nonfinite_naive_bce,
        "nonfinite_gradient",
        "hand-written BCE log(1 - sigmoid(z)) on raw pixels: log(0)",
    ),
    _s(
        nonfinite_sqrt_distance,
        "nonfinite_gradient",
        "distance loss sqrt(|f(a) - f(b)|^2) with identical pairs: d sqrt(0) = NaN",
    ),
    _s(
        zero_gradient_dead_output,
        "zero_gradient",
        "ReLU on a regression output whose bias starts at -10: the output is always 0",
    ),
    _s(
        zero_gradient_rounded_predictions,
        "zero_gradient",
        "MSE on round(sigmoid(z)): the derivative of round is 0 everywhere",
    ),
    _s(healthy_he_relu_mlp, HEALTHY, "He-init 4x128 ReLU MLP, SGD momentum"),
    _s(healthy_bn_residual_cnn, HEALTHY, "BatchNorm residual CNN, 6 blocks (13 convs)"),
    _s(healthy_preln_transformer, HEALTHY, "3-layer pre-LN Transformer encoder, AdamW"),
    _s(healthy_lstm, HEALTHY, "LSTM over the 8 rows of a digit, Adam"),
    _s(
        healthy_sigmoid_output_confident,
        HEALTHY,
        "nn.Sigmoid output + BCELoss trained to confident predictions",
        steps=150,
    ),
    _s(healthy_relu_sparsity, HEALTHY, "normal ReLU sparsity: 20-30% of units idle per batch"),
    _s(healthy_frozen_backbone, HEALTHY, "first 3 layers frozen, no gradient"),
    _s(healthy_amp_bf16_gradscaler, HEALTHY, "CPU bf16 autocast + torch.amp.GradScaler"),
    _s(healthy_grad_accumulation, HEALTHY, "4 micro-batches accumulated per step"),
    _s(healthy_lr_warmup, HEALTHY, "GELU MLP, AdamW with linear warm-up from lr=1e-6", steps=150),
    _s(healthy_tanh_xavier_mlp, HEALTHY, "4 tanh layers, Xavier init"),
    _s(healthy_shallow_sigmoid_mlp, HEALTHY, "2 sigmoid layers, default init"),
)

assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)

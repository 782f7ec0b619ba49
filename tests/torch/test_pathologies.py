"""Real training runs: each pathology is found, healthy networks stay quiet."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import he_relu_mlp, mlp, rules_of, train  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.guard import GradwatchWarning  # noqa: E402


def test_deep_sigmoid_mlp_vanishes_and_suggests_relu_family_and_he_init() -> None:
    torch.manual_seed(0)
    _, report = train(mlp(nn.Sigmoid, depth=10), steps=50)
    finding = report.by_rule("vanishing_gradient")
    assert finding is not None, report.findings
    first_fixes = [f.id for f in finding.fixes[:2]]
    assert "leaky_relu" in first_fixes and "he_init" in first_fixes
    assert finding.evidence["first_last_norm_ratio"] < 1e-2
    # detected within 50 steps
    assert finding.first_step < 50


def test_deep_sigmoid_mlp_with_unit_normal_init_saturates() -> None:
    # N(0,1) weights on 256 inputs put pre-activations at std ~8: sigmoid tails.
    torch.manual_seed(0)
    _, report = train(mlp(nn.Sigmoid, depth=6, width=256, std=1.0), steps=40)
    finding = report.by_rule("saturation")
    assert finding is not None, report.findings
    assert finding.evidence["tail_fraction"] > 0.5


@pytest.mark.parametrize("lr,std", [(10.0, None), (0.01, 0.5)], ids=["huge_lr", "large_init"])
def test_huge_lr_or_large_init_explodes_or_goes_nonfinite(lr: float, std: float | None) -> None:
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=8, std=std) if std else he_relu_mlp(depth=6)
    _, report = train(model, steps=40, lr=lr)
    assert rules_of(report) & {"exploding_gradient", "nonfinite_gradient"}, report.findings
    assert not report.healthy


def test_large_init_is_exploding_even_when_the_weights_barely_move() -> None:
    # N(0, 1) weights on width 32 with a learning rate so small the weights stay put:
    # norms are huge from the first step but flat across layers and steps; only the
    # gradient-to-weight size shows it.
    torch.manual_seed(0)
    _, report = train(mlp(nn.ReLU, depth=8, width=32, std=1.0), steps=40, lr=1e-12)
    finding = report.by_rule("exploding_gradient")
    assert finding is not None, report.findings
    assert finding.evidence["grad_to_weight_ratio"] > 100
    assert finding.evidence["norm_growth"] < 10  # nothing grew: size alone
    assert finding.fixes[0].id in {"he_init", "xavier_init"}


def test_relu_with_bias_minus_five_is_dead() -> None:
    torch.manual_seed(0)
    _, report = train(mlp(nn.ReLU, depth=6, std=0.1, bias=-5.0), steps=40)
    finding = report.by_rule("dead_relu")
    assert finding is not None, report.findings
    assert finding.evidence["dead_unit_fraction"] > 0.9
    assert "leaky_relu" in [f.id for f in finding.fixes]


def test_healthy_he_init_relu_mlp_is_quiet() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        _, report = train(he_relu_mlp(depth=8), steps=60, on_finding="warn")
    assert report.healthy, report.findings
    assert report.steps_observed == 60


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(x + self.bn2(self.conv2(h)))


def _res_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _ResBlock(8),
        _ResBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_batchnorm_residual_cnn_is_quiet() -> None:
    torch.manual_seed(0)
    model = _res_cnn()
    x = torch.randn(16, 3, 8, 8)
    y = torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    every = gradwatch.adapters.torch.every(1)
    gw = gradwatch.watch(
        model, opt, on_finding="warn", grad_schedule=every, activation_schedule=every, show=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        for _ in range(40):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        report = gw.report(show=False)
    gw.close()
    assert report.healthy, report.findings
    # The shared ReLU of each block is called twice per forward: two activation layers.
    assert report.steps_observed == 40


def test_transformer_encoder_layer_is_quiet_and_its_functional_relu_is_observed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0
        ),
        nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0
        ),
    )
    x = torch.randn(8, 10, 32)
    target = torch.randn(8, 10, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    every = gradwatch.adapters.torch.every(1)
    gw = gradwatch.watch(
        model, opt, on_finding="warn", grad_schedule=every, activation_schedule=every, show=False
    )
    seen: list[str] = []
    original = gw.analyzer.observe_stats

    def spy(stats: list[gradwatch.StepStats]) -> None:
        for s in stats:
            seen.extend(s.act_layers)
        original(stats)

    gw.analyzer.observe_stats = spy  # type: ignore[method-assign]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        for _ in range(30):
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
            opt.zero_grad()
        report = gw.report(show=False)
    gw.close()
    assert report.healthy, report.findings
    assert {"0.activation", "1.activation"} <= set(seen)
    # close() restored the functional activation
    assert model[0].activation is nn.functional.relu

"""``dead_relu`` blames only layers a ReLU feeds: the torch adapter's layer info (issues
#13, #14). Every label is verified with plain torch (forward hooks, ``.grad``), without
gradwatch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch.layer_info import TorchLayerInfo  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch_helpers import MnistNet, mlp, watch_every_step  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.layer_info import LayerInfo  # noqa: E402
from gradwatch.rules import Rule, RuleContext, Symptom  # noqa: E402


def _watch(model: nn.Module, opt: torch.optim.Optimizer, **kw: object) -> gradwatch.TorchWatch:
    return watch_every_step(model, opt, strict=True, **kw)


def _fit(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    **kw: object,
) -> gradwatch.Report:
    """Train ``steps`` SGD steps (lr 0.01) on one batch under an every-step watch; the report."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt, **kw)
    for _ in range(steps):
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    report = gw.report(show=False)
    gw.close()
    return report


# --- the MNIST Net of pytorch/examples -------------------------------------------------


def _dead_unit_fractions(model: MnistNet, x: torch.Tensor) -> dict[str, float]:
    """Plain forward hooks: per layer, the fraction of its units (channels, features)
    whose pre-activation is <= 0 for every sample, i.e. dead behind a ReLU."""
    outs: dict[str, torch.Tensor] = {}
    layers = {"conv1": model.conv1, "conv2": model.conv2, "fc1": model.fc1, "fc2": model.fc2}
    handles = [
        layer.register_forward_hook(lambda m, a, o, n=name: outs.__setitem__(n, o.detach()))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    fractions = {}
    for name, out in outs.items():
        units = out.transpose(0, 1).reshape(out.shape[1], -1)  # unit axis 1 (NCHW, NC)
        fractions[name] = float((units <= 0).all(dim=1).float().mean())
    return fractions


def test_mnist_net_with_biases_at_minus_5_names_conv1_conv2_fc1_not_fc2() -> None:
    torch.manual_seed(0)
    model = MnistNet(side=12)
    with torch.no_grad():
        for layer in (model.conv1, model.conv2, model.fc1, model.fc2):
            layer.bias.fill_(-5.0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 12, 12, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    dead = _dead_unit_fractions(model, x)
    # The label: every unit behind the three ReLUs is dead; fc2 feeds log_softmax only.
    assert dead["conv1"] == dead["conv2"] == dead["fc1"] == 1.0
    report = _fit(model, F.nll_loss, x, y, 30)
    finding = report.by_rule("dead_relu")
    assert finding is not None, report.findings
    assert finding.layers == ("conv1", "conv2", "fc1")
    assert "fc2" not in finding.layers and "fc2" not in finding.message
    assert "mnistnet#relu:0" in finding.message  # the sites stay named in the message
    assert report.coverage is not None and report.coverage.activation_sites == {"relu": 3}
    assert not any("No activation" in note for note in report.notes)


# --- recurrent language models after a learning-rate blow-up -----------------------


class _LanguageModel(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], vocab: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.rnn = cell(16, 32, batch_first=True)
        self.head = nn.Linear(32, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out)


def _train_lm(model: _LanguageModel, steps: int, watch: bool) -> tuple[dict[str, float], object]:
    """SGD at lr 200 (issue #14's blow-up); returns the median exact-zero gradient
    fraction per parameter after step 20, measured on ``.grad``, and the report."""
    opt = torch.optim.SGD(model.parameters(), lr=200.0)
    gw = _watch(model, opt) if watch else None
    gen = torch.Generator().manual_seed(0)
    zeros: dict[str, list[float]] = {}
    for step in range(steps):
        tokens = torch.randint(0, 64, (8, 21), generator=gen)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
        if step >= 20:
            for name, p in model.named_parameters():
                zeros.setdefault(name, []).append(float((p.grad == 0).float().mean()))
        opt.step()
        opt.zero_grad()
    medians = {name: sorted(v)[len(v) // 2] for name, v in zeros.items()}
    report = gw.report(show=False) if gw is not None else None
    if gw is not None:
        gw.close()
    return medians, report


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_saturated_recurrent_language_model_gets_no_dead_relu(cell: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    model = _LanguageModel(cell)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    zeros, _ = _train_lm(model, 60, watch=False)
    # The label: emb and rnn gradients are mostly exact zeros (saturated gates, rows of
    # tokens not in the batch), above the 70% that made the old fallback blame them.
    assert zeros["emb.weight"] >= 0.7 and zeros["rnn.weight_hh_l0"] >= 0.7, zeros
    model.load_state_dict(initial)
    _, report = _train_lm(model, 60, watch=True)
    assert isinstance(report, gradwatch.Report)
    assert report.by_rule("dead_relu") is None, report.findings


# --- nn.Sequential ReLU MLP: the layer type says what it feeds ----------------------


def _dead_second_layer() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=3, width=64)  # Linear "0", "2", "4", ReLU "1", "3", "5", head "6"
    with torch.no_grad():
        model[2].bias[:56].fill_(-20.0)  # 56 of the 64 units after the second Linear die
    gen = torch.Generator().manual_seed(0)
    return model, torch.randn(64, 32, generator=gen), torch.randn(64, 1, generator=gen)


def _run_mlp(**kw: object) -> gradwatch.Report:
    model, x, y = _dead_second_layer()
    with torch.no_grad():  # the label, by a plain forward: ReLU "3" dead, "1" and "5" alive
        h1 = F.relu(model[0](x))
        h2 = F.relu(model[2](h1))
        h3 = F.relu(model[4](h2))
    dead = [float((h <= 0).all(dim=0).float().mean()) for h in (h1, h2, h3)]
    assert dead[1] >= 0.85 and dead[0] < 0.5 and dead[2] < 0.5, dead
    return _fit(model, F.mse_loss, x, y, 40, **kw)


def test_sequential_relu_mlp_without_activation_capture_falls_back_on_its_relu_layers() -> None:
    report = _run_mlp(activations=False)
    finding = report.by_rule("dead_relu")
    assert finding is not None, report.findings
    # "2" has dead outputs (zero rows); "4", fed by them, has zero columns and also feeds a
    # ReLU: exact zeros cannot tell the two apart. "0" learns; the head feeds no ReLU.
    assert finding.layers == ("2", "4")
    assert "exactly zero" in finding.message


def test_sequential_relu_mlp_with_activation_capture_names_the_dead_site() -> None:
    report = _run_mlp()
    finding = report.by_rule("dead_relu")
    assert finding is not None, report.findings
    # One dead ReLU ("3") but two ReLU-fed layers with zero gradients ("2" and "4"):
    # which one feeds it is not told apart, so the site is named, not a guess.
    assert finding.layers == ("3",)


# --- a layer holding a stack of weights -------------------------------------------------


class _SigmoidStack(nn.Module):
    """``depth`` sigmoid layers whose weights live in one ParameterList."""

    def __init__(self, depth: int = 8, width: int = 32) -> None:
        super().__init__()
        self.ws = nn.ParameterList(
            nn.Parameter(torch.randn(width, width) / width**0.5) for _ in range(depth)
        )
        self.bs = nn.ParameterList(nn.Parameter(torch.zeros(width)) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w, b in zip(self.ws, self.bs, strict=True):
            x = torch.sigmoid(x @ w + b)
        return x


class _StackNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stack = _SigmoidStack()
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(x))


def test_parameter_list_stack_gets_a_layer_group_per_weight() -> None:
    torch.manual_seed(0)
    model = _StackNet()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 32, generator=gen), torch.randn(32, 1, generator=gen)
    report = _fit(model, F.mse_loss, x, y, 12)
    names = [layer.name for layer in report.layers]
    assert [f"stack.ws.{i}" for i in range(8)] == [n for n in names if n.startswith("stack.ws")]
    assert "stack.ws" not in names and "head" in names


# --- what the adapter infers ------------------------------------------------------------


def test_layer_info_fan_in_recurrence_kind_and_feeds() -> None:
    model = nn.ModuleDict(
        {
            "conv": nn.Conv2d(8, 16, (3, 5), groups=2),
            "emb": nn.Embedding(10, 4),
            "lstm": nn.LSTM(4, 6, num_layers=2, bidirectional=True),
            "rnn": nn.RNN(3, 5, nonlinearity="relu"),
            "mlp": nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.BatchNorm1d(8), nn.GELU()),
            "pre": nn.Sequential(nn.ReLU(), nn.Linear(8, 2)),
            "enc": nn.TransformerEncoderLayer(8, 2, 16),
        }
    )
    info = TorchLayerInfo(model).current()
    assert info["conv.weight"].fan_in == 8 // 2 * 3 * 5 and info["conv.bias"].fan_in is None
    assert info["conv.weight"].kind == "Conv2d" and info["conv.weight"].feeds is None
    assert info["emb.weight"].fan_in is None and not info["emb.weight"].recurrent
    assert info["lstm.weight_ih_l0"].fan_in == 4 and info["lstm.weight_ih_l1"].fan_in == 12
    assert info["lstm.weight_hh_l1_reverse"].fan_in == 6 and info["lstm.weight_hh_l0"].recurrent
    assert info["lstm.weight_ih_l0"].feeds is None  # gates: sigmoid and tanh, no one kind
    assert info["rnn.weight_hh_l0"].feeds == "relu" and info["rnn.bias_ih_l0"].recurrent
    assert info["mlp.0.weight"].feeds == "gelu" and info["mlp.0.weight"].fan_in == 4
    assert info["pre.1.weight"].feeds is None  # the ReLU acts on its input, not its output
    assert info["enc.linear1.weight"].feeds == "relu" and info["enc.linear2.weight"].feeds is None
    assert all(i.group is None for i in info.values())


# --- what the adapter sees on sampled forwards, as the rules get it ------------------


class _Seen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.bn = nn.BatchNorm1d(8)
        self.w = nn.Parameter(torch.randn(8, 8) / 8**0.5)
        self.b = nn.Parameter(torch.zeros(8))
        self.res = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 8)
        self.up = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.drop(self.fc(x))).view(-1, 8))  # through dropout, BN, view
        h = torch.sigmoid(h @ self.w + self.b)  # a custom layer: matmul and bias add
        h = torch.tanh(h + self.res(h))  # a residual sum: res does not feed tanh alone
        h = F.silu(self.gate(h)) * self.up(h)  # a gated MLP: gate feeds silu, up does not
        return self.head(h)


@dataclass(frozen=True)
class _LayerInfoProbe(Rule):
    """Records what the rules are told of each layer group; never fires."""

    id = "layer_info_probe"
    seen: list[dict[str, LayerInfo]] = field(default_factory=list, compare=False)

    def check(self, ctx: RuleContext) -> Symptom | None:
        self.seen.append(dict(ctx.layer_info))
        return None


def test_seen_activations_reach_the_rules_as_layer_info() -> None:
    torch.manual_seed(0)
    model = _Seen()
    probe = _LayerInfoProbe(warmup_steps=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt, rules=[probe])
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    for _ in range(6):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    gw.flush()
    gw.close()
    info = probe.seen[-1]
    feeds = {group: i.feeds for group, i in info.items()}
    assert feeds["fc"] == feeds["bn"] == "relu"
    assert feeds["w"] == feeds["b"] == "sigmoid"
    assert feeds["gate"] == "silu"
    assert feeds["res"] is None and feeds["up"] is None and feeds["head"] is None
    assert info["fc"].fan_in == 8 and info["fc"].kind == "Linear"

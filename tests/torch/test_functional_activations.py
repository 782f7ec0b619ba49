"""Functional activations (F.relu, torch.sigmoid... inside forward()) seen on sampled steps."""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch import every  # noqa: E402
from gradwatch.adapters.torch.functional import spec_of  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch_helpers import record_stats, train, watch_every_step  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.activations import input_tail_bound, tail_bounds  # noqa: E402


class SigmoidMLP(nn.Module):
    """``depth`` Linear layers with ``torch.sigmoid`` in forward() and a linear head."""

    def __init__(self, depth: int = 20, width: int = 256, std: float | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32 if i == 0 else width, width) for i in range(depth))
        self.head = nn.Linear(width, 1)
        if std is not None:
            for layer in self.layers:
                nn.init.normal_(layer.weight, 0.0, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return self.head(x)


def _watch(model: nn.Module, opt: torch.optim.Optimizer | None = None, **kw: object):
    return watch_every_step(model, opt, **{"strict": True, **kw})


def _sigmoid_labels(model: SigmoidMLP, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Plain hooks: the first/last layer gradient-norm ratio and the median fraction of
    hidden sigmoid outputs in the 1% tails, at init."""
    outs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: outs.append(o)) for layer in model.layers
    ]
    F.mse_loss(model(x), y).backward()
    for h in handles:
        h.remove()
    lo, hi = tail_bounds("sigmoid")
    tails = sorted(float(((o.sigmoid() <= lo) | (o.sigmoid() >= hi)).float().mean()) for o in outs)
    ratio = float(model.layers[0].weight.grad.norm() / model.layers[-1].weight.grad.norm())
    model.zero_grad()
    return ratio, tails[len(tails) // 2]


def _train_sigmoid(model: SigmoidMLP, steps: int = 60) -> gradwatch.Report:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=gen), torch.randn(64, 1, generator=gen)
    ratio, tail = _sigmoid_labels(model, x, y)
    _, report = train(model, steps=steps, x=x, y=y, strict=True)
    return report, ratio, tail  # type: ignore[return-value]


def test_functional_sigmoid_mlp_at_default_init_vanishes_and_ranks_leaky_relu_first() -> None:
    torch.manual_seed(0)
    report, ratio, tail = _train_sigmoid(SigmoidMLP())
    assert ratio < 1e-3 and tail < 0.1  # the label: vanishing, not saturated
    finding = report.by_rule("vanishing_gradient")
    assert finding is not None, report.findings
    assert finding.fixes[0].id == "leaky_relu"
    assert not any("ReLU-family" in fix.text for fix in finding.fixes[:1])
    assert report.by_rule("saturation") is None
    assert report.coverage is not None and report.coverage.activation_sites == {"sigmoid": 20}


def test_functional_sigmoid_mlp_at_unit_normal_init_saturates() -> None:
    torch.manual_seed(0)
    report, _, tail = _train_sigmoid(SigmoidMLP(std=1.0), steps=40)
    assert tail > 0.5  # the label: saturated
    finding = report.by_rule("saturation")
    assert finding is not None, report.findings
    assert finding.evidence["tail_fraction"] > 0.5


def _gelu_mlp(bias: float | None) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    if bias is not None:
        with torch.no_grad():
            model[0].bias.fill_(bias)
            model[2].bias.fill_(bias)
    return model


def test_gelu_units_in_the_flat_tail_are_dead_and_a_healthy_gelu_net_is_quiet() -> None:
    _, dead = train(_gelu_mlp(-8.0), steps=40, strict=True)
    finding = dead.by_rule("dead_relu")
    assert finding is not None and "flat negative tail" in finding.message
    _, healthy = train(_gelu_mlp(None), steps=40, strict=True)
    assert healthy.problems == ()


def test_every_listed_function_is_seen_with_its_kind_and_bounds() -> None:
    cases = {
        F.relu: "relu", torch.relu: "relu", torch.Tensor.relu: "relu", torch.relu_: "relu",
        F.leaky_relu: "leaky_relu", F.elu: "elu", F.gelu: "gelu", F.silu: "silu",
        torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", torch.tanh: "tanh",
        torch.Tensor.tanh: "tanh", F.hardtanh: "hard_tanh", F.softplus: "softplus",
        F.relu6: "relu6", F.hardsigmoid: "hard_sigmoid", F.hardswish: "silu", F.mish: "silu",
    }  # fmt: skip
    for fn, kind in cases.items():
        spec = spec_of(fn)
        assert spec is not None and spec.kind == kind, fn
    assert spec_of(torch.add) is None
    assert input_tail_bound("gelu") == pytest.approx(-3.0217, abs=1e-3)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))  # a module site: its own F.relu is not a second one
        h = F.gelu(h, approximate="tanh") + torch.tanh(h) + F.silu(h.clone(), inplace=True)
        return F.elu(h) + torch.relu_(h.clone()) + h.sigmoid() + F.leaky_relu(h)


class NewGELUActivation(nn.Module):
    """Hugging Face's gelu_new: tanh inside, a module site of kind gelu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Block(), NewGELUActivation(), nn.Linear(8, 1))


def _run(model: nn.Module, steps: int, watch: bool, **kw: object):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = _watch(model, opt, **kw) if watch else None
    seen = record_stats(gw) if gw is not None else []
    outs, grads = [], []
    for _ in range(steps):
        out = model(x)
        out.pow(2).mean().backward()
        outs.append(out.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    if gw is not None:
        gw.flush()
        gw.close()
    return outs, grads, seen


def test_sites_are_named_by_innermost_module_once_per_forward_without_double_counting() -> None:
    _, _, seen = _run(_model(), 2, True)
    names = dict(zip(seen[0].act_layers, seen[0].act_kinds, strict=True))
    assert names == {
        "0.act": "relu",
        "0#gelu:0": "gelu",
        "0#tanh:0": "tanh",
        "0#silu:0": "silu",
        "0#elu:0": "elu",
        "0#relu:0": "relu",
        "0#sigmoid:0": "sigmoid",
        "0#leaky_relu:0": "leaky_relu",
        "1": "gelu",
    }
    assert seen[1].act_layers == seen[0].act_layers


def test_the_mode_never_changes_outputs_or_gradients_bit_for_bit() -> None:
    plain_out, plain_grads, _ = _run(_model(), 4, False)
    out, grads, seen = _run(_model(), 4, True)
    assert seen and seen[0].act_layers  # the mode was on
    for a, b in zip(plain_out, out, strict=True):
        assert torch.equal(a, b)
    for ga, gb in zip(plain_grads, grads, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))


def test_eval_and_no_grad_forwards_are_not_observed_and_unsampled_steps_have_no_mode() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = _watch(model, opt, activation_schedule=lambda step: step == 0)
    seen = record_stats(gw)
    x = torch.randn(4, 8)
    stack = torch._C._len_torch_function_stack
    model.eval()
    model(x)  # a validation forward on the sampled step 0
    with torch.no_grad():
        model.train()
        model(x)
    assert stack() == 0
    model.train()
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    assert stack() == 0  # popped when the root returned
    depth_inside: list[int] = []
    hook = model[2].register_forward_hook(lambda m, a, o: depth_inside.append(stack()))
    for _ in range(2):  # steps 1 and 2: not sampled
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    hook.remove()
    gw.flush()
    gw.close()
    assert depth_inside == [0, 0]
    assert not torch.nn.modules.module._global_forward_hooks
    acts = [s for s in seen if s.act_layers]
    assert len(acts) == 1 and acts[0].step == 0


def test_a_forward_that_raises_pops_the_mode() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.relu(x)
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(2, 2), Boom())
    gw = _watch(model)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(3, 2))
    assert torch._C._len_torch_function_stack() == 0
    assert not torch.nn.modules.module._global_forward_pre_hooks
    gw.close()


def test_no_activation_tensor_outlives_the_step() -> None:
    import weakref

    refs: list[weakref.ref[torch.Tensor]] = []

    class Keep(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(x)
            refs.append(weakref.ref(y))
            return y * 1.0

    model = nn.Sequential(nn.Linear(4, 4), Keep(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = _watch(model, opt)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    assert refs and refs[0]() is None
    gw.close()


def test_coverage_counts_parameters_and_sites_and_the_note_is_only_said_when_true() -> None:
    class Frozenish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)  # no activation at all; `unused` never gets a gradient

    _, report = train(Frozenish(), steps=12, x=torch.randn(8, 4), y=torch.randn(8, 4))
    cov = report.coverage
    assert cov is not None
    assert (cov.parameters_trainable, cov.parameters_observed) == (4, 2)
    assert cov.layers_not_observed == ("unused",)
    assert any("No activation was seen" in note for note in report.notes)
    assert (
        report.render()
        .splitlines()[0]
        .startswith("gradwatch: healthy where observed; 1 layer not observed")
    )
    assert gradwatch.Report.from_json(report.to_json()) == report


def test_a_copy_of_a_watched_model_is_not_observed_through_the_mode() -> None:
    model = _model()
    gw = _watch(model, activation_schedule=every(1))
    seen = record_stats(gw)
    twin = copy.deepcopy(model)
    twin(torch.randn(3, 8)).sum().backward()
    gw.flush()
    gw.close()
    assert all(not s.act_layers for s in seen)

"""What one step is in real loops: optimizer.step(closure) (LBFGS, SGD), gradients thrown
away by zero_grad() without a GradScaler, a DCGAN loop with two watches, optimizer
wrappers, parameters added later (add_param_group, to_empty after meta init)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import he_relu_mlp, record_stats, watch_every_step  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.guard import GradwatchWarning  # noqa: E402

_watch = watch_every_step


def _norms_of(seen: list, layer: str) -> list[float]:
    return [s.grad_norm[s.grad_layers.index(layer)] for s in seen if s.grad_layers]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda params: torch.optim.LBFGS(params, lr=0.5, max_iter=4, history_size=3),
        lambda params: torch.optim.SGD(params, lr=0.05),
    ],
    ids=["lbfgs", "sgd"],
)
def test_step_with_closure_reads_the_gradients_the_optimizer_applies(make_opt) -> None:
    torch.manual_seed(0)
    model = he_relu_mlp(depth=3, width=16)
    opt = make_opt(model.parameters())
    gw = _watch(model, opt)
    seen = record_stats(gw)
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    reference: list[float] = []  # the naive reference: the closure's own first gradient
    calls = [0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if calls[0] == 0:
            reference.append(float(model[0].weight.grad.norm()))
        calls[0] += 1
        return loss

    for _ in range(8):
        calls[0] = 0
        opt.step(closure)
    gw.flush()
    assert gw.step_count == 8
    assert _norms_of(seen, "0.weight") == pytest.approx(reference, rel=1e-5)
    # every step's activations are those of its first closure call, none of the line search
    assert all("1" in s.act_layers for s in seen)
    gw.close()


def test_zero_grad_between_accumulated_backwards_without_scaler_is_no_skipped_step() -> None:
    torch.manual_seed(0)
    model = he_relu_mlp(depth=3, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt)
    seen = record_stats(gw)
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    for _ in range(30):
        nn.functional.mse_loss(model(x), y).backward()  # a pass whose gradients are dropped
        opt.zero_grad()
        for xb, yb in ((x[:16], y[:16]), (x[16:], y[16:])):
            (nn.functional.mse_loss(model(xb), yb) / 2).backward()
        opt.step()
        opt.zero_grad()
    report = gw.report(show=False)
    gw.close()
    assert gw.step_count == 30
    assert not any(s.skipped_step for s in seen)
    assert report.by_rule("nonfinite_gradient") is None
    assert report.healthy, report.findings


def test_scaler_with_accumulation_and_healthy_gradients_skips_nothing() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    if not scaler.is_enabled():
        pytest.skip("GradScaler is disabled on CPU in this torch build")
    torch.manual_seed(0)
    model = he_relu_mlp(depth=3, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt, scaler=scaler)
    seen = record_stats(gw)
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    for _ in range(20):
        for xb, yb in ((x[:16], y[:16]), (x[16:], y[16:])):
            scaler.scale(nn.functional.mse_loss(model(xb), yb) / 2).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    gw.flush()
    assert gw.step_count == 20
    assert not any(s.skipped_step for s in seen)
    gw.close()


def _gan() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 2))
    disc = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    return gen, disc


def test_dcgan_loop_counts_one_step_per_optimizer_step_and_stays_healthy() -> None:
    gen, disc = _gan()
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)  # no finding is warned
        gw_g = gradwatch.watch(gen, opt_g, show=False)
        gw_d = gradwatch.watch(disc, opt_d, show=False)
        bce = nn.BCEWithLogitsLoss()
        data = torch.Generator().manual_seed(1)
        ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
        for _ in range(150):
            angle = torch.rand(64, 1, generator=data) * 6.283
            real = torch.cat([angle.cos(), angle.sin()], dim=1)  # points on a circle
            disc.zero_grad()  # drops the G step's gradients on D: no skipped step
            bce(disc(real), ones).backward()
            fake = gen(torch.randn(64, 8, generator=data))
            bce(disc(fake.detach()), zeros).backward()
            opt_d.step()
            gen.zero_grad()
            bce(disc(fake), ones).backward()  # G's step flows through D
            opt_g.step()
        report_g, report_d = gw_g.report(show=False), gw_d.report(show=False)
    assert gw_d.step_count == 150 and gw_g.step_count == 150
    assert list(report_d.findings) == [] and list(report_g.findings) == []
    gw_g.close()
    gw_d.close()


class _Wrapper:
    """An optimizer wrapper gradwatch has never heard of, holding it as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


def test_optimizer_wrappers_are_unwrapped_and_bad_optimizers_are_value_errors() -> None:
    model = he_relu_mlp(depth=2, width=8)
    opt = _Wrapper(_Wrapper(torch.optim.SGD(model.parameters(), lr=0.01)))
    gw = _watch(model, opt)
    for _ in range(3):
        model(torch.randn(4, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert gw.step_count == 3
    gw.close()
    with pytest.raises(ValueError, match="optimizer"):
        gradwatch.watch(model, object())  # type: ignore[arg-type]
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        gradwatch.watch(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="scaler"):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler="cpu")  # type: ignore[arg-type]


def test_parameters_added_with_add_param_group_are_watched_from_then_on() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt)
    seen = record_stats(gw)
    x = torch.randn(16, 32)
    for step in range(10):
        if step == 5:
            model.append(nn.Tanh())
            model.append(nn.Linear(8, 1))
            opt.add_param_group({"params": model[4].parameters()})
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    gw.flush()
    assert "4.weight" not in seen[4].grad_layers
    assert "4.weight" in seen[5].grad_layers  # the first step of the new group
    assert seen[-1].grad_norm[seen[-1].grad_layers.index("4.weight")] > 0
    assert "3" in seen[-1].act_layers and "3" not in seen[4].act_layers
    assert gw.step_count == 10
    gw.close()


def test_parameters_replaced_by_to_empty_after_meta_init_are_watched() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))
    gw = _watch(model)  # no optimizer: a step is a backward pass, seen by the new parameters
    seen = record_stats(gw)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for layer in (model[0], model[2]):
        layer.reset_parameters()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 32)
    reference = []
    for _ in range(4):
        model(x).pow(2).mean().backward()
        reference.append(float(model[2].weight.grad.norm()))
        opt.step()
        opt.zero_grad()
    gw.flush()
    assert gw.step_count == 4
    assert _norms_of(seen, "2.weight") == pytest.approx(reference, rel=1e-5)
    assert all("1" in s.act_layers for s in seen)
    gw.close()

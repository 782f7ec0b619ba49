"""Training-loop variants: AMP + GradScaler, accumulation, frozen/unfrozen, sparse,
inplace activations, no optimizer, steps marked by hand."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import he_relu_mlp, mlp, record_stats, watch_every_step  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.guard import GradwatchWarning  # noqa: E402

_watch = watch_every_step


def _scaler() -> torch.amp.GradScaler:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    if not scaler.is_enabled():
        pytest.skip("GradScaler is disabled on CPU in this torch build")
    return scaler


def test_gradscaler_grads_are_read_unscaled() -> None:
    torch.manual_seed(0)
    model = he_relu_mlp(depth=3, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = _scaler()
    gw = _watch(model, opt)
    seen = record_stats(gw)
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    reference: list[float] = []
    for _ in range(25):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        reference.append(float(model[0].weight.grad.norm()))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    report = gw.report(show=False)
    gw.close()
    got = [s.grad_norm[s.grad_layers.index("0.weight")] for s in seen if s.grad_layers]
    assert got == pytest.approx(reference, rel=1e-5)
    assert max(got) < 100.0  # x65536 scaled gradients would be far larger
    assert report.healthy, report.findings


def test_gradscaler_skipped_steps_are_nonfinite_evidence_and_never_crash() -> None:
    torch.manual_seed(0)
    model = he_relu_mlp(depth=3, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = _scaler()
    gw = _watch(model, opt, scaler=scaler)  # skipped steps are read from the scaler
    seen = record_stats(gw)
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    for step in range(30):
        out = model(x)
        if step >= 5:
            out = out * float("inf")  # every step from 5 on overflows: the scaler skips it
        scaler.scale(nn.functional.mse_loss(out, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    report = gw.report(show=False)
    gw.close()
    skipped = [s for s in seen if s.skipped_step]
    assert len(skipped) >= 20  # the 25th skip is only noticed at the next backward
    finding = report.by_rule("nonfinite_gradient")
    assert finding is not None
    assert finding.evidence["skipped_steps_in_window"] >= 8


def test_gradient_accumulation_matches_unaccumulated_reference() -> None:
    torch.manual_seed(0)
    model = he_relu_mlp(depth=3, width=16)
    ref = he_relu_mlp(depth=3, width=16)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt, activations=False)
    seen = record_stats(gw)
    ref_norms = []
    for _ in range(5):
        nn.functional.mse_loss(ref(x), y).backward()
        ref_norms.append([float(p.grad.norm()) for p in ref.parameters()])
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.01 * p.grad
        ref.zero_grad()
        for xb, yb in ((x[:16], y[:16]), (x[16:], y[16:])):
            (nn.functional.mse_loss(model(xb), yb) / 2).backward()
        opt.step()
        opt.zero_grad()
    gw.close()
    assert len(seen) == 5  # one step per optimizer.step(), not per backward
    for s, want in zip(seen, ref_norms, strict=True):
        assert list(s.grad_norm) == pytest.approx(want, rel=1e-4)


def test_frozen_layers_absent_never_vanishing_and_unfreezing_is_picked_up() -> None:
    torch.manual_seed(0)
    model = he_relu_mlp(depth=6, width=32)
    for p in model[:6].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt)
    seen = record_stats(gw)
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    for step in range(40):
        if step == 20:
            model[0].weight.requires_grad_(True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    report = gw.report(show=False)
    gw.close()
    assert "0.weight" not in seen[0].grad_layers
    assert "2.weight" not in seen[-1].grad_layers
    assert "0.weight" in seen[-1].grad_layers
    assert report.by_rule("vanishing_gradient") is None
    assert report.healthy, report.findings


def test_sparse_embedding_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(24, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = _watch(model, opt)
    seen = record_stats(gw)
    idx = torch.randint(0, 50, (16, 3))
    model(idx).pow(2).mean().backward()
    dense = model[0].weight.grad.to_dense()
    opt.step()
    gw.flush()
    gw.close()
    s = seen[0]
    i = s.grad_layers.index("0.weight")
    assert s.grad_numel[i] == 50 * 8
    assert s.grad_norm[i] == pytest.approx(float(dense.norm()), rel=1e-5)
    assert s.grad_zero_frac[i] == pytest.approx(float((dense == 0).float().mean()), abs=1e-6)


def test_inplace_relu_is_observed_and_training_unchanged() -> None:
    torch.manual_seed(0)
    model = mlp(lambda: nn.ReLU(inplace=True), depth=4, width=16, std=0.1, bias=-5.0)
    twin = mlp(lambda: nn.ReLU(inplace=True), depth=4, width=16)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt)
    for _ in range(30):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    report = gw.report(show=False)
    gw.close()
    assert report.by_rule("dead_relu") is not None
    # the hooks do not change the numbers the model computes
    with torch.no_grad():
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    for _ in range(30):
        nn.functional.mse_loss(twin(x), y).backward()
        twin_opt.step()
        twin_opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_without_optimizer_one_backward_is_one_step() -> None:
    model = he_relu_mlp(depth=2, width=8)
    gw = _watch(model)
    seen = record_stats(gw)
    for _ in range(7):
        model(torch.randn(4, 32)).sum().backward()
        model.zero_grad()
    gw.flush()
    assert gw.step_count == 7
    assert [s.step for s in seen] == list(range(7))
    gw.close()


def test_manual_steps_in_a_custom_loop() -> None:
    model = he_relu_mlp(depth=2, width=8)
    gw = _watch(model)
    gw.step()  # from now on only gw.step() marks steps
    for _ in range(3):
        for _ in range(2):
            model(torch.randn(4, 32)).sum().backward()
        gw.step()
        model.zero_grad()
    assert gw.step_count == 4
    gw.close()


def test_default_schedule_is_dense_then_sparse() -> None:
    model = he_relu_mlp(depth=2, width=8)
    gw = gradwatch.watch(model, on_finding="ignore", show=False)
    seen = record_stats(gw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        for _ in range(120):
            model(torch.randn(4, 32)).sum().backward()
            model.zero_grad()
    gw.flush()
    per_layer = [s.step for s in seen if s.grad_layers]
    assert per_layer == [*range(50), 50, 60, 70, 80, 90, 100, 110]
    assert all(s.act_layers for s in seen if s.grad_layers)
    # Every 3rd other step still carries its total gradient norm, and only that.
    totals = [s for s in seen if not s.grad_layers]
    assert [s.step for s in totals] == [s for s in range(50, 120) if s % 10 and s % 3 == 0]
    assert all(s.grad_total_norm is not None and s.grad_total_norm > 0 for s in totals)
    assert not any(s.act_layers for s in totals)
    gw.close()

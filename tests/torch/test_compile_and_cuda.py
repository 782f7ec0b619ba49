"""torch.compile'd models, and the no-sync guarantee on CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import EVERY_STEP, he_relu_mlp, record_stats  # noqa: E402

import gradwatch  # noqa: E402


@pytest.mark.slow
def test_compiled_model_names_and_grads() -> None:
    torch.manual_seed(0)
    model = he_relu_mlp(depth=2, width=8)
    try:
        compiled = torch.compile(model, backend="eager")
    except Exception as exc:  # pragma: no cover - depends on the build
        pytest.skip(f"torch.compile unavailable: {exc}")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
    gw = gradwatch.watch(compiled, opt, grad_schedule=EVERY_STEP, on_finding="ignore", show=False)
    seen = record_stats(gw)
    x, y = torch.randn(16, 32), torch.randn(16, 1)
    for _ in range(3):
        nn.functional.mse_loss(compiled(x), y).backward()
        reference = float(model[0].weight.grad.norm())
        opt.step()
        opt.zero_grad()
    report = gw.report(show=False)
    gw.close()
    assert len(seen) == 3
    assert seen[0].grad_layers[0] == "0.weight"  # "_orig_mod." stripped
    assert seen[-1].grad_norm[0] == pytest.approx(reference, rel=1e-5)
    assert any("torch.compile" in n for n in report.notes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_between_flushes_on_cuda() -> None:
    torch.manual_seed(0)
    model = he_relu_mlp(depth=3, width=64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(
        model,
        opt,
        grad_schedule=EVERY_STEP,
        activation_schedule=EVERY_STEP,
        flush_every=10,
        on_finding="ignore",
        show=False,
    )
    x = torch.randn(32, 32, device="cuda")
    y = torch.randn(32, 1, device="cuda")
    # warm up (first-call allocations may sync), then stop right before the 10th step's flush
    for _ in range(10):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(9):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gw.enabled
    gw.close()

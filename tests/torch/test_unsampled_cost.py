"""A step that is not sampled pays nothing per tensor: no per-parameter Python hook runs
on it and gradwatch's Python work is the same for 10 tensors as for 500 (issue #16).
Its total norm, on the steps that take one, is right at any scale."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from types import FrameType

import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch.gate import GateHook  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import record_stats  # noqa: E402

import gradwatch  # noqa: E402

_PACKAGE_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__ or ""))
    for m in (gradwatch, sys.modules["gradwatch.adapters.torch"])
)
# Past the dense start (50 steps): 61 and 62 are neither sampled (every 10th) nor take
# the total norm (every 3rd).
_UNSAMPLED = (61, 62)


def _model(tensors: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(tensors // 2)])


def _gradwatch_calls(fn: Callable[[], None]) -> int:
    """Python function calls (generator resumptions included) in gradwatch's own code
    while ``fn`` runs."""
    calls = [0]

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
            calls[0] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[0]


def _per_step_calls(tensors: int, loop: str) -> tuple[list[int], int, int]:
    """gradwatch's calls on each unsampled step, GateHook calls on them, and the
    per-parameter hooks left on the model."""
    model = _model(tensors)
    opt = None if loop == "no optimizer" else torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = None
    if loop == "scaler":
        scaler = torch.amp.GradScaler("cpu")
        if not scaler.is_enabled():
            pytest.skip("GradScaler is not enabled on this CPU build")
    gw = gradwatch.watch(model, opt, scaler=scaler, on_finding="ignore", show=False)
    x = torch.randn(8, 4)
    gate_calls = [0]
    original = GateHook.__call__

    def counted(self: GateHook, *args: object) -> None:
        gate_calls[0] += 1
        original(self, *args)

    def step() -> None:
        loss = model(x).square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if opt is not None:
                opt.step()
        if opt is not None:
            opt.zero_grad()
        else:
            model.zero_grad()

    calls = []
    for i in range(max(_UNSAMPLED) + 1):
        assert gw.step_count == i
        if i in _UNSAMPLED:
            GateHook.__call__ = counted  # type: ignore[method-assign]
            try:
                calls.append(_gradwatch_calls(step))
            finally:
                GateHook.__call__ = original  # type: ignore[method-assign]
        else:
            step()
    hooks = sum(len(p._backward_hooks or {}) for p in model.parameters())
    assert gw.enabled
    gw.close()
    return calls, gate_calls[0], hooks


@pytest.mark.parametrize("loop", ["optimizer", "no optimizer", "scaler"])
def test_an_unsampled_step_runs_no_per_tensor_python(loop: str) -> None:
    small_calls, small_gates, small_hooks = _per_step_calls(10, loop)
    calls, gates, hooks = _per_step_calls(500, loop)
    assert hooks == small_hooks == 0  # no per-parameter hook is left on the model
    assert gates == small_gates <= 3 * len(_UNSAMPLED)  # a few hooks per step, not 500
    assert calls == small_calls  # gradwatch's Python work does not grow with the tensors
    assert max(calls) < 60


def test_without_optimizer_a_loss_not_through_the_model_keeps_per_parameter_hooks() -> None:
    model = _model(6)
    gw = gradwatch.watch(model, on_finding="ignore", show=False)
    x = torch.randn(8, 4)
    for _ in range(3):  # the loss never calls the watched module itself
        h = x
        for layer in model:
            h = layer(h)
        h.sum().backward()
    assert gw.step_count == 3
    assert sum(len(p._backward_hooks or {}) for p in model.parameters()) == 6
    model(x).sum().backward()  # through the module: the output hook takes over
    assert gw.step_count == 4
    assert sum(len(p._backward_hooks or {}) for p in model.parameters()) == 0
    model(x).sum().backward()
    assert gw.step_count == 5
    gw.close()


@pytest.mark.parametrize("path", ["c_kernels", "torch_ops"])
@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float64, 1e200), (torch.float32, 1e30)], ids=["f64", "f32"]
)
def test_total_norm_of_unsampled_steps_is_right_at_any_scale(
    dtype: torch.dtype, scale: float, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "torch_ops":
        from gradwatch.adapters.torch import grad_reductions

        monkeypatch.setattr(grad_reductions, "cpu_kernels", lambda: None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 1)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gw = gradwatch.watch(
        model,
        opt,
        grad_schedule=gradwatch.every(2, dense_until=0),
        norm_schedule=gradwatch.every(1),
        activations=False,
        on_finding="ignore",
        show=False,
    )
    seen = record_stats(gw)
    want = []
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.full_like(p, scale)
        want.append(scale * math.sqrt(sum(p.numel() for p in model.parameters())))
        opt.step()
    gw.flush()
    gw.close()
    totals = [s.grad_total_norm for s in seen if not s.grad_layers]
    assert len(totals) == 2  # steps 1 and 3: the total norm only
    for got, expected in zip(totals, want[1::2], strict=True):
        assert got is not None and math.isfinite(got)
        assert got == pytest.approx(expected, rel=1e-5)

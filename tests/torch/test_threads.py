"""Two models watched in two Python threads: each watch's per-layer norms equal a
naive per-parameter reference (issue #15: they shared the torch path's scratch
buffers, and norms came out up to 33x wrong). The contract: one watch per model,
thread-safe across models."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch import grad_reductions, reductions  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import EVERY_STEP, record_stats  # noqa: E402

import gradwatch  # noqa: E402

_STEPS = 12


def _train(dtype: torch.dtype, seed: int, results: dict[int, object]) -> None:
    try:
        gen = torch.Generator().manual_seed(seed)
        width = 160 + 40 * seed  # 160x160 and 200x200 weights: more than 16K entries each
        model = nn.Sequential(
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 1),
        ).to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.005 * (seed + 1))
        names = {id(p): n for n, p in model.named_parameters()}
        reference: list[dict[str, float]] = []
        opt.register_step_pre_hook(  # recorded before the watch's own pre-hook runs
            lambda *_: reference.append(
                {names[id(p)]: float(p.grad.double().norm()) for p in model.parameters()}
            )
        )
        gw = gradwatch.watch(
            model,
            opt,
            grad_schedule=EVERY_STEP,
            activation_schedule=EVERY_STEP,
            flush_every=4,
            on_finding="ignore",
            show=False,
        )
        seen = record_stats(gw)
        x = torch.randn(32, width, generator=gen, dtype=dtype) * (1.0 + seed)
        y = torch.randn(32, 1, generator=gen, dtype=dtype)
        for _ in range(_STEPS):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        gw.flush()
        gw.close()
        results[seed] = (reference, seen)
    except BaseException as exc:  # reported by the main thread
        results[seed] = exc


@pytest.mark.parametrize("path", ["default", "torch_ops"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_two_threads_training_two_models_each_get_their_own_norms(
    dtype: torch.dtype, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "torch_ops":  # as with GRADWATCH_NATIVE=0 (float64 takes them anyway)
        monkeypatch.setattr(reductions, "cpu_kernels", lambda: None)
        monkeypatch.setattr(grad_reductions, "cpu_kernels", lambda: None)
    results: dict[int, object] = {}
    threads = [threading.Thread(target=_train, args=(dtype, seed, results)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for seed in (0, 1):
        outcome = results[seed]
        if isinstance(outcome, BaseException):
            raise outcome
        reference, seen = outcome  # type: ignore[misc]
        assert len(seen) == len(reference) == _STEPS
        for want, stats in zip(reference, seen, strict=True):
            assert set(stats.grad_layers) == set(want)
            for name, norm in zip(stats.grad_layers, stats.grad_norm, strict=True):
                assert norm == pytest.approx(want[name], rel=1e-5), (seed, stats.step, name)

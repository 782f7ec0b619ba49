"""`gradwatch.watch(..., log_to=...)`: the numbers of every observed step reach the sink,
one write per flush, tags as documented in docs/logging.md."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402


def _train(gw_kwargs, steps=10):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    opt.register_step_pre_hook(lambda o, a, k: norms.append(float(model[0].weight.grad.norm())))
    gw = gradwatch.watch(model, opt, show=False, **gw_kwargs)
    for _ in range(steps):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    gw.close()
    return norms


def test_a_callable_gets_every_step_with_the_first_layer_norm_batched_per_flush():
    calls = []
    norms = _train(
        {"log_to": lambda step, scalars: calls.append((step, dict(scalars))), "flush_every": 5}
    )
    assert [step for step, _ in calls] == list(range(10))
    for (_step, scalars), reference in zip(calls, norms, strict=True):
        assert scalars["grad_2.0_norm/0.weight"] == pytest.approx(reference, rel=1e-5)
        assert "grad_norm" in scalars


def test_a_bad_log_to_is_an_error_naming_it_before_any_hook():
    model = torch.nn.Linear(2, 2)
    with pytest.raises((TypeError, ValueError), match="log_to"):
        gradwatch.watch(model, log_to=5)
    assert not model._forward_hooks and not model._forward_pre_hooks

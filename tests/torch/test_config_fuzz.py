"""Every argument of `gradwatch.watch`, fuzzed: a ValueError or TypeError naming the
parameter at construction, with no hook left behind, or a watch that trains (issue #15)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402

hostile_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["warn", "raise", "false", "yes", "dead_relu", "./runs"]),
    st.lists(st.integers(), max_size=2),
    st.just(lambda step: "yes"),
    st.just(lambda: True),
)
PARAMETERS = (
    "on_finding",
    "grad_schedule",
    "activations",
    "activation_schedule",
    "norm_schedule",
    "flush_every",
    "rules",
    "strict",
    "show",
    "scaler",
)


def _hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    ) + sum(len(p._backward_hooks or {}) for p in model.parameters())


@settings(max_examples=250, deadline=None)
@given(name=st.sampled_from(PARAMETERS), value=hostile_values)
def test_watch_arguments_fail_at_construction_naming_the_parameter_or_work(name, value):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = _hooks(model)
    try:
        gw = gradwatch.watch(
            model, opt, **{name: value, "show": False} if name != "show" else {name: value}
        )
    except (ValueError, TypeError) as exc:
        assert name in str(exc)
        assert _hooks(model) == before  # nothing half-installed
        return
    try:
        for _ in range(3):
            model(torch.randn(8, 3)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        assert gw.step_count == 3
    finally:
        gw.close()
    assert _hooks(model) == before

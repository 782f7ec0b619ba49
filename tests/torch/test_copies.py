"""Copies of a watched model: torch.save, pickle, deepcopy and copy.copy work at sampled
and unsampled steps, carry no gradwatch hook and never feed the watch; validation
forwards (eval(), no_grad()) never enter the activation statistics."""

from __future__ import annotations

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import record_stats  # noqa: E402

import gradwatch  # noqa: E402

# Steps 0, 2, 4, ... are sampled (activation hooks and the F.relu probe are attached).
_EVERY_OTHER = gradwatch.every(2, dense_until=0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # A module ReLU, a module GELU, and F.relu called through TransformerEncoderLayer.activation.
    return nn.Sequential(
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True
        ),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(32 * 3, 1),
    )


def _hooks(model: nn.Module) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return n + sum(len(p._backward_hooks or {}) for p in model.parameters())


def _watch(
    model: nn.Module, opt: torch.optim.Optimizer | None
) -> gradwatch.adapters.torch.TorchWatch:
    return gradwatch.watch(
        model,
        opt,
        grad_schedule=_EVERY_OTHER,
        activation_schedule=_EVERY_OTHER,
        on_finding="ignore",
        show=False,
    )


def _assert_clean_copy(copied: nn.Module, baseline_hooks: int) -> None:
    assert _hooks(copied) == baseline_hooks
    assert copied[2].activation is nn.functional.relu


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy", "copy"])
def test_copies_at_sampled_and_unsampled_steps_carry_no_hooks_and_never_feed(how: str) -> None:
    baseline = _hooks(_model())  # torch's own hooks (MultiheadAttention has some)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt)
    seen = record_stats(gw)
    x = torch.randn(8, 3, 32)
    for step in range(4):  # sampled, unsampled, sampled, unsampled
        # Activation hooks at sampled steps; at the others no gradwatch hook is on the model
        # (with an optimizer its step pre-hook is the only one).
        assert (_hooks(model) > baseline) is (step % 2 == 0)
        if how == "torch.save":
            buf = io.BytesIO()
            torch.save(model, buf)
            raw = buf.getvalue()
            copied = torch.load(io.BytesIO(raw), weights_only=False)
        elif how == "pickle":
            raw = pickle.dumps(model)
            copied = pickle.loads(raw)
        else:
            raw = b""
            copied = copy.deepcopy(model) if how == "deepcopy" else copy.copy(model)
        assert b"gradwatch" not in raw  # loads where gradwatch is not installed
        if how != "copy":  # a shallow copy shares the parameters (and their hooks)
            _assert_clean_copy(copied, baseline)
            # The copy trains on all-zero inputs first: were it fed, its stats would show.
            copied(torch.zeros(8, 3, 32)).sum().backward()
        else:  # a shallow copy shares the submodules; its own hook dicts are clean
            assert not _gradwatch_hooks(copied)
        assert gw.step_count == step
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    gw.flush()
    assert gw.step_count == 4
    sampled = [s for s in seen if s.act_layers]
    assert [s.step for s in sampled] == [0, 2]
    for s in sampled:
        # all-zero inputs give a dead first ReLU; the training batch does not
        assert s.act_dead_frac[s.act_layers.index("1")] < 0.9
    gw.close()


def _gradwatch_hooks(module: nn.Module) -> list[object]:
    from gradwatch.adapters.torch.gate import GateHook

    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [h for h in hooks if isinstance(h, GateHook)]


def test_a_deepcopy_without_optimizer_never_counts_a_step() -> None:
    model = _model()
    gw = _watch(model, None)  # a step is a backward pass
    copied = copy.deepcopy(model)
    for _ in range(3):
        copied(torch.randn(4, 3, 32)).sum().backward()
    assert gw.step_count == 0
    model(torch.randn(4, 3, 32)).sum().backward()
    assert gw.step_count == 1
    gw.close()


def _train_with(validate: bool) -> list:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _watch(model, opt)
    seen = record_stats(gw)
    data = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(8, 3, 32, generator=data)
        if validate:  # validation passes on other data, at sampled and unsampled steps
            wild = torch.randn(8, 3, 32) * 50 - 20
            model.eval()
            model(wild)
            with torch.no_grad():
                model(wild)
                model.train()
                model(wild)  # train mode, but no gradients: still a validation pass
            model.train()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    gw.close()
    return seen


def test_validation_forwards_never_enter_the_activation_statistics() -> None:
    plain, validated = _train_with(False), _train_with(True)
    assert [s.step for s in validated if s.act_layers] == [0, 2]
    for a, b in zip(plain, validated, strict=True):
        if not b.act_layers:
            continue
        assert "2.activation" in b.act_layers  # the functional F.relu probe is observed
        assert a.act_layers == b.act_layers
        assert a.act_dead_frac == b.act_dead_frac
        assert a.act_tail_frac == b.act_tail_frac
        assert a.act_inactive_frac == b.act_inactive_frac

"""close(), pickling, double watch, leaks, internal errors, strict mode, on_finding, config."""

from __future__ import annotations

import gc
import io
import warnings
import weakref

import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch import _LIVE_WATCHES  # noqa: E402
from gradwatch.adapters.torch.grads import GradReducer  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import EVERY_STEP, he_relu_mlp, mlp, record_stats  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.guard import FindingError, GradwatchWarning  # noqa: E402


def _hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    for p in model.parameters():
        n += len(p._backward_hooks or {})
    return n


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = torch.randn(16, 32), torch.randn(16, 1)
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _transformer_with_functional_relu() -> nn.Module:
    # nn.TransformerEncoderLayer calls F.relu through its `activation` attribute.
    return nn.Sequential(
        nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=32, batch_first=True),
        nn.Flatten(),
        nn.Linear(32 * 3, 1),
    )


def test_close_removes_every_hook_is_idempotent_and_model_pickles() -> None:
    model = _transformer_with_functional_relu()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = _hook_count(model)
    gw = gradwatch.watch(model, opt, on_finding="ignore", show=False)
    assert _hook_count(model) > before
    assert len(opt._optimizer_step_pre_hooks) == 1
    x = torch.randn(4, 3, 32)
    model(x).sum().backward()
    opt.step()
    gw.close()
    gw.close()
    assert gw.closed
    assert _hook_count(model) == before
    assert len(opt._optimizer_step_pre_hooks) == 0
    assert model[0].activation is nn.functional.relu
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert b"gradwatch" not in buf.getvalue()
    model(x).sum().backward()  # trains with no gradwatch code on the path
    opt.step()
    assert gw.step_count == 1


def test_activation_hooks_are_attached_only_for_sampled_steps() -> None:
    model = _transformer_with_functional_relu()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = _hook_count(model)

    def forward_hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    own = forward_hooks()  # torch's own (MultiheadAttention has some)
    gw = gradwatch.watch(
        model,
        opt,
        activation_schedule=gradwatch.every(3, dense_until=0),
        on_finding="ignore",
        show=False,
    )
    seen = record_stats(gw)
    x = torch.randn(4, 3, 32)
    armed = []
    for _ in range(6):
        armed.append((forward_hooks() > own, model[0].activation is not nn.functional.relu))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    # steps 0 and 3 are sampled: forward hooks and the F.relu probe live only then
    assert armed == [(True, True), (False, False), (False, False)] * 2
    gw.flush()
    assert [s.step for s in seen if s.act_layers] == [0, 3]
    assert "0.activation" in seen[0].act_layers
    gw.close()
    assert _hook_count(model) == before


def test_with_block_prints_report_and_closes(capsys: pytest.CaptureFixture[str]) -> None:
    model = he_relu_mlp(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, on_finding="ignore") as gw:
        _train(model, opt, 3)
    assert gw.closed
    assert "gradwatch" in capsys.readouterr().out
    report = gw.report(show=False)
    assert report.steps_observed == 3


def test_watching_twice_warns_and_replaces_the_first() -> None:
    model = he_relu_mlp(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = gradwatch.watch(model, opt, on_finding="ignore", show=False)
    with pytest.warns(GradwatchWarning, match="already watched"):
        second = gradwatch.watch(model, opt, on_finding="ignore", show=False)
    assert first.closed and not second.closed
    _train(model, opt, 2)
    assert first.step_count == 0 and second.step_count == 2
    second.close()


def test_watch_does_not_keep_the_model_alive() -> None:
    model = he_relu_mlp(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, opt, on_finding="ignore", show=False)
    _train(model, opt, 2)
    gw.close()
    ref = weakref.ref(model)
    del model, opt
    gc.collect()
    assert ref() is None


def test_the_one_line_watch_keeps_monitoring_without_a_kept_handle() -> None:
    model = he_relu_mlp(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gradwatch.watch(model, opt, on_finding="ignore", show=False)  # handle dropped
    gc.collect()
    _train(model, opt, 3)
    gw = _LIVE_WATCHES[model]()
    assert gw is not None and gw.step_count == 3
    gw.close()


def test_model_and_dropped_watch_are_collected_together() -> None:
    model = he_relu_mlp(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gradwatch.watch(model, opt, on_finding="ignore", show=False)
    _train(model, opt, 2)
    model_ref = weakref.ref(model)
    watch_ref = _LIVE_WATCHES[model]
    del model, opt
    gc.collect()
    assert model_ref() is None and watch_ref() is None


def test_an_unreported_watch_prints_its_report_at_exit() -> None:
    import subprocess
    import sys

    code = (
        "import torch, gradwatch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))\n"
        "o = torch.optim.SGD(m.parameters(), lr=0.01)\n"
        "gradwatch.watch(m, o)\n"
        "for _ in range(3):\n"
        "    m(torch.randn(8, 4)).sum().backward(); o.step(); o.zero_grad()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gradwatch: gradients look healthy" in out.stdout


def test_internal_error_warns_once_switches_off_and_training_continues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = he_relu_mlp(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, opt, grad_schedule=EVERY_STEP, on_finding="ignore", show=False)

    def boom(self: GradReducer, pending: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(GradReducer, "reduce_grads", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, 5)
    msgs = [w for w in caught if issubclass(w.category, GradwatchWarning)]
    assert len(msgs) == 1 and "boom" in str(msgs[0].message)
    assert not gw.enabled
    report = gw.report(show=False)
    assert any("boom" in n for n in report.notes)
    gw.close()


def test_strict_reraises_internal_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = he_relu_mlp(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, opt, grad_schedule=EVERY_STEP, strict=True, show=False)

    def boom(self: GradReducer, pending: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(GradReducer, "reduce_grads", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _train(model, opt, 1)
    monkeypatch.undo()
    gw.close()


def _dead_net() -> nn.Module:
    torch.manual_seed(0)
    return mlp(nn.ReLU, depth=4, width=16, std=0.1, bias=-5.0)


def test_on_finding_raise_stops_the_run() -> None:
    model = _dead_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, opt, on_finding="raise", flush_every=1, show=False)
    with pytest.raises(FindingError) as info:
        _train(model, opt, 60)
    assert info.value.finding.rule == "dead_relu"
    assert gw.step_count < 60
    gw.close()


def test_on_finding_warn_warns_once_per_rule() -> None:
    model = _dead_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, opt, show=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, 60)
        gw.flush()
    msgs = [str(w.message) for w in caught if issubclass(w.category, GradwatchWarning)]
    assert len([m for m in msgs if "dead_relu" in m]) == 1
    gw.close()


def test_on_finding_callable_and_ignore() -> None:
    got: list[gradwatch.Finding] = []
    model = _dead_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, opt, on_finding=got.append, show=False)
    _train(model, opt, 40)
    gw.close()
    assert [f.rule for f in got] == ["dead_relu"]
    model = _dead_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        gw = gradwatch.watch(model, opt, on_finding="ignore", show=False)
        _train(model, opt, 40)
        assert gw.report(show=False).by_rule("dead_relu") is not None
        gw.close()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"on_finding": "explode"}, "on_finding"),
        ({"flush_every": 0}, "flush_every"),
        ({"grad_schedule": 10}, "grad_schedule"),
        ({"activation_schedule": "often"}, "activation_schedule"),
        ({"norm_schedule": 3}, "norm_schedule"),
        ({"activations": "false"}, "activations"),
        ({"activations": 0}, "activations"),
        ({"strict": "no"}, "strict"),
        ({"show": None}, "show"),
        ({"flush_every": "20"}, "flush_every"),
        ({"flush_every": True}, "flush_every"),
        ({"scaler": "cpu"}, "scaler"),
    ],
)
def test_bad_configuration_names_the_parameter(kwargs: dict[str, object], name: str) -> None:
    model = he_relu_mlp(depth=1, width=4)
    with pytest.raises(ValueError, match=name):
        gradwatch.watch(model, **kwargs)  # type: ignore[arg-type]
    assert _hook_count(model) == 0


def test_bad_model_and_optimizer() -> None:
    with pytest.raises(ValueError, match="model"):
        gradwatch.watch(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimizer"):
        gradwatch.watch(nn.Linear(2, 2), optimizer=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        gradwatch.adapters.torch.every(0)

"""gradwatch.HFTrainerCallback on a real transformers.Trainer (CPU, a 2-layer GPT-2 built
from a config with random weights, generated tokens; nothing is downloaded).

The reference is recorded without gradwatch: a wrapper of ``torch.nn.utils.clip_grad_norm_``
(which accelerate calls to clip, after unscaling) saves each parameter's gradient norm
before clipping, and the optimizer's own ``step`` saves the norm it applies.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import AnalyzerSpy, assert_hooks_removed

import gradwatch
from gradwatch.guard import FindingError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

FIRST = "transformer.h.0.attn.c_attn.weight"


class RecordingSGD(torch.optim.SGD):
    """SGD that records one parameter's gradient norm as it applies it (after clipping)."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__(model.parameters(), lr=lr, momentum=0.9)
        named = dict(model.named_parameters())
        self.first = named.get(FIRST, next(iter(named.values())))
        self.applied: list[float] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        assert self.first.grad is not None
        self.applied.append(float(self.first.grad.norm()))
        return super().step(closure)


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Generated sequences: a random start, then counting up modulo the vocabulary."""

    def __init__(self, n: int, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(2)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _make_trainer(
    cb: gradwatch.HFTrainerCallback,
    out: Path,
    *,
    steps: int = 20,
    accumulate: int = 1,
    max_grad_norm: float = 1.0,
    lr: float = 0.05,
    model: torch.nn.Module | None = None,
    logging_steps: int | None = None,
    callbacks: tuple[Any, ...] | None = None,
) -> Any:
    model = model if model is not None else _tiny_gpt2()
    optimizer = RecordingSGD(model, lr=lr)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulate,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no" if logging_steps is None else "steps",
        logging_steps=logging_steps or 500,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(8 * steps * accumulate),
        callbacks=list(callbacks) if callbacks is not None else [cb],
        optimizers=(optimizer, None),
    )


def _train(cb: gradwatch.HFTrainerCallback, out: Path, **kwargs: Any) -> Any:
    trainer = _make_trainer(cb, out, **kwargs)
    trainer.train()
    return trainer


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


@pytest.fixture
def pre_clip(monkeypatch: pytest.MonkeyPatch) -> list[dict[int, float]]:
    """id(parameter) -> gradient norm at each clip call, before clipping."""
    records: list[dict[int, float]] = []
    original = torch.nn.utils.clip_grad_norm_

    def clip_grad_norm_(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        parameters = list(parameters)
        records.append({id(p): float(p.grad.norm()) for p in parameters if p.grad is not None})
        return original(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    return records


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.usefixtures("no_gradwatch_warning")
def test_reads_the_pre_clip_gradient_of_each_optimizer_step(
    analyzer_spy: AnalyzerSpy, pre_clip: list[dict[int, float]], tmp_path: Path, accumulate: int
) -> None:
    model = _tiny_gpt2()
    names = {id(p): n for n, p in model.named_parameters()}
    micro: list[float] = []  # the first layer's gradient after every backward pass
    model.get_parameter(FIRST).register_post_accumulate_grad_hook(
        lambda p: micro.append(float(p.grad.norm()))
    )
    cb = gradwatch.HFTrainerCallback(on_finding="ignore", verbose=False)
    trainer = _train(cb, tmp_path, steps=20, accumulate=accumulate, model=model)

    assert trainer.state.global_step == 20
    assert len(pre_clip) == len(trainer.optimizer.optimizer.applied) == 20
    assert len(micro) == 20 * accumulate
    seen = analyzer_spy.per_layer()
    assert sorted(seen) == list(range(20))
    for step, reference in enumerate(pre_clip):
        expected = {names[i]: norm for i, norm in reference.items()}
        assert set(seen[step]) == set(expected)
        for name, norm in expected.items():
            assert seen[step][name] == pytest.approx(norm, rel=1e-5), (step, name)
    if accumulate == 2:  # both micro-batches' gradient, not the first one's alone
        assert all(seen[i][FIRST] != pytest.approx(micro[2 * i], rel=1e-3) for i in range(20))
    # max_grad_norm=1.0 bit: SGD applied the judged gradient times the clip coefficient
    total = np.array([np.sqrt(sum(n**2 for n in r.values())) for r in pre_clip])
    judged = np.array([seen[i][FIRST] for i in range(20)])
    applied = np.array(trainer.optimizer.optimizer.applied)
    assert np.sum(total > 1.1) >= 5  # clipping really changed these steps
    np.testing.assert_allclose(applied, judged * np.minimum(1.0, 1.0 / (total + 1e-6)), rtol=1e-4)
    assert cb.report is not None and cb.report.steps_observed == 20
    # the tap is gone with the training run
    assert "clip_grad_norm_" not in vars(trainer.accelerator)
    assert "unscale_gradients" not in vars(trainer.accelerator)
    assert_hooks_removed(model)


@pytest.mark.usefixtures("no_gradwatch_warning")
def test_healthy_run_has_no_finding(tmp_path: Path) -> None:
    cb = gradwatch.HFTrainerCallback(on_finding="ignore", verbose=False)
    _train(cb, tmp_path, steps=40)
    assert cb.report is not None and cb.report.steps_observed == 40
    assert not cb.report.findings, [f.rule for f in cb.report.findings]


def test_huge_learning_rate_is_detected(tmp_path: Path) -> None:
    cb = gradwatch.HFTrainerCallback(on_finding="ignore", verbose=False)
    _train(cb, tmp_path, steps=40, lr=500.0, max_grad_norm=0.0)
    assert cb.report is not None
    rules = {f.rule for f in cb.report.findings}
    assert rules & {"exploding_gradient", "nonfinite_gradient"}, rules


def test_one_callback_serves_several_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cb = gradwatch.HFTrainerCallback(on_finding="ignore")
    _train(cb, tmp_path / "a", steps=6)
    assert cb.report is not None and cb.report.steps_observed == 6
    assert "gradwatch" in capsys.readouterr().out  # verbose: printed at train end
    first = cb.report
    _train(cb, tmp_path / "b", steps=4, accumulate=2)
    assert cb.report is not first and cb.report.steps_observed == 4
    assert cb.watch is None


def test_on_finding_raise_stops_training_and_cleans_up(tmp_path: Path) -> None:
    model = _tiny_gpt2()
    cb = gradwatch.HFTrainerCallback(on_finding="raise", flush_every=5, verbose=False)
    trainer = _make_trainer(cb, tmp_path, steps=200, lr=500.0, max_grad_norm=0.0, model=model)
    with pytest.raises(FindingError):
        trainer.train()
    assert trainer.state.global_step < 200
    assert cb.report is not None and cb.report.steps_observed < 200
    assert "clip_grad_norm_" not in vars(trainer.accelerator)
    assert_hooks_removed(model)


def test_an_internal_error_never_stops_training(tmp_path: Path) -> None:
    def broken_schedule(step: int) -> bool:
        if step == 3:
            raise RuntimeError("injected")
        return True

    cb = gradwatch.HFTrainerCallback(grad_schedule=broken_schedule, flush_every=1, verbose=False)
    with pytest.warns(gradwatch.GradwatchWarning, match="injected"):
        trainer = _train(cb, tmp_path, steps=8)
    assert trainer.state.global_step == 8
    assert cb.report is not None and cb.report.steps_observed == 3
    assert any("injected" in note for note in cb.report.notes)


# --- logging through the Trainer's on_log ---------------------------------------------


class CapturingCallback(transformers.TrainerCallback):
    """Records the logs every ``on_log`` receives, as a ``report_to`` integration would."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        self.logs.append((state.global_step, dict(logs)))


class CapturingCallbackAfter(CapturingCallback):
    """A second class: the Trainer warns about two instances of one callback class."""


@pytest.mark.usefixtures("no_gradwatch_warning")
def test_gradwatch_numbers_arrive_in_on_log_before_and_after_the_callback(
    analyzer_spy: AnalyzerSpy, tmp_path: Path
) -> None:
    # An integration stands before the user's callbacks (Trainer.__init__), so "before"
    # is where TensorBoardCallback or WandbCallback would see the logs.
    before, after = CapturingCallback(), CapturingCallbackAfter()
    cb = gradwatch.HFTrainerCallback(on_finding="ignore", verbose=False, flush_every=5)
    trainer = _make_trainer(cb, tmp_path, steps=12, logging_steps=4, callbacks=(before, cb, after))
    trainer.train()

    assert [step for step, _ in before.logs] == [4, 8, 12, 12]  # 3 logs and the summary
    assert after.logs == before.logs
    first, second, third, summary = (logs for _, logs in before.logs)
    assert "gradwatch/step" not in first  # no flush before step 4: nothing to merge
    seen = analyzer_spy.per_layer()
    for logs, gw_step in ((second, 4), (third, 9)):  # the newest flushed step (5th, 10th)
        assert logs["gradwatch/step"] == gw_step
        assert logs[f"grad_2.0_norm/{FIRST}"] == pytest.approx(seen[gw_step][FIRST], rel=1e-6)
        total = np.sqrt(sum(v**2 for v in seen[gw_step].values()))
        assert logs["gradwatch/grad_norm"] == pytest.approx(total, rel=1e-5)
        assert {f"grad_max_abs/{FIRST}", f"grad_zero_frac/{FIRST}"} <= set(logs)
        # the Trainer's own grad_norm is its logging step's, untouched
        assert logs["grad_norm"] != pytest.approx(logs["gradwatch/grad_norm"])
    assert "gradwatch/step" not in summary  # steps 10, 11 flush at train end, after it
    # the checkpointed history and the console printers never hold them
    assert not any(
        tag.startswith(("grad_2.0", "gradwatch/"))
        for entry in trainer.state.log_history
        for tag in entry
    )
    assert "on_log" not in vars(trainer.callback_handler)  # the tap is gone with train()


def test_hf_grad_norm_and_gradwatch_total_norm_are_the_same_quantity(tmp_path: Path) -> None:
    rows: dict[int, dict[str, float]] = {}
    cb = gradwatch.HFTrainerCallback(
        on_finding="ignore",
        verbose=False,
        log_to=lambda step, scalars: rows.setdefault(step, scalars),
    )
    trainer = _train(cb, tmp_path, steps=8, logging_steps=1, max_grad_norm=1.0)
    assert sorted(rows) == list(range(8))  # gradwatch's steps: every training step
    hf = {e["step"]: e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e}
    # HF's global_step after gradwatch's step s is s + 1; both are the pre-clip norm
    assert sorted(hf) == list(range(1, 9))
    for step, scalars in rows.items():
        assert scalars["grad_norm"] == pytest.approx(hf[step + 1], rel=1e-5), step


def test_log_to_trainer_false_keeps_the_logs_clean(tmp_path: Path) -> None:
    captured = CapturingCallbackAfter()
    rows: list[int] = []
    cb = gradwatch.HFTrainerCallback(
        on_finding="ignore",
        verbose=False,
        flush_every=2,
        log_to=lambda step, scalars: rows.append(step),
        log_to_trainer=False,
    )
    trainer = _make_trainer(cb, tmp_path, steps=6, logging_steps=2, callbacks=(cb, captured))
    trainer.train()
    assert rows == list(range(6))
    assert captured.logs and not any(
        tag.startswith(("grad_2.0", "gradwatch/")) for _, logs in captured.logs for tag in logs
    )


def test_a_failing_sink_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    def broken(step: int, scalars: dict[str, float]) -> None:
        raise OSError("disk full")

    captured = CapturingCallbackAfter()
    cb = gradwatch.HFTrainerCallback(
        on_finding="ignore", verbose=False, flush_every=2, log_to=broken
    )
    trainer = _make_trainer(cb, tmp_path, steps=8, logging_steps=4, callbacks=(cb, captured))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    texts = [str(w.message) for w in caught if issubclass(w.category, gradwatch.GradwatchWarning)]
    assert len(texts) == 1, texts
    assert "disk full" in texts[0] and "training and monitoring continue" in texts[0]
    assert trainer.state.global_step == 8
    assert cb.report is not None and cb.report.steps_observed == 8
    # the route to the Trainer's logs is a sink of its own: it kept logging
    assert [logs.get("gradwatch/step") for _, logs in captured.logs[:2]] == [3, 7]


class _DeadReluLM(torch.nn.Module):
    """A token classifier the Trainer can train (it returns ``{"loss": ...}``) whose
    hidden ReLUs start dead: He init with every hidden bias at -3."""

    def __init__(self, vocab: int = 64, width: int = 64) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(3))
        for layer in self.hidden:
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            torch.nn.init.constant_(layer.bias, -3.0)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(input_ids)
        for layer in self.hidden:
            h = self.act(layer(h))
        logits = self.head(h)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def test_dead_relus_are_detected_through_the_trainer(tmp_path: Path) -> None:
    model = _DeadReluLM()
    # The label, checked without gradwatch: most hidden units are zero for whole batches.
    dead: list[float] = []

    def record(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        dead.append(float((out <= 0).flatten(0, 1).all(dim=0).float().mean()))

    handle = model.act.register_forward_hook(record)
    cb = gradwatch.HFTrainerCallback(on_finding="ignore", verbose=False)
    _train(cb, tmp_path, steps=40, lr=0.05, model=model)
    handle.remove()
    assert sorted(dead)[len(dead) // 2] > 0.5  # median dead fraction over all passes
    assert cb.report is not None
    assert "dead_relu" in {f.rule for f in cb.report.findings}

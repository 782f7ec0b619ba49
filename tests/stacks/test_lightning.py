"""gradwatch.LightningCallback on a real lightning.Trainer (CPU, tiny MLP, generated data).

The reference is recorded without gradwatch: the module's ``configure_gradient_clipping``
(Lightning calls it for every optimizer step, right before clipping) saves each
parameter's gradient norm, and the optimizer's own ``step`` saves the norm it applies.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import AnalyzerSpy, assert_hooks_removed
from torch import nn

import gradwatch
from gradwatch.guard import FindingError

pl = pytest.importorskip("lightning.pytorch")


class RecordingSGD(torch.optim.SGD):
    """SGD that records the first layer's gradient norm it applies, after clipping."""

    def __init__(self, params: object, lr: float, first: nn.Parameter) -> None:
        super().__init__(params, lr=lr)  # type: ignore[arg-type]
        self.first = first
        self.applied: list[float] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # Lightning's closure: forward, backward, hooks, clipping
        assert self.first.grad is not None
        self.applied.append(float(self.first.grad.norm()))
        super().step()
        return loss


class TinyMLP(pl.LightningModule):
    def __init__(self, lr: float = 0.05, dead_bias: float | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(32, 1)
        if dead_bias is not None:
            with torch.no_grad():  # every first-layer unit negative on every input
                self.fc1.weight.mul_(0.01)
                self.fc1.bias.fill_(dead_bias)
        self.lr = lr
        self.pre_clip: list[dict[str, float]] = []
        self.after_backward: list[float] = []
        self.optimizer: RecordingSGD | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_after_backward(self) -> None:
        self.after_backward.append(float(self.fc1.weight.grad.norm()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.optimizer = RecordingSGD(self.parameters(), lr=self.lr, first=self.fc1.weight)
        return self.optimizer

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):  # type: ignore[no-untyped-def]
        self.pre_clip.append(
            {n: float(p.grad.norm()) for n, p in self.named_parameters() if p.grad is not None}
        )
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _loader(batches: int, batch_size: int = 16) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * batch_size, 8, generator=g)
    y = x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(len(x), 1, generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _fit(
    module: TinyMLP,
    cb: gradwatch.LightningCallback,
    *,
    steps: int = 30,
    accumulate: int = 1,
    clip: float | None = None,
    logger: Any = False,
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        callbacks=[cb],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, _loader(steps * accumulate))
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.usefixtures("no_gradwatch_warning")
def test_reads_the_pre_clip_gradient_of_each_optimizer_step(
    analyzer_spy: AnalyzerSpy, accumulate: int
) -> None:
    module = TinyMLP()
    cb = gradwatch.LightningCallback(on_finding="ignore", verbose=False)
    trainer = _fit(module, cb, steps=30, accumulate=accumulate, clip=0.05)

    assert trainer.global_step == 30
    assert len(module.pre_clip) == len(module.optimizer.applied) == 30
    seen = analyzer_spy.per_layer()
    # the default schedule samples every step of the first 50 per layer
    assert sorted(seen) == list(range(30))
    assert len(module.after_backward) == 30 * accumulate
    for step, reference in enumerate(module.pre_clip):
        assert set(seen[step]) == set(reference)
        for name, norm in reference.items():
            assert seen[step][name] == pytest.approx(norm, rel=1e-5), (step, name)
    if accumulate == 2:
        # the step's gradient is both micro-batches', not the first one's alone
        partial = module.after_backward[0::2]
        assert all(seen[i]["fc1.weight"] != pytest.approx(partial[i], rel=1e-3) for i in range(30))
    # clipping bit: what the optimizer applied is smaller than what gradwatch judged
    pre = np.array([r["fc1.weight"] for r in module.pre_clip])
    applied = np.array(module.optimizer.applied)
    assert np.all(applied < 0.9 * pre)
    assert cb.report is not None
    assert cb.report.steps_observed == 30
    assert not cb.report.findings, [f.rule for f in cb.report.findings]


@pytest.mark.parametrize(
    ("module_kwargs", "rule"),
    [
        ({"lr": 50.0}, {"nonfinite_gradient", "exploding_gradient"}),
        ({"dead_bias": -10.0}, {"dead_relu"}),
    ],
    ids=["huge_lr", "dead_relu"],
)
def test_detects_a_fault(module_kwargs: dict[str, float], rule: set[str]) -> None:
    cb = gradwatch.LightningCallback(on_finding="ignore", verbose=False)
    _fit(TinyMLP(**module_kwargs), cb, steps=40)
    assert cb.report is not None
    assert rule & {f.rule for f in cb.report.findings}


def test_one_callback_serves_several_fits_and_leaves_no_hook(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cb = gradwatch.LightningCallback(on_finding="ignore")
    first = TinyMLP(dead_bias=-10.0)
    _fit(first, cb, steps=40)
    assert "dead_relu" in {f.rule for f in cb.report.findings}
    assert "gradwatch" in capsys.readouterr().out  # verbose: the report printed at train end
    assert cb.watch is None
    assert_hooks_removed(first)

    second = TinyMLP()
    _fit(second, cb, steps=25)
    assert cb.report.steps_observed == 25
    assert not cb.report.findings
    assert_hooks_removed(second)


def test_verbose_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    cb = gradwatch.LightningCallback(on_finding="ignore", verbose=False)
    _fit(TinyMLP(), cb, steps=5)
    assert cb.report is not None and cb.report.steps_observed == 5
    assert "gradwatch" not in capsys.readouterr().out


def test_on_finding_raise_stops_fit_and_removes_hooks() -> None:
    module = TinyMLP(dead_bias=-10.0)
    cb = gradwatch.LightningCallback(on_finding="raise", flush_every=5, verbose=False)
    with pytest.raises(FindingError):
        _fit(module, cb, steps=200)
    assert module.trainer.global_step < 200
    assert cb.report is not None
    assert_hooks_removed(module)


# --- logging through the trainer's loggers -------------------------------------------


class ProbedMLP(TinyMLP):
    """Logs its batch index with ``self.log``: the step Lightning files that batch under."""

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.log("probe_batch", float(batch_idx), on_step=True, on_epoch=False)
        return super().training_step(batch, batch_idx)


def _csv_rows(logger: Any) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], tag: str) -> dict[int, float]:
    """step -> value of ``tag``, from the rows that hold it."""
    return {int(r["step"]): float(r[tag]) for r in rows if r.get(tag, "") != ""}


@pytest.mark.usefixtures("no_gradwatch_warning")
def test_csv_logger_holds_gradwatch_columns_at_the_optimizer_steps(
    analyzer_spy: AnalyzerSpy, tmp_path: Path
) -> None:
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    cb = gradwatch.LightningCallback(on_finding="ignore", verbose=False, flush_every=5)
    _fit(ProbedMLP(), cb, steps=12, logger=logger)

    rows = _csv_rows(logger)
    columns = set(rows[0])
    for name in ("fc1.weight", "fc2.bias", "out.weight"):
        assert {f"grad_2.0_norm/{name}", f"grad_max_abs/{name}", f"grad_zero_frac/{name}"} <= (
            columns
        )
    assert {"grad_norm", "act_dead_frac/act1", "act_tail_frac/act2"} <= columns
    # every optimizer step, the last flush (steps 10, 11) included
    norms = _column(rows, "grad_2.0_norm/fc1.weight")
    assert sorted(norms) == list(range(12))
    # the step Lightning files the batch's own self.log under: one axis for both
    assert _column(rows, "probe_batch") == {step: float(step) for step in range(12)}
    seen = analyzer_spy.per_layer()
    for step, value in norms.items():
        assert value == pytest.approx(seen[step]["fc1.weight"], rel=1e-6), step
    totals = _column(rows, "grad_norm")
    assert sorted(totals) == list(range(12))
    for step, total in totals.items():
        assert total == pytest.approx(np.sqrt(sum(v**2 for v in seen[step].values())), rel=1e-5)


def test_log_to_a_callable_gets_every_step_and_trainer_loggers_too(tmp_path: Path) -> None:
    batches: list[int] = []
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    cb = gradwatch.LightningCallback(
        on_finding="ignore",
        verbose=False,
        flush_every=4,
        log_to=lambda step, scalars: batches.append(step),
    )
    _fit(TinyMLP(), cb, steps=10, logger=logger)
    assert batches == list(range(10))
    assert sorted(_column(_csv_rows(logger), "grad_norm")) == list(range(10))


def test_a_finding_is_logged_as_open(tmp_path: Path) -> None:
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    cb = gradwatch.LightningCallback(on_finding="ignore", verbose=False, flush_every=10)
    _fit(TinyMLP(dead_bias=-10.0), cb, steps=40, logger=logger)
    assert "dead_relu" in {f.rule for f in cb.report.findings}
    flags = _column(_csv_rows(logger), "gradwatch/finding/dead_relu")
    assert flags and set(flags.values()) == {1.0}
    assert set(flags) <= {9, 19, 29, 39}  # the last step of a flush


def test_log_to_trainer_false_keeps_the_loggers_clean(tmp_path: Path) -> None:
    rows: list[int] = []
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    cb = gradwatch.LightningCallback(
        on_finding="ignore",
        verbose=False,
        log_to=lambda step, scalars: rows.append(step),
        log_to_trainer=False,
    )
    _fit(ProbedMLP(), cb, steps=6, logger=logger)
    assert rows == list(range(6))
    columns = set(_csv_rows(logger)[0])
    assert "probe_batch" in columns
    assert not {c for c in columns if c.startswith(("grad", "act_", "gradwatch/"))}


def test_a_failing_sink_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    def broken(step: int, scalars: dict[str, float]) -> None:
        raise OSError("disk full")

    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    cb = gradwatch.LightningCallback(
        on_finding="ignore", verbose=False, flush_every=3, log_to=broken
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(TinyMLP(), cb, steps=12, logger=logger)
    texts = [str(w.message) for w in caught if issubclass(w.category, gradwatch.GradwatchWarning)]
    assert len(texts) == 1, texts
    assert "disk full" in texts[0] and "training and monitoring continue" in texts[0]
    assert trainer.global_step == 12
    assert cb.report is not None and cb.report.steps_observed == 12
    # the trainer's logger is a sink of its own: it kept logging
    assert sorted(_column(_csv_rows(logger), "grad_norm")) == list(range(12))

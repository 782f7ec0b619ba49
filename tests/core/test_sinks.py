"""``log_to=``: what the Monitor logs, to which targets, how often, and what a failing
sink does. No framework: every target here is a fake recording its calls."""

from __future__ import annotations

import math
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
from synth import grad_step

from gradwatch import GradwatchWarning, StepStats
from gradwatch.monitor import Monitor
from gradwatch.sinks import Sink, resolve_sink, scalars_for


def _stats(step: int, norms: tuple[float, ...] = (3.0, 4.0)) -> StepStats:
    return grad_step(
        step,
        list(norms),
        names=["fc1.weight", "fc2.weight"][: len(norms)],
        zero_frac=0.25,
        acts={"relu1": ("relu", 0.5, 0.125, 0.0)},
    )


class FakeWriter:
    """Duck-typed torch.utils.tensorboard.SummaryWriter."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.flushes = 0
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


class FakeRun:
    """Duck-typed wandb run."""

    name = "fake-run"

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log(self, data: dict[str, float], step: int) -> None:
        self.calls.append((dict(data), step))


def fake_mlflow() -> Any:
    module = types.ModuleType("mlflow")
    module.calls = []  # type: ignore[attr-defined]
    module.log_metrics = lambda metrics, step: module.calls.append((dict(metrics), step))  # type: ignore[attr-defined]
    return module


class CountingSink(Sink):
    name = "counting"

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, dict[str, float]]]] = []

    def write(self, batch: Any) -> None:
        self.batches.append([(s, dict(d)) for s, d in batch])


def monitor(**kwargs: Any) -> Monitor:
    return Monitor(show=False, on_finding="ignore", **kwargs)


# --- the dict ------------------------------------------------------------------------


def test_scalars_for_names_every_tag():
    scalars = scalars_for(_stats(7))
    assert scalars == {
        "grad_2.0_norm/fc1.weight": 3.0,
        "grad_2.0_norm/fc2.weight": 4.0,
        "grad_max_abs/fc1.weight": 0.75,
        "grad_max_abs/fc2.weight": 1.0,
        "grad_zero_frac/fc1.weight": 0.25,
        "grad_zero_frac/fc2.weight": 0.25,
        "grad_norm": 5.0,  # sqrt(3^2 + 4^2)
        "act_dead_frac/relu1": 0.125,
        "act_tail_frac/relu1": 0.0,
    }


def test_total_norm_prefers_the_adapters_and_is_nan_with_nonfinite_gradients():
    assert scalars_for(StepStats(step=0, grad_total_norm=2.5)) == {"grad_norm": 2.5}
    bad = grad_step(0, [1.0, math.nan], nonfinite=[0, 3])
    assert math.isnan(scalars_for(bad)["grad_norm"])
    assert scalars_for(StepStats(step=0, skipped_step=True)) == {}


def test_findings_log_one_while_open_and_zero_once_closed():
    from gradwatch import Finding

    findings = [
        Finding("dead_relu", "warning", ("fc1",), 1, 5, "m"),
        Finding("vanishing_gradient", "warning", ("fc1",), 1, 5, "m"),
    ]
    scalars = scalars_for(StepStats(step=0), findings, open_rules={"dead_relu"})
    assert scalars == {
        "gradwatch/finding/dead_relu": 1.0,
        "gradwatch/finding/vanishing_gradient": 0.0,
    }
    assert scalars_for(StepStats(step=0), findings[:1]) == {"gradwatch/finding/dead_relu": 1.0}


# --- targets -------------------------------------------------------------------------


def test_callable_gets_every_training_step_of_each_flush():
    rows: list[tuple[int, dict[str, float]]] = []
    m = monitor(log_to=lambda step, scalars: rows.append((step, scalars)))
    m.observe([_stats(10), _stats(11), _stats(12)])
    assert [step for step, _ in rows] == [10, 11, 12]
    assert rows[0][1]["grad_2.0_norm/fc1.weight"] == 3.0


def test_summary_writer_like_object_gets_add_scalar_per_tag_and_step():
    writer = FakeWriter()
    m = monitor(log_to=writer)
    m.observe([_stats(0), _stats(1)])
    assert ("grad_norm", 5.0, 1) in writer.scalars
    assert ("grad_2.0_norm/fc2.weight", 4.0, 0) in writer.scalars
    assert {step for _, _, step in writer.scalars} == {0, 1}
    m.report()
    assert writer.flushes == 1
    m.close()
    assert not writer.closed  # the user's writer: flushed, never closed by gradwatch
    assert writer.flushes == 2


def test_wandb_like_run_gets_one_log_call_per_step_with_the_step():
    run = FakeRun()
    m = monitor(log_to=run)
    m.observe([_stats(3), _stats(4)])
    assert [step for _, step in run.calls] == [3, 4]
    assert run.calls[1][0]["grad_norm"] == 5.0


def test_mlflow_like_module_gets_log_metrics_with_the_step():
    mlflow = fake_mlflow()
    m = monitor(log_to=mlflow)
    m.observe([_stats(5)])
    assert mlflow.calls == [(scalars_for(_stats(5), [], set()), 5)]


def test_a_list_logs_to_each_target_and_add_sink_adds_one():
    writer, run = FakeWriter(), FakeRun()
    rows: list[int] = []
    m = monitor(log_to=[writer, run])
    m.add_sink(lambda step, scalars: rows.append(step))
    m.observe([_stats(0)])
    assert writer.scalars and run.calls and rows == [0]
    assert len(m.sinks) == 3


def test_open_findings_are_logged_at_the_last_step_of_the_flush():
    rows: dict[int, dict[str, float]] = {}
    m = monitor(log_to=lambda step, scalars: rows.__setitem__(step, scalars))
    # Gradients exactly zero everywhere: zero_gradient opens after its warm-up.
    m.observe([grad_step(s, [0.0, 0.0], zero_frac=1.0) for s in range(40)])
    finding_tags = {t for t in rows[39] if t.startswith("gradwatch/finding/")}
    assert "gradwatch/finding/zero_gradient" in finding_tags
    assert rows[39]["gradwatch/finding/zero_gradient"] == 1.0
    assert not any(t.startswith("gradwatch/finding/") for t in rows[38])


# --- batching ------------------------------------------------------------------------


def test_one_write_per_flush_never_per_step():
    sink = CountingSink()
    m = monitor(log_to=sink)
    m.observe([_stats(s) for s in range(8)])
    m.observe([_stats(s) for s in range(8, 16)])
    m.observe(_stats(16))  # a single StepStats is a flush of one
    assert [len(b) for b in sink.batches] == [8, 8, 1]
    assert [s for batch in sink.batches for s, _ in batch] == list(range(17))


def test_nothing_is_logged_off_rank_zero():
    sink = CountingSink()
    monitor(log_to=sink, rank_zero=False).observe([_stats(0)])
    assert sink.batches == []


# --- failures ------------------------------------------------------------------------


def test_a_failing_sink_warns_once_stops_logging_and_monitoring_continues():
    calls: list[int] = []
    good: list[int] = []

    def broken(step: int, scalars: dict[str, float]) -> None:
        calls.append(step)
        raise ConnectionError("tracking server down")

    m = monitor(log_to=[broken, lambda step, scalars: good.append(step)])
    with pytest.warns(GradwatchWarning, match="tracking server down") as caught:
        m.observe([_stats(0), _stats(1)])
        m.observe([_stats(2)])
    assert len([w for w in caught if issubclass(w.category, GradwatchWarning)]) == 1
    assert "training and monitoring continue" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the user's line, not gradwatch's
    assert calls == [0]  # switched off after the first error
    assert good == [0, 1, 2]  # the other sink goes on
    assert m.enabled
    assert m.report().steps_observed == 3


def test_strict_reraises_a_sink_error():
    def broken(step: int, scalars: dict[str, float]) -> None:
        raise ConnectionError("down")

    m = Monitor(show=False, strict=True, log_to=broken)
    with pytest.raises(ConnectionError):
        m.observe([_stats(0)])


def test_a_failing_flush_at_report_is_guarded_too():
    class BadFlush(CountingSink):
        def flush(self) -> None:
            raise OSError("disk full")

    m = monitor(log_to=BadFlush())
    m.observe([_stats(0)])
    with pytest.warns(GradwatchWarning, match="disk full"):
        report = m.report()
    assert report.steps_observed == 1


# --- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [42, 3.5, object(), [], "", math])
def test_bad_log_to_is_an_error_naming_log_to(bad: Any):
    with pytest.raises((TypeError, ValueError), match="log_to"):
        Monitor(show=False, log_to=bad)


def test_a_logger_is_refused_with_a_hint():
    import logging

    with pytest.raises(TypeError, match=r"log_to.*callable"):
        Monitor(show=False, log_to=logging.getLogger("x"))


def test_a_file_is_not_a_log_directory(tmp_path: Path):
    path = tmp_path / "run.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match=r"log_to.*is a file"):
        Monitor(show=False, log_to=path)


def test_a_directory_without_tensorboard_is_a_clear_error(tmp_path: Path, monkeypatch):
    import gradwatch.sinks as sinks

    monkeypatch.setattr(sinks, "_import_torch_writer", lambda: None)
    monkeypatch.setattr(sinks, "_tf_importable", lambda: False)
    with pytest.raises(ValueError, match=r"log_to=.*pip install tensorboard"):
        Monitor(show=False, log_to=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_a_directory_is_written_lazily_by_the_writer_it_resolves_to(tmp_path, monkeypatch):
    import gradwatch.sinks as sinks

    made: list[FakeWriter] = []

    def writer_class(log_dir: str, max_queue: int = 10) -> FakeWriter:
        # A whole flush fits the queue, so add_scalar never waits for the writer thread.
        assert max_queue >= 20_000
        made.append(FakeWriter())
        return made[-1]

    monkeypatch.setattr(sinks, "_import_torch_writer", lambda: writer_class)
    m = monitor(log_to=tmp_path / "tb")
    assert made == []  # no writer, no event file, until there is something to write
    m.observe([_stats(0)])
    m.close()
    assert made[0].scalars and made[0].closed  # gradwatch's own writer is closed
    m.close()  # idempotent


def test_resolve_sink_keeps_a_sink_and_import_stays_light():
    sink = CountingSink()
    assert resolve_sink(sink) is sink
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_sink(lambda step, scalars: None)

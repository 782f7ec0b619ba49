"""Where the numbers go: ``log_to=`` sinks for TensorBoard, wandb, MLflow or a callable.

A :class:`~gradwatch.monitor.Monitor` turns every batch of
:class:`~gradwatch.StepStats` it observes into one ``{tag: value}`` dict per training
step (:func:`scalars_for`) and hands the whole batch to each sink in one
:meth:`Sink.write` call, at the adapter's flush: never per step, and from numbers that
are already on the host, so logging adds no device sync.

The tags (see ``docs/logging.md``):

* ``grad_2.0_norm/<param>``: L2 norm of a parameter's gradient (Lightning's
  ``grad_norm`` spelling);
* ``grad_max_abs/<param>``, ``grad_zero_frac/<param>``: its max |g| and the fraction of
  its entries that are exactly zero;
* ``grad_norm``: the total L2 norm over all gradients (Hugging Face Trainer's name);
* ``act_dead_frac/<activation>``, ``act_tail_frac/<activation>``: dead units and
  outputs in the flat tails, on steps whose activations were sampled;
* ``gradwatch/finding/<rule>``: ``1.0`` while a finding of ``rule`` is open, ``0.0``
  once it closed, at the last step of each flush.

:func:`resolve_sink` turns whatever ``log_to=`` was given into a :class:`Sink`, importing
a framework only when the target needs it.

Example:
    >>> from gradwatch import StepStats
    >>> s = StepStats(step=3, grad_layers=("fc.weight",), grad_norm=(0.5,),
    ...               grad_max_abs=(0.1,), grad_mean_abs=(0.01,), grad_zero_frac=(0.0,),
    ...               grad_nonfinite=(0,), grad_numel=(16,))
    >>> scalars_for(s)["grad_2.0_norm/fc.weight"]
    0.5
    >>> rows = []
    >>> sink = resolve_sink(lambda step, scalars: rows.append((step, scalars)))
    >>> sink.write([(3, scalars_for(s))])
    >>> rows[0][0]
    3
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradwatch.findings import Finding
from gradwatch.stats import StepStats

NORM_PREFIX = "grad_2.0_norm/"
MAX_ABS_PREFIX = "grad_max_abs/"
ZERO_FRAC_PREFIX = "grad_zero_frac/"
TOTAL_NORM_TAG = "grad_norm"
DEAD_PREFIX = "act_dead_frac/"
TAIL_PREFIX = "act_tail_frac/"
FINDING_PREFIX = "gradwatch/finding/"

#: One flush: ``(step, {tag: value})`` per training step, oldest first.
Batch = Sequence[tuple[int, Mapping[str, float]]]

_ACCEPTED = (
    "a TensorBoard log directory (str or Path), a torch.utils.tensorboard.SummaryWriter, "
    "a wandb run, the mlflow module, a callable (step, {name: value}), a gradwatch.sinks.Sink, "
    "or a list of those"
)


@functools.lru_cache(maxsize=16)
def _grad_tags(layers: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    # A run has one or two layer tuples; building 3 strings per layer every step would
    # cost more than everything else here.
    return tuple((NORM_PREFIX + n, MAX_ABS_PREFIX + n, ZERO_FRAC_PREFIX + n) for n in layers)


@functools.lru_cache(maxsize=16)
def _act_tags(layers: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((DEAD_PREFIX + n, TAIL_PREFIX + n) for n in layers)


def total_norm(stats: StepStats) -> float | None:
    """The total gradient L2 norm of a step: the adapter's ``grad_total_norm``, else the
    norm over the per-layer norms (NaN when any gradient held NaN/Inf, as the analyzer
    counts it); ``None`` for a step with neither."""
    if stats.grad_total_norm is not None:
        return float(stats.grad_total_norm)
    if not stats.grad_layers:
        return None
    if any(stats.grad_nonfinite):
        return math.nan
    return math.sqrt(math.fsum(float(v) * float(v) for v in stats.grad_norm))


def scalars_for(
    stats: StepStats,
    findings: Iterable[Finding] = (),
    open_rules: Iterable[str] | None = None,
) -> dict[str, float]:
    """The ``{tag: value}`` dict gradwatch logs for one step (tags in the module doc).

    Args:
        stats: the step's statistics.
        findings: findings to log as ``gradwatch/finding/<rule>``. Defaults to none.
        open_rules: the rules whose finding is still open (``1.0``); the other
            ``findings`` log ``0.0``. Defaults to ``None``: every finding given is open.

    A trainer callback that logs through its trainer's logger calls this (or receives
    the same dict through :meth:`gradwatch.monitor.Monitor.add_sink`).
    """
    out: dict[str, float] = {}
    for (norm_tag, max_tag, zero_tag), norm, max_abs, zero in zip(
        _grad_tags(stats.grad_layers),
        stats.grad_norm,
        stats.grad_max_abs,
        stats.grad_zero_frac,
        strict=True,
    ):
        out[norm_tag] = float(norm)
        out[max_tag] = float(max_abs)
        out[zero_tag] = float(zero)
    total = total_norm(stats)
    if total is not None:
        out[TOTAL_NORM_TAG] = total
    for (dead_tag, tail_tag), dead, tail in zip(
        _act_tags(stats.act_layers), stats.act_dead_frac, stats.act_tail_frac, strict=True
    ):
        out[dead_tag] = float(dead)
        out[tail_tag] = float(tail)
    is_open = None if open_rules is None else set(open_rules)
    for finding in findings:
        out[FINDING_PREFIX + finding.rule] = (
            1.0 if is_open is None or finding.rule in is_open else 0.0
        )
    return out


class Sink:
    """Receives each flush's scalars. Subclass it (or pass a callable) for a new target.

    Attributes:
        name: what the target is, for the warning if it fails.
    """

    name = "sink"

    def write(self, batch: Batch) -> None:
        """Log one flush: ``(step, {tag: value})`` per step, oldest first. Called once
        per flush."""
        raise NotImplementedError

    def flush(self) -> None:
        """Push buffered writes out (at the report). Defaults to nothing."""

    def close(self) -> None:
        """Release what gradwatch opened itself; a target the user passed in is only
        flushed. Called once, when the run closes. Defaults to :meth:`flush`."""
        self.flush()


class CallableSink(Sink):
    """Calls ``fn(step, {tag: value})`` once per step of each flush."""

    def __init__(self, fn: Callable[[int, dict[str, float]], Any], name: str | None = None):
        self.fn = fn
        self.name = name or f"callable {getattr(fn, '__qualname__', type(fn).__name__)}"

    def write(self, batch: Batch) -> None:
        for step, scalars in batch:
            self.fn(step, dict(scalars))


class SummaryWriterSink(Sink):
    """A ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``).

    Args:
        writer: the writer, or a zero-argument factory that creates it on the first
            write (a log directory: no empty event file for a run that logs nothing).
        owned: gradwatch created the writer, so :meth:`close` closes it.
    """

    def __init__(self, writer: Any, *, owned: bool = False, name: str | None = None) -> None:
        self._writer = writer if hasattr(writer, "add_scalar") else None
        self._factory: Callable[[], Any] | None = None if self._writer is not None else writer
        self.owned = owned
        self.name = name or f"SummaryWriter {type(writer).__name__}"

    @property
    def writer(self) -> Any:
        """The writer, created now if it was deferred."""
        if self._writer is None and self._factory is not None:
            self._writer, self._factory = self._factory(), None
        return self._writer

    def write(self, batch: Batch) -> None:
        add_scalar = self.writer.add_scalar
        for step, scalars in batch:
            for tag, value in scalars.items():
                add_scalar(tag, value, step)

    def flush(self) -> None:
        if self._writer is not None and hasattr(self._writer, "flush"):
            self._writer.flush()

    def close(self) -> None:
        if self._writer is None:
            return
        if self.owned and hasattr(self._writer, "close"):
            self._writer.close()
        else:
            self.flush()


class TfSummarySink(Sink):
    """A TensorBoard log directory written with ``tf.summary`` (TensorFlow installed,
    torch's writer not). The writer is created on the first write."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.name = f"TensorBoard directory {str(logdir)!r} (tf.summary)"
        self._writer: Any = None

    def write(self, batch: Batch) -> None:
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.logdir))
        with self._writer.as_default():
            for step, scalars in batch:
                for tag, value in scalars.items():
                    tf.summary.scalar(tag, value, step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbSink(Sink):
    """A wandb run (or anything with ``log(dict, step=)``): one ``log`` call per step.

    wandb keeps only steps that increase: when your loop logs to the same run with a
    step ahead of gradwatch's flush, wandb drops the older rows (see ``docs/logging.md``).
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        # An offline run has no name (the server assigns it), only its id.
        label = getattr(run, "name", None) or getattr(run, "id", None) or type(run).__name__
        self.name = f"wandb run {label}"

    def write(self, batch: Batch) -> None:
        for step, scalars in batch:
            self.run.log(dict(scalars), step=step)


class MlflowSink(Sink):
    """The ``mlflow`` module (or anything with ``log_metrics(dict, step=)``), logging to
    its active run: one ``log_metrics`` call per step."""

    def __init__(self, mlflow: Any) -> None:
        self.mlflow = mlflow
        self.name = f"mlflow ({getattr(mlflow, '__name__', type(mlflow).__name__)})"

    def write(self, batch: Batch) -> None:
        for step, scalars in batch:
            self.mlflow.log_metrics(dict(scalars), step=step)


class MultiSink(Sink):
    """Several sinks given as one ``log_to=`` list; the monitor guards each on its own."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)
        self.name = ", ".join(s.name for s in self.sinks)

    def write(self, batch: Batch) -> None:  # pragma: no cover - the monitor unpacks it
        for sink in self.sinks:
            sink.write(batch)


def _import_torch_writer() -> Callable[..., Any] | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # torch or tensorboard missing (torch raises ImportError for the latter)
        return None
    writer: Callable[..., Any] = SummaryWriter
    return writer


def _tf_importable() -> bool:
    # tf.summary.scalar is implemented by the tensorboard package; without it every
    # write fails ("TensorBoard is not installed"), so it must be importable too.
    if importlib.util.find_spec("tensorboard") is None:
        return False
    try:
        import tensorflow as tf

        return hasattr(tf, "summary")
    except Exception:
        return False


# Events a directory writer queues before add_scalar blocks on its writer thread: a
# whole flush (~100 bytes each). At torch's default of 10, each scalar past the 10th
# waited on the thread's Python CRC: 0.26 ms a scalar against 0.04 ms with a large
# queue, 2.5-3% of an MLP step (benchmarks/log_to_cost.py, docs/benchmarks.md).
_TB_QUEUE = 20_000


def _directory_sink(path: str | os.PathLike[str], framework: str | None) -> Sink:
    if isinstance(path, str) and not path.strip():
        raise ValueError("log_to is an empty string; pass a TensorBoard log directory")
    logdir = Path(path)
    if logdir.exists() and not logdir.is_dir():
        raise ValueError(f"log_to={str(logdir)!r} is a file, not a TensorBoard log directory")
    # A Keras run has TensorFlow at hand; a torch run has torch: use the writer of the
    # framework being trained, so a Keras user does not pay for importing torch.
    order = ("tf", "torch") if framework == "keras" else ("torch", "tf")
    for backend in order:
        if backend == "torch":
            writer_class = _import_torch_writer()
            if writer_class is not None:
                return SummaryWriterSink(
                    functools.partial(writer_class, log_dir=str(logdir), max_queue=_TB_QUEUE),
                    owned=True,
                    name=f"TensorBoard directory {str(logdir)!r}",
                )
        elif _tf_importable():
            return TfSummarySink(logdir)
    raise ValueError(
        f"log_to={str(logdir)!r} is a TensorBoard log directory, but neither "
        f"torch.utils.tensorboard (torch) nor tf.summary (tensorflow) can write it: "
        f"pip install tensorboard"
    )


def resolve_sink(target: Any, framework: str | None = None) -> Sink:
    """The :class:`Sink` for a ``log_to=`` target.

    Args:
        target: see the module doc; a list or tuple gives several sinks.
        framework: ``"torch"`` or ``"keras"``: which TensorBoard writer a directory
            prefers. Defaults to ``None`` (torch's, then tf.summary).

    Raises:
        TypeError: naming ``log_to``, for a target of no known kind.
        ValueError: naming ``log_to``, for a directory no TensorBoard writer can serve.
    """
    if isinstance(target, Sink):
        return target
    if isinstance(target, (str, os.PathLike)):
        return _directory_sink(target, framework)
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError("log_to is an empty list; pass None to log nowhere")
        return MultiSink([resolve_sink(t, framework) for t in target])
    if isinstance(target, logging.Logger):
        raise TypeError(
            "log_to got a logging.Logger, which logs text, not scalars; pass a callable "
            "(step, {name: value}) that formats them for it"
        )
    if callable(getattr(target, "add_scalar", None)):
        return SummaryWriterSink(target)
    if callable(getattr(target, "log_metrics", None)):
        return MlflowSink(target)
    if callable(getattr(target, "log", None)) and (
        not isinstance(target, types.ModuleType) or target.__name__ == "wandb"
    ):
        return WandbSink(target)
    if callable(target) and not isinstance(target, type):
        return CallableSink(target)
    raise TypeError(f"log_to must be {_ACCEPTED}; got {type(target).__name__} {target!r}")


def sinks_of(sink: Sink) -> tuple[Sink, ...]:
    """The sinks inside ``sink`` (a :class:`MultiSink` holds several)."""
    return sink.sinks if isinstance(sink, MultiSink) else (sink,)


__all__ = [
    "DEAD_PREFIX",
    "FINDING_PREFIX",
    "MAX_ABS_PREFIX",
    "NORM_PREFIX",
    "TAIL_PREFIX",
    "TOTAL_NORM_TAG",
    "ZERO_FRAC_PREFIX",
    "Batch",
    "CallableSink",
    "MlflowSink",
    "MultiSink",
    "Sink",
    "SummaryWriterSink",
    "TfSummarySink",
    "WandbSink",
    "resolve_sink",
    "scalars_for",
    "sinks_of",
    "total_norm",
]

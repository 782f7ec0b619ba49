"""What every rule shares: the :class:`Rule` base, its :class:`RuleContext` and :class:`Symptom`.

A rule is a small frozen object with named thresholds and one method,
:meth:`Rule.check`, that judges a window of statistics and returns a
:class:`Symptom` or ``None``. Rules keep no state: the analyzer owns the window,
counts persistence (a symptom must hold ``persistence`` consecutive checks before
a finding opens) and tells the rule whether its finding is currently active, so
the rule can apply hysteresis (a looser threshold to stay on than to turn on).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from gradwatch.fixes import Fix
from gradwatch.initial_scale import InitialScale
from gradwatch.layer_info import LayerInfo
from gradwatch.nonfinite_onset import NonfiniteOnset
from gradwatch.window import WindowView

# The metrics of RuleContext.time (RunStatistics keeps them per recurrent layer).
TIME_METRICS = ("grad_first", "grad_last", "length")


@dataclass(frozen=True)
class Symptom:
    """What a rule sees in the current window."""

    layers: tuple[str, ...]
    severity: str
    message: str
    evidence: dict[str, float]
    fixes: tuple[Fix, ...]
    # The step the symptom began, when the rule can tell (default: the check's step).
    since: int | None = None
    # How bad it is, larger is worse: a finding reports the evidence of its worst check.
    score: float = 0.0


@dataclass(frozen=True)
class RuleContext:
    """Everything a rule may look at when it judges one step.

    Attributes:
        step: the newest step.
        grads: per-layer-group gradient metrics (``norm``, ``max_abs``, ``mean_abs``,
            ``zero_frac``, ``nonfinite``, ``numel``), oldest step first, model order.
        acts: per-activation-layer metrics (``inactive``, ``dead``, ``tail``), from
            the steps where activations were sampled.
        act_kinds: the kind of each column of ``acts``.
        act_is_output: whether each column of ``acts`` is the model's output.
        run: per-step totals, one column ``"run"``: ``total_norm``, ``skipped``.
        active: whether this rule's finding is in an active episode (hysteresis).
        baseline_total_norm: smallest total gradient norm of the first 5 steps with a
            finite gradient (the scale at initialization), or ``None`` before there is one.
        initial_grad_to_weight: smallest, over the first 5 steps with weight norms, of
            the median over layers of |g| / |w|; ``None`` without weight norms.
        hidden_kinds: the activation kinds seen on non-output layers so far.
        new_steps: steps observed since the previous check (``check_every`` apart).
        weights_nonfinite_since: the first step in the window whose non-finite
            gradients reached the optimizer (not skipped), or ``None``; from then on the
            weights are NaN/Inf and statistics computed with them are unusable.
        layer_info: what the adapter knows of each layer group (the column names of
            ``grads``) that no gradient shows: see :class:`~gradwatch.layer_info.LayerInfo`.
            Groups the adapter said nothing of are absent.
        time: per-recurrent-layer through-time metrics (``grad_first``, ``grad_last``:
            RMS of the gradient reaching the start and the end of the sequence, see
            :attr:`StepStats.time_grad_first`; ``length``: time
            steps), from the sampled steps that measured them (``StepStats.time_layers``);
            empty when no adapter measured any.
        initial_scales: each layer group's weight and bias scale at the run's first
            step with weight norms (see :class:`~gradwatch.initial_scale.InitialScale`).
        nonfinite_onset: the run's first step with NaN/Inf gradients and the activation
            outputs that were NaN/Inf in its forward pass (see
            :class:`~gradwatch.nonfinite_onset.NonfiniteOnset`), kept after the step
            leaves the window; ``None`` before there is one.
    """

    step: int
    grads: WindowView
    acts: WindowView
    act_kinds: tuple[str, ...]
    act_is_output: tuple[bool, ...]
    run: WindowView
    active: bool
    baseline_total_norm: float | None
    initial_grad_to_weight: float | None
    hidden_kinds: frozenset[str]
    new_steps: int = 1
    weights_nonfinite_since: int | None = None
    layer_info: Mapping[str, LayerInfo] = field(default_factory=dict)
    time: WindowView = field(default_factory=lambda: empty_view(TIME_METRICS))
    initial_scales: Mapping[str, InitialScale] = field(default_factory=dict)
    nonfinite_onset: NonfiniteOnset | None = None


def empty_view(metrics: tuple[str, ...]) -> WindowView:
    """A :class:`WindowView` with no step and no column."""
    return WindowView(np.zeros(0, dtype=np.int64), (), {m: np.zeros((0, 0)) for m in metrics})


@dataclass(frozen=True)
class Rule:
    """Base class. Subclasses set ``id`` and implement :meth:`check`.

    Args:
        window: how many of the newest steps the rule summarises. Defaults to ``20``.
        persistence: steps a symptom must hold, at every check, before a finding
            opens. Defaults to ``10``.
        warmup_steps: steps ignored at the start of a run, when statistics of any
            network are in flux. Defaults to ``10``.
    """

    id: ClassVar[str] = ""
    needs_activations: ClassVar[bool] = False
    # Whether the rule's evidence means anything once NaN/Inf gradients have reached
    # the weights: dead, saturated or vanishing units computed on NaN weights depend on
    # what the CPU's kernels return for NaN (oneDNN's relu(NaN) is 0 on some machines).
    needs_finite_weights: ClassVar[bool] = False

    window: int = 20
    persistence: int = 10
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = str(f.type) in ("int", "float")
            if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{type(self).__name__}.{f.name} must be a number, got {value!r}")
            if not numeric:
                continue
            if str(f.type) == "int" and not isinstance(value, int):
                raise TypeError(f"{type(self).__name__}.{f.name} must be an integer, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{type(self).__name__}.{f.name} must be a finite number >= 0, got {value!r}"
                )
        if self.window < 1:
            raise ValueError(f"{type(self).__name__}.window must be >= 1, got {self.window}")
        if self.persistence < 1:
            raise ValueError(
                f"{type(self).__name__}.persistence must be >= 1, got {self.persistence}"
            )

    def check(self, ctx: RuleContext) -> Symptom | None:  # pragma: no cover - abstract
        raise NotImplementedError


def window_median(values: np.ndarray) -> np.ndarray:
    """Per-column median over rows, ignoring NaN (absent) entries; all-absent is NaN.

    ``np.nanmedian`` goes through masked arrays and costs ~0.6 ms per call on small
    windows; sorting once (NaN sorts last) and indexing is ~20x cheaper.
    """
    cols = values.shape[1] if values.ndim == 2 else 0
    if values.size == 0:
        return np.full(cols, np.nan)
    ordered = values.copy()
    ordered.sort(axis=0)
    # NaN sorts last, so the last row is NaN exactly in the columns with an absent entry.
    if values.ndim == 2 and not math.isnan(ordered[-1].max()):
        # None absent: every column's middle rows, the general case's arithmetic.
        rows = ordered.shape[0]
        middle: np.ndarray = 0.5 * (ordered[(rows - 1) // 2] + ordered[rows // 2])
        return middle
    out = np.full(cols, np.nan)
    count = np.count_nonzero(~np.isnan(values), axis=0)
    ok = np.flatnonzero(count > 0)
    lo, hi = (count[ok] - 1) // 2, count[ok] // 2
    out[ok] = 0.5 * (ordered[lo, ok] + ordered[hi, ok])
    return out


def median(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a 1-D array, the same number at a fraction of the
    cost: ``np.median`` partitions, checks for NaN and averages through ``np.mean``
    (~10 numpy calls); this sorts once. NaN anywhere gives NaN, as ``np.median`` does;
    an empty array gives NaN without a warning.

    >>> median(np.array([3.0, 1.0, 2.0, 10.0]))
    2.5
    """
    ordered = np.sort(values)
    n = ordered.size
    if n == 0 or math.isnan(ordered[-1]):  # NaN sorts last
        return math.nan
    if n % 2:
        return float(ordered[n // 2])
    return float((ordered[n // 2 - 1] + ordered[n // 2]) / 2)


def nanmax(values: np.ndarray) -> float:
    """The largest non-NaN entry; NaN when there is none. ``np.nanmax`` warns
    ("All-NaN slice encountered") on an all-NaN input, and no numpy warning may
    reach the user."""
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    return float(present.max()) if present.size else math.nan


def recent_rows(steps: np.ndarray, window: int, at_least: int) -> slice:
    """The rows of a view that cover its newest ``window`` *steps*, but at least
    ``at_least`` rows. With sparse sampling (e.g. every 10th step after the dense
    start), ``window`` rows would reach back ``10 x window`` steps and a pathology that
    starts mid-run would need ~100 steps to outvote the healthy rows; our zoo's
    mid-run dead-ReLU scenario ended before that."""
    n = int(steps.size)
    if n == 0:
        return slice(0, 0)
    inside = int(np.count_nonzero(steps > steps[-1] - window))
    return slice(n - max(inside, min(at_least, n)), None)


def hidden_columns(ctx: RuleContext, kinds: frozenset[str]) -> list[int]:
    """Columns of ``ctx.acts`` whose kind is in ``kinds``, the model output left out."""
    return [i for i, kind in enumerate(ctx.act_kinds) if kind in kinds and not ctx.act_is_output[i]]


def sampled_median(
    ctx: RuleContext, cols: list[int], metric: str, window: int, min_samples: int, rows: int
) -> np.ndarray | None:
    """Window median of an activation metric over ``cols``: the newest ``window`` steps
    but at least ``rows`` samples (see :func:`recent_rows`); ``None`` with fewer than
    ``min_samples`` samples."""
    view = ctx.acts
    values = view[metric][recent_rows(view.steps, window, max(rows, min_samples))][:, cols]
    if np.sum(~np.isnan(values).all(axis=1)) < min_samples:
        return None
    return window_median(values)


def format_layers(layers: tuple[str, ...], limit: int = 3) -> str:
    """``"fc1, fc2 and 3 more"`` for messages."""
    if len(layers) <= limit:
        return ", ".join(layers)
    return f"{', '.join(layers[:limit])} and {len(layers) - limit} more"

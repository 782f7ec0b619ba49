"""What the analyzer remembers of a run: :class:`RunStatistics`.

It owns the windows the rules judge (per layer group, per activation site, per step),
the whole-run totals and the downsampled flow history behind the report, and the
run's reference scales (the initial total norm, the initial gradient-to-weight ratio).
Memory is bounded by the window, the history bins and the number of layers, never by
the number of steps.

Example:
    >>> from gradwatch import StepStats
    >>> stats = RunStatistics(window=8, history_bins=4)
    >>> stats.add(StepStats(step=0, grad_total_norm=2.0))
    >>> stats.n_steps, stats.baseline_total_norm
    (1, 2.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from gradwatch.history import FlowHistory, LayerTotals
from gradwatch.initial_scale import InitialScale, initial_scales
from gradwatch.nonfinite_onset import NonfiniteOnset, onset_of
from gradwatch.report import FlowHistory as FlowSnapshot
from gradwatch.report import LayerSummary
from gradwatch.rules.base import TIME_METRICS
from gradwatch.stats import StepStats
from gradwatch.window import Window, WindowView

GRAD_METRICS = ("norm", "max_abs", "mean_abs", "zero_frac", "nonfinite", "numel", "param_norm")
ACT_METRICS = ("inactive", "dead", "tail")
RUN_METRICS = ("total_norm", "skipped", "nonfinite")
# The first steps with a finite gradient give the run's reference scale, the smallest
# of them: an explosion can start at step 1, and a reference set too low only makes
# advice conservative, while one set too high hides the explosion.
BASELINE_STEPS = 5


def module_of(name: str) -> str:
    """The layer group of a parameter: its module path (``"enc.fc1.weight"`` -> ``"enc.fc1"``,
    ``"dense_3/kernel"`` -> ``"dense_3"``). A name with no separator is its own group."""
    cut = max(name.rfind("."), name.rfind("/"))
    return name[:cut] if cut > 0 else name


class RunStatistics:
    """The windows, totals and reference scales of one run.

    Args:
        window: steps kept in each window.
        history_bins: time bins of the flow history.
        group_by: maps a parameter name to its layer group. Defaults to :func:`module_of`.
    """

    def __init__(
        self, window: int, history_bins: int, group_by: Callable[[str], str] = module_of
    ) -> None:
        self.group_by = group_by
        self.grads = Window(window, GRAD_METRICS)
        self.acts = Window(window, ACT_METRICS)
        self.run = Window(window, RUN_METRICS)
        self.time = Window(window, TIME_METRICS)
        self.totals = LayerTotals()
        self.flow = FlowHistory(history_bins)
        self.act_kind: dict[str, str] = {}
        self.act_output: dict[str, bool] = {}
        self.hidden_kinds: set[str] = set()
        self._group_cache: tuple[tuple[str, ...], tuple[str, ...], np.ndarray] | None = None
        self._folded = 0  # gradient rows of self.grads already in totals and flow
        self._baseline: list[float] = []
        self._initial_relative: list[float] = []  # median |g|/|w| of the first steps
        # Their minima, kept as they grow: the rules read them at every check.
        self._baseline_min: float | None = None
        self._initial_relative_min: float | None = None
        # Each group's weight and bias scale at the first step with weight norms.
        self.initial_scales: dict[str, InitialScale] = {}
        # The run's first step with NaN/Inf gradients and its forward pass, kept for good.
        self.nonfinite_onset: NonfiniteOnset | None = None
        self.n_steps = 0
        self.first_step = -1
        self.last_step = -1
        self.last_step_nonfinite = False  # NaN/Inf gradients or total norm in the newest step

    @property
    def baseline_total_norm(self) -> float | None:
        """Smallest total norm of the first finite steps, or ``None`` before one."""
        return self._baseline_min

    @property
    def initial_grad_to_weight(self) -> float | None:
        """Smallest median |g|/|w| of the first steps with weight norms, or ``None``."""
        return self._initial_relative_min

    def add(self, s: StepStats) -> None:
        """Take one step's statistics into the windows, totals and history."""
        step = int(s.step)
        self.n_steps += 1
        if self.first_step < 0:
            self.first_step = step
        self.last_step = step
        total_norm = math.nan
        nonfinite = False
        if s.grad_layers:
            total_norm = self._add_grads(s)
            nonfinite = bool(np.isnan(total_norm))
        elif s.grad_total_norm is not None:
            total_norm = float(s.grad_total_norm)
            nonfinite = not math.isfinite(total_norm)
            total_norm = total_norm if not nonfinite else math.nan
        self.last_step_nonfinite = nonfinite
        if nonfinite and self.nonfinite_onset is None and not s.skipped_step:
            self.nonfinite_onset = onset_of(s)
        # One (metrics, 1) block in RUN_METRICS order: one assignment into the ring.
        run_row = np.array([[total_norm], [float(s.skipped_step)], [float(nonfinite)]])
        self.run.push_block(step, ("run",), run_row)
        if s.act_layers:
            self._add_acts(s)
        if s.time_layers:
            self.time.push(
                step,
                s.time_layers,
                {
                    "grad_first": np.asarray(s.time_grad_first, dtype=np.float64),
                    "grad_last": np.asarray(s.time_grad_last, dtype=np.float64),
                    "length": np.asarray(s.time_length, dtype=np.float64),
                },
            )
        if len(self._baseline) < BASELINE_STEPS and math.isfinite(total_norm):
            self._baseline.append(total_norm)
            self._baseline_min = float(np.min(self._baseline))

    def regroup(self) -> None:
        """Forget the cached parameter-to-group map (``group_by``'s answers changed)."""
        self._group_cache = None

    def _groups(self, layers: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
        cache = self._group_cache
        if cache is not None and cache[0] == layers:
            return cache[1], cache[2]
        names: dict[str, int] = {}
        index = np.empty(len(layers), dtype=np.int64)
        for i, layer in enumerate(layers):
            index[i] = names.setdefault(self.group_by(layer), len(names))
        groups = tuple(names)
        self._group_cache = (layers, groups, index)
        return groups, index

    def _add_grads(self, s: StepStats) -> float:
        groups, idx = self._groups(s.grad_layers)
        n = len(groups)
        params = s.param_norm or None
        # One conversion of all the step's tuples: rows in GRAD_METRICS order.
        raw = np.array(
            (
                s.grad_norm,
                s.grad_max_abs,
                s.grad_mean_abs,
                s.grad_zero_frac,
                s.grad_nonfinite,
                s.grad_numel,
                params if params is not None else (math.nan,) * len(idx),
            ),
            dtype=np.float64,
        )
        norm, max_abs, _, _, _, numel, param = raw
        # Adapters that cannot afford a finite-only norm pass NaN/Inf: treat as unknown.
        norm[~np.isfinite(norm)] = np.nan
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if n == len(idx):  # one tensor per group: the groups' values are the tensors'
                block = raw
                weight = np.where(numel > 0, numel, 1.0)
                block[2:4] *= numel  # mean |g| and zero fraction, weighed by numel
                block[2:4] /= weight
                np.fmax(0.0, max_abs, out=max_abs)  # fmax ignores NaN (a tensor with NaN/Inf)
                np.abs(param, out=param)
            else:
                block = _grouped(idx, n, raw, params is not None)
        g_norm, g_param = block[0], block[6]
        if params is not None:
            if not self.initial_scales:
                self.initial_scales = initial_scales(s, self.group_by)
            weighed = np.isfinite(g_norm) & (g_param > 0)
            if len(self._initial_relative) < BASELINE_STEPS and weighed.any():
                self._initial_relative.append(float(np.median(g_norm[weighed] / g_param[weighed])))
                self._initial_relative_min = float(np.min(self._initial_relative))
        if self.grads.count - self._folded >= self.grads.size:
            self._fold()  # the ring is about to overwrite rows not yet in the totals
        self.grads.push_block(s.step, groups, block)
        if block[4].sum() > 0:
            return math.nan
        return math.hypot(*g_norm.tolist())  # hypot scales: no overflow on huge norms

    def _fold(self) -> None:
        """Add the gradient rows not yet counted to the totals and the flow history, in
        one vectorized pass per ``window`` steps instead of one per step."""
        grads = self.grads
        pending = grads.count - self._folded
        if pending <= 0:
            return
        rows, _ = grads.rows(last=pending)
        block = grads.block(rows)
        present = grads.present(rows)
        names = grads.stored_columns
        norm, max_abs, _, zero_frac, nonfinite, numel, _ = block
        self.totals.update_rows(names, norm, max_abs, zero_frac, nonfinite, numel, present)
        self.flow.add_rows(grads.steps_at(rows), names, norm)
        self._folded = grads.count

    def _add_acts(self, s: StepStats) -> None:
        for name, kind, out in zip(s.act_layers, s.act_kinds, s.act_is_output, strict=False):
            if name not in self.act_kind:
                self.act_kind[name] = kind
                self.act_output[name] = bool(out)
                if not out:
                    self.hidden_kinds.add(kind)
        # Rows in ACT_METRICS order: one conversion, one assignment into the ring.
        block = np.array((s.act_inactive_frac, s.act_dead_frac, s.act_tail_frac), dtype=np.float64)
        self.acts.push_block(s.step, s.act_layers, block)

    # --- what the report shows --------------------------------------------------------

    def layer_summaries(self) -> tuple[LayerSummary, ...]:
        """One whole-run summary per layer group, in model order."""
        self._fold()
        d = self.totals.data
        out = []
        for name in self.grads.columns:
            i = self.totals.columns.index[name]
            steps = int(d["steps"][i])
            count = d["log_norm_count"][i]
            # Norms that were exactly 0 all run (float32 underflow, dead layers) are 0.
            typical = float(10 ** (d["log_norm_sum"][i] / count)) if count else 0.0
            low = d["min_norm"][i]
            out.append(
                LayerSummary(
                    name=name,
                    steps=steps,
                    typical_norm=typical,
                    min_norm=float(low) if math.isfinite(low) else math.nan,
                    max_norm=float(d["max_norm"][i]),
                    last_norm=float(d["last_norm"][i]),
                    max_abs=float(d["max_abs"][i]),
                    zero_frac=float(d["zero_frac_sum"][i] / steps) if steps else 0.0,
                    nonfinite=int(d["nonfinite"][i]),
                    numel=int(d["numel"][i]),
                )
            )
        return tuple(out)

    def flow_snapshot(self) -> FlowSnapshot:
        """The downsampled flow history as the report holds it."""
        self._fold()
        bin_steps, flow_layers, flow = self.flow.snapshot()
        return FlowSnapshot(
            bin_steps=tuple(bin_steps),
            layers=tuple(flow_layers),
            log10_norm=tuple(tuple(float(v) for v in row) for row in flow),
        )

    def nbytes(self) -> int:
        """Bytes held by the buffers (bounded by window, bins and layers)."""
        self._fold()  # the totals grow to their width when the first rows arrive
        return (
            self.grads.nbytes()
            + self.acts.nbytes()
            + self.run.nbytes()
            + self.time.nbytes()
            + self.totals.nbytes()
            + self.flow.nbytes()
        )


def _grouped(idx: np.ndarray, n: int, raw: np.ndarray, has_params: bool) -> np.ndarray:
    """The ``(metrics, n)`` block of ``n`` layer groups from the per-tensor ``raw``
    rows (GRAD_METRICS order); ``idx`` names each tensor's group."""
    norm, max_abs, mean_abs, zero_frac, nonfinite, numel, params = raw
    g_numel = np.bincount(idx, numel, n)
    # Norms combine scaled by each group's largest, so 1e200 (float64) does not
    # overflow to Inf when squared; NaN (unknown) stays NaN.
    g_norm = _group_norms(idx, norm, n)
    weight = np.where(g_numel > 0, g_numel, 1.0)
    g_mean = np.bincount(idx, mean_abs * numel, n) / weight
    g_zero = np.bincount(idx, zero_frac * numel, n) / weight
    g_max = np.zeros(n)
    np.fmax.at(g_max, idx, max_abs)
    g_nonfinite = np.bincount(idx, nonfinite, n)
    # unknown unless the adapter measured the weights
    g_param = _group_norms(idx, params, n) if has_params else np.full(n, np.nan)
    return np.array((g_norm, g_max, g_mean, g_zero, g_nonfinite, g_numel, g_param))


def _group_norms(idx: np.ndarray, norms: np.ndarray, n: int) -> np.ndarray:
    """The L2 norm of each group of ``norms`` (``idx`` names each one's group), scaled
    by the group's largest so no square overflows; NaN (unknown) stays NaN."""
    scale = np.zeros(n)
    np.fmax.at(scale, idx, norms)
    scale = np.where(scale > 0, scale, 1.0)
    return np.sqrt(np.bincount(idx, (norms / scale[idx]) ** 2, n)) * scale


def weights_nonfinite_since(run: WindowView) -> int | None:
    """The first step in ``run`` whose NaN/Inf gradients were applied (an optimizer
    step that was not skipped), or ``None``. A skipped AMP step leaves the weights as
    they were."""
    # As np.nan_to_num(x) > 0 and == 0, without its cost: NaN is neither, Inf is > 0.
    nonfinite = run["nonfinite"][:, 0] > 0
    skipped = run["skipped"][:, 0]
    applied = (skipped == 0) | np.isnan(skipped)
    hit = np.flatnonzero(nonfinite & applied)
    return int(run.steps[hit[0]]) if hit.size else None


__all__ = ["BASELINE_STEPS", "RunStatistics", "module_of", "weights_nonfinite_since"]

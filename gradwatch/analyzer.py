"""The framework-free :class:`Analyzer`: feed it steps, ask it for a :class:`Report`.

Example:
    >>> import numpy as np, gradwatch
    >>> an = gradwatch.Analyzer()
    >>> rng = np.random.default_rng(0)
    >>> for step in range(30):
    ...     an.observe(step, grads={"fc1.weight": rng.normal(0, 1e-2, (8, 4)),
    ...                             "fc2.weight": rng.normal(0, 1e-2, (2, 8))})
    >>> an.report().healthy
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.config import check_bool, check_callable, check_int
from gradwatch.findings import SEVERITY_RANK, Finding
from gradwatch.guard import Guard
from gradwatch.history import FlowHistory, LayerTotals
from gradwatch.reduce import step_stats_from_arrays
from gradwatch.report import FlowHistory as FlowSnapshot
from gradwatch.report import LayerSummary, Report
from gradwatch.rules import DEFAULT_RULES, RULE_IDS, Rule, RuleContext, Symptom
from gradwatch.stats import StepStats
from gradwatch.window import Window, WindowView

GRAD_METRICS = ("norm", "max_abs", "mean_abs", "zero_frac", "nonfinite", "numel", "param_norm")
ACT_METRICS = ("inactive", "dead", "tail")
RUN_METRICS = ("total_norm", "skipped", "nonfinite")
# The first steps with a finite gradient give the run's reference scale, the smallest
# of them: an explosion can start at step 1, and a reference set too low only makes
# advice conservative, while one set too high hides the explosion.
_BASELINE_STEPS = 5
# Rules judge the last few dozen steps (DEFAULT_RULES use 20); a window of 10**5 steps
# already holds ~50 MB per 10 layers, and a typo such as 10**12 would try terabytes.
MAX_WINDOW = 100_000


def module_of(name: str) -> str:
    """The layer group of a parameter: its module path (``"enc.fc1.weight"`` -> ``"enc.fc1"``,
    ``"dense_3/kernel"`` -> ``"dense_3"``). A name with no separator is its own group."""
    cut = max(name.rfind("."), name.rfind("/"))
    return name[:cut] if cut > 0 else name


@dataclass
class _Episode:
    """Persistence and hysteresis bookkeeping for one rule, plus its finding so far."""

    streak: int = 0
    streak_start: int = 0
    active: bool = False
    finding: Finding | None = None
    layers: dict[str, None] = field(default_factory=dict)
    worst: Symptom | None = None  # the finding reports the evidence of its worst check


class Analyzer:
    """Consumes per-layer gradient statistics step by step and judges them with rules.

    Args:
        rules: the rules to apply: :class:`~gradwatch.rules.Rule` instances, or built-in
            rule ids such as ``"dead_relu"``. Defaults to :data:`gradwatch.rules.DEFAULT_RULES`.
        window: steps kept for the rules to judge (memory is bounded by it). Defaults to
            ``64``; must be at least every rule's ``window``.
        history_bins: time bins of the downsampled flow history. Defaults to ``128``.
        group_by: maps a parameter name to its layer group. Defaults to :func:`module_of`.
        on_finding: called with each new :class:`Finding` the first time it opens.
            Defaults to ``None``.
        strict: re-raise errors inside gradwatch instead of reporting them once and
            switching monitoring off. Defaults to ``False``.
        check_every: run the rules every this many steps; statistics are still kept
            for every step and persistence is counted in steps. Defaults to ``1``.

    Raises:
        ValueError: at construction, for a bad window, unknown or duplicate rule ids.
    """

    def __init__(
        self,
        rules: Sequence[Rule | str] = DEFAULT_RULES,
        *,
        window: int = 64,
        history_bins: int = 128,
        group_by: Callable[[str], str] = module_of,
        on_finding: Callable[[Finding], None] | None = None,
        strict: bool = False,
        check_every: int = 1,
    ) -> None:
        check_int("window", window, 1)
        if window > MAX_WINDOW:
            raise ValueError(f"window must be at most {MAX_WINDOW} steps, got {window!r}")
        check_int("history_bins", history_bins, 2)
        if history_bins % 2 or history_bins > MAX_WINDOW:
            raise ValueError(
                f"history_bins must be an even integer from 2 to {MAX_WINDOW}, got {history_bins!r}"
            )
        check_int("check_every", check_every, 1)
        check_callable("group_by", group_by)
        check_callable("on_finding", on_finding, optional=True)
        check_bool("strict", strict)
        rules = resolve_rules(rules)
        ids = [r.id for r in rules]
        for rule in rules:
            if not isinstance(rule, Rule) or not rule.id:
                raise ValueError(f"rules must be gradwatch Rule instances with an id, got {rule!r}")
            if rule.window > window:
                raise ValueError(
                    f"window={window} is smaller than {type(rule).__name__}.window={rule.window}"
                )
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"rules has duplicate rule ids: {dupes}")
        self.rules = rules
        self.window = window
        self.check_every = check_every
        self._since_check = 0
        self.group_by = group_by
        self.on_finding = on_finding
        self.guard = Guard("gradwatch analyzer", strict=strict)
        self._grads = Window(window, GRAD_METRICS)
        self._acts = Window(window, ACT_METRICS)
        self._run = Window(window, RUN_METRICS)
        self._totals = LayerTotals()
        self._flow = FlowHistory(history_bins)
        self._act_kind: dict[str, str] = {}
        self._act_output: dict[str, bool] = {}
        self._hidden_kinds: set[str] = set()
        self._episodes = {r.id: _Episode() for r in rules}
        self._group_cache: tuple[tuple[str, ...], tuple[str, ...], np.ndarray] | None = None
        self._baseline: list[float] = []
        self._initial_relative: list[float] = []  # median |g|/|w| of the first steps
        self._notes: dict[str, None] = {}
        # First step whose NaN/Inf gradients reached the weights, and the rules that
        # were not judged because of it (their evidence was computed on NaN weights).
        self._weights_nonfinite_first: int | None = None
        self._not_judged: dict[str, None] = {}
        self._opened: list[Finding] = []  # opened during this call, for on_finding
        self._n_steps = 0
        self._first_step = -1
        self._last_step = -1

    # --- input -----------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False once an internal error switched monitoring off."""
        return self.guard.enabled

    def observe(
        self,
        step: int,
        grads: Mapping[str, Any] | None = None,
        activations: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Analyze one step given raw arrays (numpy, or anything ``numpy.asarray`` or
        DLPack accepts). ``activations`` maps a name to ``(array, kind)`` or
        ``(array, kind, unit_axis[, is_output])``; ``params`` optionally maps each
        gradient's name to its parameter values. See
        :func:`gradwatch.reduce.step_stats_from_arrays`.
        """
        if not self.guard.enabled:
            return
        with self.guard:
            self._ingest(step_stats_from_arrays(step, grads, activations, params))
        self._announce()

    def observe_stats(self, stats: StepStats | Sequence[StepStats]) -> None:
        """Analyze statistics an adapter already reduced (one step or several)."""
        if not self.guard.enabled:
            return
        with self.guard:
            for s in [stats] if isinstance(stats, StepStats) else stats:
                self._ingest(s)
        self._announce()

    def _announce(self) -> None:
        """Hand new findings to ``on_finding`` outside the guard: an exception there is
        the user's own (``"raise"`` modes), never an internal error to swallow."""
        opened, self._opened = self._opened, []
        if self.on_finding is not None:
            for finding in opened:
                self.on_finding(finding)

    def add_note(self, note: str) -> None:
        """Record a coverage note for the report (shown once, whatever the repeats)."""
        self._notes[note] = None

    # --- core ------------------------------------------------------------------------

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

    def _ingest(self, s: StepStats) -> None:
        step = int(s.step)
        self._n_steps += 1
        if self._first_step < 0:
            self._first_step = step
        self._last_step = step
        total_norm = math.nan
        nonfinite = False
        if s.grad_layers:
            total_norm = self._ingest_grads(s)
            nonfinite = bool(np.isnan(total_norm))
        elif s.grad_total_norm is not None:
            total_norm = float(s.grad_total_norm)
            nonfinite = not math.isfinite(total_norm)
            total_norm = total_norm if not nonfinite else math.nan
        self._run.push(
            step,
            ("run",),
            {
                "total_norm": np.array([total_norm]),
                "skipped": np.array([float(s.skipped_step)]),
                "nonfinite": np.array([float(nonfinite)]),
            },
        )
        if s.act_layers:
            self._ingest_acts(s)
        self._judge(step)

    def _ingest_grads(self, s: StepStats) -> float:
        groups, idx = self._groups(s.grad_layers)
        n = len(groups)
        norm = np.asarray(s.grad_norm, dtype=np.float64)
        # Adapters that cannot afford a finite-only norm pass NaN/Inf: treat as unknown.
        norm = np.where(np.isfinite(norm), norm, np.nan)
        numel = np.asarray(s.grad_numel, dtype=np.float64)
        g_numel = np.bincount(idx, numel, n)
        # Norms combine scaled by each group's largest, so 1e200 (float64) does not
        # overflow to Inf when squared; NaN (unknown) stays NaN.
        scale = np.zeros(n)
        np.fmax.at(scale, idx, norm)
        scale = np.where(scale > 0, scale, 1.0)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            g_norm = np.sqrt(np.bincount(idx, (norm / scale[idx]) ** 2, n)) * scale
            weight = np.where(g_numel > 0, g_numel, 1.0)
            g_mean = np.bincount(idx, np.asarray(s.grad_mean_abs) * numel, n) / weight
            g_zero = np.bincount(idx, np.asarray(s.grad_zero_frac) * numel, n) / weight
        # fmax ignores NaN: an adapter may pass NaN max for a tensor holding NaN/Inf.
        g_max = np.zeros(n)
        np.fmax.at(g_max, idx, np.asarray(s.grad_max_abs, dtype=np.float64))
        g_nonfinite = np.bincount(idx, np.asarray(s.grad_nonfinite, dtype=np.float64), n)
        g_param = np.full(n, np.nan)  # unknown unless the adapter measured the weights
        if s.param_norm:
            p = np.asarray(s.param_norm, dtype=np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                g_param = np.sqrt(np.bincount(idx, p * p, n))
            weighed = np.isfinite(g_norm) & (g_param > 0)
            if len(self._initial_relative) < _BASELINE_STEPS and weighed.any():
                self._initial_relative.append(float(np.median(g_norm[weighed] / g_param[weighed])))
        self._grads.push(
            s.step,
            groups,
            {
                "norm": g_norm,
                "max_abs": g_max,
                "mean_abs": g_mean,
                "zero_frac": g_zero,
                "nonfinite": g_nonfinite,
                "numel": g_numel,
                "param_norm": g_param,
            },
        )
        self._totals.update(groups, g_norm, g_max, g_zero, g_nonfinite, g_numel)
        self._flow.add(s.step, groups, g_norm)
        if g_nonfinite.sum() > 0:
            return math.nan
        return math.hypot(*g_norm.tolist())  # hypot scales: no overflow on huge norms

    def _ingest_acts(self, s: StepStats) -> None:
        for name, kind, out in zip(s.act_layers, s.act_kinds, s.act_is_output, strict=False):
            if name not in self._act_kind:
                self._act_kind[name] = kind
                self._act_output[name] = bool(out)
                if not out:
                    self._hidden_kinds.add(kind)
        self._acts.push(
            s.step,
            s.act_layers,
            {
                "inactive": np.asarray(s.act_inactive_frac, dtype=np.float64),
                "dead": np.asarray(s.act_dead_frac, dtype=np.float64),
                "tail": np.asarray(s.act_tail_frac, dtype=np.float64),
            },
        )

    def _baseline_norm(self) -> float | None:
        return float(np.min(self._baseline)) if self._baseline else None

    def _judge(self, step: int) -> None:
        self._since_check += 1
        if len(self._baseline) < _BASELINE_STEPS:
            total = float(self._run.view(last=1)["total_norm"][-1, 0])
            if math.isfinite(total):
                self._baseline.append(total)
        if self._since_check < self.check_every:
            return
        new_steps, self._since_check = self._since_check, 0
        # Warm-up counts steps, not observations, so sampled statistics age the same way.
        warm = [r for r in self.rules if step - self._first_step >= r.warmup_steps]
        if not warm:
            return
        run = self._run.view()
        poisoned_since = _weights_nonfinite_since(run)
        if poisoned_since is not None and self._weights_nonfinite_first is None:
            self._weights_nonfinite_first = poisoned_since
        grads = self._grads.view()
        acts = self._acts.view()
        kinds = tuple(self._act_kind[c] for c in acts.columns)
        outputs = tuple(self._act_output[c] for c in acts.columns)
        baseline = self._baseline_norm()
        initial_relative = float(np.min(self._initial_relative)) if self._initial_relative else None
        hidden = frozenset(self._hidden_kinds)
        for rule in warm:
            episode = self._episodes[rule.id]
            ctx = RuleContext(
                step=step,
                grads=grads,
                acts=acts,
                act_kinds=kinds,
                act_is_output=outputs,
                run=run,
                active=episode.active,
                baseline_total_norm=baseline,
                initial_grad_to_weight=initial_relative,
                hidden_kinds=hidden,
                new_steps=new_steps,
                weights_nonfinite_since=poisoned_since,
            )
            if rule.needs_finite_weights and poisoned_since is not None:
                # No evidence either way: the episode ends, an opened finding stays.
                self._not_judged[rule.id] = None
                self._track(rule, episode, step, None)
                continue
            self._track(rule, episode, step, rule.check(ctx))

    def _track(self, rule: Rule, ep: _Episode, step: int, symptom: Symptom | None) -> None:
        if symptom is None:
            ep.streak = 0
            ep.active = False
            return
        if ep.streak == 0:
            ep.streak_start = step if symptom.since is None else min(step, symptom.since)
        ep.streak += 1
        if not ep.active and step - ep.streak_start + 1 < rule.persistence:
            return
        newly_opened = ep.finding is None
        ep.active = True
        for layer in symptom.layers:
            ep.layers[layer] = None
        old = ep.finding
        severity = symptom.severity
        if old is not None and SEVERITY_RANK[old.severity] > SEVERITY_RANK[severity]:
            severity = old.severity
        # Ties keep the earlier check: its window still shows how the episode began.
        if ep.worst is None or symptom.score > ep.worst.score:
            ep.worst = symptom
        worst = ep.worst
        ep.finding = Finding(
            rule=rule.id,
            severity=severity,
            layers=tuple(ep.layers),
            first_step=ep.streak_start if old is None else old.first_step,
            last_step=step,
            message=worst.message,
            evidence=dict(worst.evidence),
            fixes=worst.fixes,
        )
        if newly_opened:
            self._opened.append(ep.finding)

    # --- output ----------------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """Findings so far, most severe first (then in rule order)."""
        # Rule order breaks severity ties; DEFAULT_RULES puts the gradient-flow rules,
        # whose fixes address the most, before the per-unit ones.
        order = {rule.id: i for i, rule in enumerate(self.rules)}
        found = [ep.finding for ep in self._episodes.values() if ep.finding is not None]
        return sorted(found, key=lambda f: (-SEVERITY_RANK[f.severity], order[f.rule]))

    @property
    def open_rules(self) -> frozenset[str]:
        """Ids of the rules whose finding is open now: the symptom still holds."""
        return frozenset(rule for rule, ep in self._episodes.items() if ep.active)

    def report(self) -> Report:
        """The report of everything observed so far (also valid mid-run)."""
        layers = self._layer_summaries()
        bin_steps, flow_layers, flow = self._flow.snapshot()
        notes = list(self._notes)
        if self._not_judged:
            notes.append(
                f"From step {self._weights_nonfinite_first} on, NaN/Inf gradients reached "
                f"the weights, so the statistics computed with them are unusable: "
                f"{', '.join(self._not_judged)} were not judged while they lasted."
            )
        if not self.guard.enabled and self.guard.error is not None:
            notes.append(f"Monitoring stopped early after an internal error: {self.guard.error}")
        return Report(
            findings=tuple(self.findings),
            layers=layers,
            first_step=self._first_step,
            last_step=self._last_step,
            steps_observed=self._n_steps,
            flow=FlowSnapshot(
                bin_steps=tuple(bin_steps),
                layers=tuple(flow_layers),
                log10_norm=tuple(tuple(float(v) for v in row) for row in flow),
            ),
            notes=tuple(notes),
            stopped_at=None if self.guard.enabled else self._last_step,
        )

    def _layer_summaries(self) -> tuple[LayerSummary, ...]:
        d = self._totals.data
        out = []
        for name in self._grads.columns:
            i = self._totals.columns.index[name]
            steps = int(d["steps"][i])
            count = d["log_norm_count"][i]
            # Norms that were exactly 0 all run (float32 underflow, dead layers) are 0.
            typical = float(10 ** (d["log_norm_sum"][i] / count)) if count else 0.0
            out.append(
                LayerSummary(
                    name=name,
                    steps=steps,
                    typical_norm=typical,
                    min_norm=float(d["min_norm"][i])
                    if math.isfinite(d["min_norm"][i])
                    else math.nan,
                    max_norm=float(d["max_norm"][i]),
                    last_norm=float(d["last_norm"][i]),
                    max_abs=float(d["max_abs"][i]),
                    zero_frac=float(d["zero_frac_sum"][i] / steps) if steps else 0.0,
                    nonfinite=int(d["nonfinite"][i]),
                    numel=int(d["numel"][i]),
                )
            )
        return tuple(out)

    def nbytes(self) -> int:
        """Bytes held by the analyzer's buffers (bounded by window, bins and layers)."""
        return (
            self._grads.nbytes()
            + self._acts.nbytes()
            + self._run.nbytes()
            + self._totals.nbytes()
            + self._flow.nbytes()
        )


def _weights_nonfinite_since(run: WindowView) -> int | None:
    """The first step in ``run`` whose NaN/Inf gradients were applied (an optimizer
    step that was not skipped), or ``None``. A skipped AMP step leaves the weights as
    they were."""
    nonfinite = np.nan_to_num(run["nonfinite"][:, 0]) > 0
    applied = np.nan_to_num(run["skipped"][:, 0]) == 0
    hit = np.flatnonzero(nonfinite & applied)
    return int(run.steps[hit[0]]) if hit.size else None


def resolve_rules(rules: Sequence[Rule | str]) -> tuple[Rule, ...]:
    """Rule instances for ``rules``; a string picks the built-in rule with that id.

    Raises:
        ValueError: naming any id that is not a built-in rule id.
    """
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    try:
        rules = list(rules)
    except TypeError:
        raise ValueError(
            f"rules must be a sequence of Rule instances or rule ids, got {rules!r}"
        ) from None
    by_id = {r.id: r for r in DEFAULT_RULES}
    wrong = [r for r in rules if not isinstance(r, (str, Rule))]
    if wrong:
        raise ValueError(f"rules must hold gradwatch Rule instances or rule ids, got {wrong[0]!r}")
    unknown = sorted(r for r in rules if isinstance(r, str) and r not in by_id)
    if unknown:
        raise ValueError(f"rules: unknown rule ids {unknown}; known: {list(RULE_IDS)}")
    return tuple(by_id[r] if isinstance(r, str) else r for r in rules)


__all__ = ["Analyzer", "module_of", "resolve_rules"]

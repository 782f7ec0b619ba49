"""The framework-free :class:`Analyzer`: feed it steps, ask it for a :class:`Report`.

It keeps the run's statistics (:class:`~gradwatch.run_statistics.RunStatistics`), runs
the rules on them every ``check_every`` steps and turns their symptoms into findings
(:class:`~gradwatch.episodes.Episode`).

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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradwatch.config import check_bool, check_callable, check_int
from gradwatch.episodes import Episode
from gradwatch.findings import SEVERITY_RANK, Finding
from gradwatch.guard import Guard
from gradwatch.layer_info import LayerInfo, merge
from gradwatch.reduce import step_stats_from_arrays
from gradwatch.report import Report
from gradwatch.rules import DEFAULT_RULES, Rule, RuleContext
from gradwatch.rules.resolve import check_rules_fit, resolve_rules
from gradwatch.run_statistics import RunStatistics, module_of, weights_nonfinite_since
from gradwatch.stats import StepStats

# Rules judge the last few dozen steps (DEFAULT_RULES use 20); a window of 10**5 steps
# already holds ~50 MB per 10 layers, and a typo such as 10**12 would try terabytes.
MAX_WINDOW = 100_000
# The default rule schedule: every step while the first pathologies surface (the torch
# adapter also samples every step up to 50), then every 5th step as the torch adapter
# checks; with the default rules' persistences (1, 5, 10 steps) a finding then opens at
# most 5 steps later than with every-step checks, and NaN/Inf is judged at its step.
DENSE_CHECK_STEPS = 50
SPARSE_CHECK_EVERY = 5


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
            for every step and persistence is counted in steps. Defaults to ``None``:
            every step for the first :data:`DENSE_CHECK_STEPS` (50) steps, then every
            :data:`SPARSE_CHECK_EVERY` (5th) step, and at once on a step with NaN/Inf
            gradients. A finding of the default rules opens at most 5 steps later than
            with ``check_every=1``, which costs a full check (~5-10x the rest) per step.

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
        check_every: int | None = None,
    ) -> None:
        check_int("window", window, 1)
        if window > MAX_WINDOW:
            raise ValueError(f"window must be at most {MAX_WINDOW} steps, got {window!r}")
        check_int("history_bins", history_bins, 2)
        if history_bins % 2 or history_bins > MAX_WINDOW:
            raise ValueError(
                f"history_bins must be an even integer from 2 to {MAX_WINDOW}, got {history_bins!r}"
            )
        if check_every is not None:
            check_int("check_every", check_every, 1)
        check_callable("group_by", group_by)
        check_callable("on_finding", on_finding, optional=True)
        check_bool("strict", strict)
        rules = resolve_rules(rules)
        check_rules_fit(rules, window)
        self.rules = rules
        self.window = window
        self.check_every = check_every
        self._since_check = 0
        self.group_by = group_by
        self.on_finding = on_finding
        self.guard = Guard("gradwatch analyzer", strict=strict)
        self.stats = RunStatistics(window, history_bins, self.group_of)
        self._episodes = {r.id: Episode() for r in rules}
        self._notes: dict[str, None] = {}
        # First step whose NaN/Inf gradients reached the weights, and the rules that
        # were not judged because of it (their evidence was computed on NaN weights).
        self._weights_nonfinite_first: int | None = None
        self._not_judged: dict[str, None] = {}
        self._opened: list[Finding] = []  # opened during this call, for on_finding
        self._layer_info: dict[str, LayerInfo] = {}
        self._group_info: dict[str, LayerInfo] | None = None  # merged per group, lazily

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

    def set_layer_info(self, info: Mapping[str, LayerInfo]) -> None:
        """Tell the rules what no gradient shows about each parameter's layer (which
        activation it feeds, its fan-in, whether it is recurrent), keyed by parameter
        name as in :attr:`StepStats.grad_layers`. Later calls update earlier ones.

        Example:
            >>> from gradwatch.layer_info import LayerInfo
            >>> an = Analyzer()
            >>> an.set_layer_info({"fc1.weight": LayerInfo(feeds="relu", fan_in=784)})
        """
        for name, value in info.items():
            if not isinstance(value, LayerInfo):
                raise TypeError(f"layer info for {name!r} must be a LayerInfo, got {value!r}")
        self._layer_info.update(info)
        self._group_info = None
        self.stats.regroup()

    def group_of(self, name: str) -> str:
        """The layer group of parameter ``name``: its :attr:`LayerInfo.group` if the
        adapter gave one, else ``group_by(name)``."""
        info = self._layer_info.get(name)
        if info is not None and info.group is not None:
            return info.group
        return self.group_by(name)

    def _groups_info(self) -> dict[str, LayerInfo]:
        if self._group_info is None:
            merged: dict[str, LayerInfo] = {}
            for name, value in self._layer_info.items():
                group = self.group_of(name)
                merged[group] = merge(merged[group], value) if group in merged else value
            self._group_info = merged
        return self._group_info

    def add_note(self, note: str) -> None:
        """Record a coverage note for the report (shown once, whatever the repeats)."""
        self._notes[note] = None

    # --- judging ---------------------------------------------------------------------

    def _ingest(self, s: StepStats) -> None:
        self.stats.add(s)
        self._judge(int(s.step))

    def _due(self, step: int) -> bool:
        """Whether the rules run at ``step`` (see ``check_every``)."""
        if self.check_every is not None:
            return self._since_check >= self.check_every
        stats = self.stats
        if step - stats.first_step < DENSE_CHECK_STEPS or stats.last_step_nonfinite:
            return True
        return self._since_check >= SPARSE_CHECK_EVERY

    def _judge(self, step: int) -> None:
        self._since_check += 1
        if not self._due(step):
            return
        new_steps, self._since_check = self._since_check, 0
        stats = self.stats
        # Warm-up counts steps, not observations, so sampled statistics age the same way.
        warm = [r for r in self.rules if step - stats.first_step >= r.warmup_steps]
        if not warm:
            return
        run = stats.run.view()
        poisoned_since = weights_nonfinite_since(run)
        if poisoned_since is not None and self._weights_nonfinite_first is None:
            self._weights_nonfinite_first = poisoned_since
        acts = stats.acts.view()
        grads = stats.grads.view()
        time = stats.time.view()
        kinds = tuple(stats.act_kind[c] for c in acts.columns)
        outputs = tuple(stats.act_output[c] for c in acts.columns)
        baseline = stats.baseline_total_norm
        initial_relative = stats.initial_grad_to_weight
        hidden = frozenset(stats.hidden_kinds)
        layer_info = self._groups_info()
        contexts: dict[bool, RuleContext] = {}
        for rule in warm:
            episode = self._episodes[rule.id]
            if rule.needs_finite_weights and poisoned_since is not None:
                # No evidence either way: the episode ends, an opened finding stays.
                self._not_judged[rule.id] = None
                episode.track(rule, step, None)
                continue
            # Rules are stateless and the views read-only: one context per hysteresis state.
            ctx = contexts.get(episode.active)
            if ctx is None:
                ctx = contexts[episode.active] = RuleContext(
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
                    layer_info=layer_info,
                    time=time,
                    initial_scales=stats.initial_scales,
                    nonfinite_onset=stats.nonfinite_onset,
                )
            opened = episode.track(rule, step, rule.check(ctx))
            if opened is not None:
                self._opened.append(opened)

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
        stats = self.stats
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
            layers=stats.layer_summaries(),
            first_step=stats.first_step,
            last_step=stats.last_step,
            steps_observed=stats.n_steps,
            flow=stats.flow_snapshot(),
            notes=tuple(notes),
            stopped_at=None if self.guard.enabled else stats.last_step,
        )

    def nbytes(self) -> int:
        """Bytes held by the analyzer's buffers (bounded by window, bins and layers)."""
        return self.stats.nbytes()


__all__ = [
    "DENSE_CHECK_STEPS",
    "MAX_WINDOW",
    "SPARSE_CHECK_EVERY",
    "Analyzer",
    "module_of",
    "resolve_rules",
]

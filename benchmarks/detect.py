"""Run gradwatch on every zoo scenario, as a user would, and print the detection table.

Run: ``python benchmarks/detect.py [--framework torch|keras|all] [--only NAME]``.

PyTorch scenarios use ``gradwatch.watch(model, optimizer, on_finding=..., show=False)``
with every other argument at its default (schedules, flush interval, rules); Keras
scenarios use ``gradwatch.GradWatchCallback(on_finding=..., verbose=0)`` with every
other argument at its default, in a subprocess with ``KERAS_BACKEND=tensorflow``.
``on_finding`` is a callable that only records the step at which each finding opened,
to keep the output clean (the public API accepts a callable).

Columns: *found* lists every rule with a warning/error finding; *extra* those not in
the ground truth; *first step* is ``finding.first_step`` minus the step the
pathology started (0 unless the scenario has a mid-run onset), i.e. when the rule
says the symptom began; *reported at* is the optimizer step at which the finding
reached the user (persistence and the flush interval included).
*fix ranked first* marks each expected rule's first fix: ``ok`` when it is in the
expert set of ``benchmarks/scenarios/expected_fixes.py`` (written from the scenario's
built-in cause), ``WRONG`` when not, ``?`` when the table has no set for the pair.
Summary: recall over expected (scenario, rule) pairs, false-alarm rate over healthy
scenarios, median first-step over detected pairs, and the right-fix-first rate over
the detected expected pairs that have an expert set (pairs without one are counted
apart as "no judgement", never as a pass).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scenarios import Scenario  # noqa: E402
from benchmarks.scenarios.expected_fixes import JUDGE, first_fix_verdict  # noqa: E402

DETECT_WITHIN = 50


def _summary(scn: Scenario, report: Any, opened: dict[str, int], seconds: float) -> dict[str, Any]:
    start = max(report.first_step, 0)
    findings = [f for f in report.findings if f.severity in ("warning", "error")]
    return {
        "name": scn.name,
        "framework": scn.framework,
        "expected": "healthy" if scn.healthy else sorted(scn.expected_rules),
        "onset": scn.onset,
        "found": [f.rule for f in findings],
        "info": [f.rule for f in report.findings if f.severity == "info"],
        "severity": {f.rule: f.severity for f in findings},
        "first_step": {f.rule: f.first_step - start - scn.onset for f in findings},
        "reported_at": {f.rule: opened.get(f.rule, -1) for f in findings},
        "top_fix": {f.rule: (f.fixes[0].id if f.fixes else "") for f in findings},
        "steps_observed": report.steps_observed,
        "seconds": seconds,
    }


def run_torch(scn: Scenario, seed: int = 0) -> dict[str, Any]:
    """Train ``scn`` under ``gradwatch.watch`` with default settings; return the summary."""
    import gradwatch

    run = scn.build(seed)
    opened: dict[str, int] = {}
    holder: list[Any] = []

    def record(finding: Any) -> None:
        opened.setdefault(finding.rule, holder[0].step_count if holder else -1)

    t0 = time.perf_counter()
    gw = gradwatch.watch(run.model, run.optimizer, on_finding=record, show=False)
    holder.append(gw)
    for i in range(scn.steps):
        run.step(i)
    report = gw.report(show=False)
    gw.close()
    return _summary(scn, report, opened, time.perf_counter() - t0)


def run_keras(scn: Scenario, seed: int = 0) -> dict[str, Any]:
    """Train ``scn`` with ``gradwatch.GradWatchCallback`` at default settings (needs
    ``KERAS_BACKEND`` set before keras is imported)."""
    import gradwatch

    run = scn.build(seed)
    opened: dict[str, int] = {}
    counter = {"batches": 0}

    def record(finding: Any) -> None:
        opened.setdefault(finding.rule, counter["batches"])

    import keras

    class _Count(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            counter["batches"] += 1

    cb = gradwatch.GradWatchCallback(on_finding=record, verbose=0)
    t0 = time.perf_counter()
    run.fit([_Count(), cb])
    return _summary(scn, cb.report, opened, time.perf_counter() - t0)


def _keras_results(only: str | None) -> list[dict[str, Any]]:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--keras-json"]
    if only:
        cmd += ["--only", only]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"keras run failed with exit status {proc.returncode}")
    result: list[dict[str, Any]] = json.loads(lines[-1])
    return result


# --- table ----------------------------------------------------------------------------


def _verdict(r: dict[str, Any]) -> tuple[set[str], set[str], set[str]]:
    found = set(r["found"])
    expected = set() if r["expected"] == "healthy" else set(r["expected"])
    return found & expected, expected - found, found - expected


def _verdict_of(r: dict[str, Any], rule: str) -> str:
    return first_fix_verdict(r["framework"], r["name"], rule, r["top_fix"][rule])


def _mark(r: dict[str, Any], rule: str, hit: set[str]) -> str:
    if rule not in hit:
        return ""
    return {"right": " (ok)", "wrong": " (WRONG)"}.get(_verdict_of(r, rule), " (?)")


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | expected | found | missed | extra | first step | reported at "
        "| fix ranked first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        hit, missed, extra = _verdict(r)
        rules = sorted(r["found"], key=lambda k: (k not in hit, k))
        onset = f" (onset {r['onset']})" if r["onset"] else ""
        cells = [
            f"{r['framework']}:{r['name']}",
            "healthy" if r["expected"] == "healthy" else ", ".join(r["expected"]),
            ", ".join(rules) or "healthy",
            ", ".join(sorted(missed)) or "-",
            ", ".join(sorted(extra)) or "-",
            ", ".join(f"{r['first_step'][k]}" for k in rules) + onset if rules else "-",
            ", ".join(f"{r['reported_at'][k]}" for k in rules) or "-",
            ", ".join(f"{k}: {r['top_fix'][k]}{_mark(r, k, hit)}" for k in rules) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores(results: list[dict[str, Any]]) -> dict[str, Any]:
    pairs = hits = extras = findings_on_faulty = 0
    healthy = alarms = 0
    delays: list[int] = []
    late: list[str] = []
    verdicts: dict[str, list[str]] = {"right": [], "wrong": [], "no judgement": []}
    for r in results:
        hit, missed, extra = _verdict(r)
        if r["expected"] == "healthy":
            healthy += 1
            alarms += bool(r["found"])
            continue
        pairs += len(hit) + len(missed)
        hits += len(hit)
        extras += len(extra)
        findings_on_faulty += len(r["found"])
        for rule in sorted(hit):
            verdicts[_verdict_of(r, rule)].append(f"{r['framework']}:{r['name']}:{rule}")
            delays.append(r["first_step"][rule])
            if r["first_step"][rule] >= DETECT_WITHIN:
                late.append(f"{r['name']}:{rule}")
    return {
        "recall": hits / pairs if pairs else float("nan"),
        "hits": hits,
        "pairs": pairs,
        "precision": (findings_on_faulty - extras) / findings_on_faulty
        if findings_on_faulty
        else float("nan"),
        "extras": extras,
        "false_alarm_rate": alarms / healthy if healthy else float("nan"),
        "alarms": alarms,
        "healthy": healthy,
        "median_first_step": statistics.median(delays) if delays else float("nan"),
        "late": late,
        "right_first": len(verdicts["right"]),
        "judged_first": len(verdicts["right"]) + len(verdicts["wrong"]),
        "wrong_first": verdicts["wrong"],
        "no_judgement": verdicts["no judgement"],
    }


def _rate(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "n/a"


def summary_text(s: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"- recall: {s['recall']:.0%} ({s['hits']}/{s['pairs']} expected rule findings)",
            f"- false-alarm rate: {s['false_alarm_rate']:.0%} "
            f"({s['alarms']}/{s['healthy']} healthy scenarios with a warning or error)",
            f"- precision on faulty scenarios: {s['precision']:.0%} "
            f"({s['extras']} findings beyond the ground truth)",
            f"- median steps to detect (finding.first_step after onset): {s['median_first_step']}",
            f"- detected at or after step {DETECT_WITHIN}: {', '.join(s['late']) or 'none'}",
            f"- right fix first: {_rate(s['right_first'], s['judged_first'])} "
            f"({s['right_first']}/{s['judged_first']} detected expected findings; judge: {JUDGE})",
            f"- wrong first fix: {', '.join(s['wrong_first']) or 'none'}",
            f"- no judgement (no expert set): {len(s['no_judgement'])}"
            + (f" ({', '.join(s['no_judgement'])})" if s["no_judgement"] else ""),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("torch", "keras", "all"), default="all")
    parser.add_argument("--only", help="run only scenarios whose name contains this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keras-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.keras_json:
        from benchmarks.scenarios import keras_scenarios

        out = [
            run_keras(s, args.seed)
            for s in keras_scenarios()
            if not args.only or args.only in s.name
        ]
        print(json.dumps(out))
        return 0
    results: list[dict[str, Any]] = []
    if args.framework in ("torch", "all"):
        from benchmarks.scenarios import torch_scenarios

        for scn in torch_scenarios():
            if args.only and args.only not in scn.name:
                continue
            results.append(run_torch(scn, args.seed))
            print(f"ran {scn.name} in {results[-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
    if args.framework in ("keras", "all"):
        results += _keras_results(args.only)
    print(table(results))
    print()
    s = scores(results)
    print(summary_text(s))
    return 0 if s["recall"] == 1.0 and s["alarms"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

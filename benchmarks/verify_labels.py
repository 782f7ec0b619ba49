"""Check every scenario's ground-truth label with plain framework code, no gradwatch.

Run: ``python benchmarks/verify_labels.py [--framework torch|keras|all] [--only NAME]``.

Each scenario is trained exactly as ``benchmarks/detect.py`` trains it, but observed
only through ordinary framework hooks (PyTorch: an optimizer step pre-hook reading
``p.grad`` and forward hooks on activation modules; Keras: ``tf.GradientTape`` on the
very batch each step trains on and a sub-model returning the activation outputs). It
prints, per scenario, the measured evidence and the pathologies that evidence shows,
by these textbook definitions, each judged over the first 50 steps after the
pathology's onset:

* vanishing: the first trainable layer's gradient norm is below 1% of the last one's
  (median over steps), or its per-entry (RMS) gradient is below 1% of the last one's
  and it changed its weights (relative) less than 1% as much as the last layer; or,
  for a plain (ungated) RNN, the RMS of dL/dx at its first time step is below 1e-5 of
  the last one's (median over steps; ``torch_recurrent.measure_through_time``, leaf
  inputs and tensor hooks);
* exploding: the total gradient norm rises more than 100x above its value at the
  first step, or the first/last layer norm ratio exceeds 100;
* non-finite: any step with a NaN/Inf gradient, or optimizer steps skipped by AMP;
* dead ReLU: a hidden ReLU layer with more than half of its units zero for a whole
  batch (median over steps);
* saturation: a hidden sigmoid/tanh layer with more than half of its outputs where the
  derivative is under 1% of its peak (median over steps);
* zero gradient: the total gradient norm is exactly 0 at every judged step.

A label is verified when the set of pathologies measured equals the expected rule ids,
and, for ``healthy``, the loss also learns (last-10 mean below 80% of first-5 mean).
Exit status 1 if any label is not verified.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scenarios import Scenario  # noqa: E402

JUDGE_STEPS = 50


# --- shared judgement -----------------------------------------------------------------


def _median(values: list[float]) -> float:
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def _has_recurrent_layer(scn: Scenario) -> bool:
    import torch

    model = scn.build(0).model
    return any(isinstance(m, torch.nn.RNNBase) for m in model.modules())


def measure_through_time(scn: Scenario) -> dict[str, Any]:
    from benchmarks.scenarios.torch_recurrent import measure_through_time as measure

    return measure(scn)


def judge(m: dict[str, Any]) -> set[str]:
    """Pathologies the measured evidence ``m`` shows (definitions in the module doc)."""
    found: set[str] = set()
    vanish_norm = m["norm_ratio"] < 1e-2
    vanish_rms = m["rms_ratio"] < 1e-2 and m["update_ratio"] < 1e-2
    vanish_time = m.get("through_time_ratio", math.inf) < 1e-5
    if vanish_norm or vanish_rms or vanish_time:
        found.add("vanishing_gradient")
    if m["growth"] > 100 or m["norm_ratio"] > 100:
        found.add("exploding_gradient")
    if m["nonfinite_steps"] > 0 or m["skipped_steps"] > 0:
        found.add("nonfinite_gradient")
    if m["dead"] > 0.5:
        found.add("dead_relu")
    if m["tail"] > 0.5:
        found.add("saturation")
    if m["judged_steps"] > 0 and m["zero_total_steps"] == m["judged_steps"]:
        found.add("zero_gradient")
    return found


def learns(m: dict[str, Any]) -> bool:
    return bool(math.isfinite(m["loss_end"]) and m["loss_end"] < 0.8 * m["loss_start"])


def summarise(
    losses: list[float],
    norms: list[dict[str, float]],
    zero_fracs: list[dict[str, float]],
    numels: dict[str, int],
    totals: list[float],
    nonfinite: list[bool],
    skipped: int,
    acts: list[dict[str, tuple[float, float, bool, str]]],
    update: dict[str, float],
    onset: int,
) -> dict[str, Any]:
    """Evidence from per-step records: ``norms[i][group]`` the finite gradient norm of a
    layer group at step i, ``zero_fracs[i][group]`` its fraction of exactly-zero
    entries; ``acts[i][site] = (dead, tail, is_output, kind)``.

    Groups whose gradient is mostly exact zeros (median >= 70%) are dead units, not a
    shrinking gradient: they are left out of the first/last comparison."""
    lo, hi = onset, onset + JUDGE_STEPS
    groups = [g for g in numels if any(g in n for n in norms[lo:hi])]
    zero_med = {g: _median([z[g] for z in zero_fracs[lo:hi] if g in z]) for g in groups}
    dead_groups = [g for g in groups if zero_med[g] >= 0.7]
    groups = [g for g in groups if g not in dead_groups]
    first, last = (groups[0], groups[-1]) if len(groups) >= 2 else (None, None)
    ratios, rms_ratios = [], []
    for n in norms[lo:hi]:
        if first in n and last in n and n[last] > 0:
            ratios.append(n[first] / n[last])
            rms_ratios.append(
                (n[first] / math.sqrt(numels[first])) / (n[last] / math.sqrt(numels[last]))
            )
    finite_totals = [t for t in totals if math.isfinite(t)]
    base = (
        totals[onset]
        if len(totals) > onset and math.isfinite(totals[onset])
        else (finite_totals[0] if finite_totals else math.nan)
    )
    window_totals = [t for t in totals[lo:hi] if math.isfinite(t)]
    zero_total_steps = sum(t == 0.0 for t in window_totals)
    growth = max(window_totals) / base if window_totals and base > 0 else 1.0
    dead_by: dict[str, list[float]] = {}
    tail_by: dict[str, list[float]] = {}
    out_tail: list[float] = []
    for a in acts[lo:hi]:
        for site, (dead, tail, is_out, kind) in a.items():
            if is_out:
                out_tail.append(tail)
            elif kind == "relu":
                dead_by.setdefault(site, []).append(dead)
            elif kind in ("sigmoid", "tanh"):
                tail_by.setdefault(site, []).append(tail)
    dead_med = {s: _median(v) for s, v in dead_by.items()}
    tail_med = {s: _median(v) for s, v in tail_by.items()}
    head = [v for v in losses[:5] if math.isfinite(v)]
    tail_losses = losses[-10:]
    upd = (
        update.get(first, math.nan) / update[last]
        if first is not None and last is not None and update.get(last, 0) > 0
        else math.nan
    )
    return {
        "first_group": first,
        "dead_groups": len(dead_groups),
        "last_group": last,
        "norm_ratio": _median(ratios) if ratios else math.nan,
        "rms_ratio": _median(rms_ratios) if rms_ratios else math.nan,
        "update_ratio": upd,
        "growth": growth,
        "zero_total_steps": zero_total_steps,
        "judged_steps": len(window_totals),
        "nonfinite_steps": int(sum(nonfinite)),
        "skipped_steps": skipped,
        "dead": max(dead_med.values(), default=0.0),
        "dead_layers": sum(v > 0.5 for v in dead_med.values()),
        "relu_layers": len(dead_med),
        "tail": max(tail_med.values(), default=0.0),
        "output_tail": _median(out_tail) if out_tail else math.nan,
        "loss_start": sum(head) / len(head) if head else math.nan,
        "loss_end": (
            sum(tail_losses) / len(tail_losses)
            if all(math.isfinite(v) for v in tail_losses)
            else math.nan
        ),
    }


# --- torch ----------------------------------------------------------------------------


def measure_torch(scn: Scenario, seed: int = 0, steps: int | None = None) -> dict[str, Any]:
    import torch
    from torch import nn

    run = scn.build(seed)
    model, opt = run.model, run.optimizer
    names = [(n, p) for n, p in model.named_parameters()]
    numels: dict[str, int] = {}
    for n, p in names:
        if p.requires_grad:
            g = n.rsplit(".", 1)[0]
            numels[g] = numels.get(g, 0) + p.numel()
    norms: list[dict[str, float]] = []
    zero_fracs: list[dict[str, float]] = []
    totals: list[float] = []
    nonfinite: list[bool] = []
    acts: list[dict[str, tuple[float, float, bool, str]]] = []
    current: dict[str, tuple[float, float, bool, str]] = {}
    pending: list[tuple[str, torch.Tensor, str]] = []
    calls: dict[str, int] = {}
    stepped = [False]

    def pre_hook(*_: Any) -> None:
        stepped[0] = True
        sq: dict[str, float] = {}
        zeros: dict[str, float] = {}
        bad = False
        with torch.no_grad():
            for n, p in names:
                if p.grad is None:
                    continue
                g = p.grad.detach().double()
                fin = torch.isfinite(g)
                bad = bad or not bool(fin.all())
                grp = n.rsplit(".", 1)[0]
                sq[grp] = sq.get(grp, 0.0) + float((g[fin] ** 2).sum())
                zeros[grp] = zeros.get(grp, 0.0) + float((g == 0).sum())
        norms.append({k: math.sqrt(v) for k, v in sq.items()})
        zero_fracs.append({k: v / numels[k] for k, v in zeros.items()})
        totals.append(math.sqrt(sum(sq.values())) if not bad else math.nan)
        nonfinite.append(bad)

    handles = [opt.register_step_pre_hook(pre_hook)]

    def act_hook(name: str, kind: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            k = calls.get(name, 0)
            calls[name] = k + 1
            pending.append((f"{name}#{k}" if k else name, out, kind))

        return hook

    kinds = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
    for name, module in model.named_modules():
        kind = kinds.get(type(module))
        if kind:
            handles.append(module.register_forward_hook(act_hook(name, kind)))

    def model_hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        with torch.no_grad():
            for site, y, kind in pending:
                y = y.detach().float()
                axis = 1 if y.dim() >= 4 else y.dim() - 1
                if kind == "relu":
                    dims = tuple(d for d in range(y.dim()) if d != axis)
                    dead = float((y.amax(dim=dims) <= 0).float().mean())
                    tail = 0.0
                else:
                    deriv = (y * (1 - y) / 0.25) if kind == "sigmoid" else (1 - y * y)
                    dead, tail = 0.0, float((deriv < 0.01).float().mean())
                current[site] = (dead, tail, y.data_ptr() == out.data_ptr(), kind)
        pending.clear()
        calls.clear()

    handles.append(model.register_forward_hook(model_hook))
    before = {n: p.detach().clone() for n, p in names if p.requires_grad}
    losses: list[float] = []
    skipped = 0
    for i in range(steps or scn.steps):
        stepped[0] = False
        losses.append(run.step(i))
        if not stepped[0]:
            skipped += 1
            norms.append({})
            zero_fracs.append({})
            totals.append(math.nan)
            nonfinite.append(False)
        acts.append(dict(current))
        current.clear()
    for h in handles:
        h.remove()
    update_sq: dict[str, float] = {}
    weight_sq: dict[str, float] = {}
    for n, p in names:
        if n in before:
            grp = n.rsplit(".", 1)[0]
            d = (p.detach() - before[n]).double()
            update_sq[grp] = update_sq.get(grp, 0.0) + float(torch.nan_to_num(d).pow(2).sum())
            weight_sq[grp] = weight_sq.get(grp, 0.0) + float(before[n].double().pow(2).sum())
    update = {g: math.sqrt(update_sq[g]) / max(math.sqrt(weight_sq[g]), 1e-12) for g in update_sq}
    return summarise(
        losses, norms, zero_fracs, numels, totals, nonfinite, skipped, acts, update, scn.onset
    )


# --- report ---------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}"
    return str(v)


HEADER = (
    "| scenario | expected | measured | verified | first/last norm | first/last RMS "
    "| first/last update | growth | NaN steps | skipped | max dead | max tail "
    "| output tail | zero steps | loss start -> end |"
)


def row(scn: Scenario, m: dict[str, Any]) -> tuple[str, bool]:
    found = judge(m)
    expected = scn.expected_rules
    ok = found == set(expected) and (not scn.healthy or learns(m))
    label = "healthy" if scn.healthy else ", ".join(sorted(expected))
    measured = ", ".join(sorted(found)) or ("healthy" if learns(m) else "not learning")
    cells = [
        scn.name,
        label,
        measured,
        "yes" if ok else "**NO**",
        _fmt(m["norm_ratio"]),
        _fmt(m["rms_ratio"]),
        _fmt(m["update_ratio"]),
        _fmt(m["growth"]),
        _fmt(m["nonfinite_steps"]),
        _fmt(m["skipped_steps"]),
        _fmt(m["dead"]),
        _fmt(m["tail"]),
        _fmt(m["output_tail"]),
        f"{m['zero_total_steps']}/{m['judged_steps']}",
        f"{_fmt(m['loss_start'])} -> {_fmt(m['loss_end'])}",
    ]
    return "| " + " | ".join(cells) + " |", ok


def _keras_measurements(only: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Run the Keras measurements in a subprocess with KERAS_BACKEND=tensorflow."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--keras-json"]
    if only:
        cmd += ["--only", only]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"keras measurement failed with exit status {proc.returncode}")
    out = proc.stdout
    line = [ln for ln in out.splitlines() if ln.startswith("[")][-1]
    return [(name, m) for name, m in json.loads(line)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("torch", "keras", "all"), default="all")
    parser.add_argument("--only", help="run only scenarios whose name contains this")
    parser.add_argument("--keras-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.keras_json:
        from benchmarks.scenarios import keras_scenarios
        from benchmarks.scenarios.keras_late import measure_late
        from benchmarks.scenarios.keras_zoo import measure_keras

        # A late onset is measured over all of its run's steps (measure_keras: the first 120).
        results = [
            (s.name, measure_late(s) if s.onset else measure_keras(s))
            for s in keras_scenarios()
            if not args.only or args.only in s.name
        ]
        print(json.dumps(results))
        return 0
    rows: list[tuple[Scenario, dict[str, Any]]] = []
    if args.framework in ("torch", "all"):
        from benchmarks.scenarios import torch_scenarios

        for scn in torch_scenarios():
            if args.only and args.only not in scn.name:
                continue
            m = measure_torch(scn)
            if _has_recurrent_layer(scn):
                m["through_time_ratio"] = measure_through_time(scn)["plain_ratio"]
            rows.append((scn, m))
            print(f"measured {scn.name}", file=sys.stderr, flush=True)
    if args.framework in ("keras", "all"):
        from benchmarks.scenarios import keras_scenarios

        # The Keras registry is imported in this process only to read labels.
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        by_name = {s.name: s for s in keras_scenarios()}
        for name, m in _keras_measurements(args.only):
            rows.append((by_name[name], m))
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    bad = []
    for scn, m in rows:
        text, ok = row(scn, m)
        print(text)
        if not ok:
            bad.append(scn.name)
    print()
    print(f"{len(rows) - len(bad)}/{len(rows)} labels verified" + (f"; NOT: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

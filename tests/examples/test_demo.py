"""`gradwatch demo` end to end in a fast mode: real training, real numbers."""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from rich.console import Console

from gradwatch.demo import NetSpec, next_spec, run_demo
from gradwatch.report import Report


def test_demo_diagnoses_vanishing_then_the_fix_trains_better(tmp_path):
    out = io.StringIO()
    path = tmp_path / "demo.json"
    code = run_demo(steps=200, json_path=path, console=Console(file=out, width=100))
    assert code == 0
    result = json.loads(path.read_text())
    before = Report.from_dict(result["before"]["report"])
    after = Report.from_dict(result["after"]["report"])
    assert before.by_rule("vanishing_gradient") is not None
    assert result["fix_applied"] == "leaky_relu"
    assert after.healthy
    assert result["after"]["test_accuracy"] > result["before"]["test_accuracy"] + 0.2
    text = out.getvalue()
    assert "4. Before and after" in text and "test accuracy" in text


def test_next_spec_applies_the_top_ranked_applicable_fix():
    from gradwatch import Finding, Fix

    finding = Finding(
        "vanishing_gradient",
        "warning",
        ("fc0",),
        0,
        9,
        "m",
        {},
        (Fix("residual", "r"), Fix("he_init", "h")),
    )
    spec, fix_id, _ = next_spec(NetSpec(), Report(findings=(finding,)))
    assert fix_id == "residual" and spec.residual and spec.activation == "sigmoid"
    same, none_id, _ = next_spec(NetSpec(), Report())
    assert none_id is None and same == NetSpec()

"""The Keras example runs in its fast mode and shows the vanishing gradient it promises.

Runs in the keras tox environments (tests/examples/ as a whole runs in the torch one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "keras_callback.py"


def test_keras_example_reports_vanishing():
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "100"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vanishing_gradient" in out.stdout


def test_keras_demo_diagnoses_vanishing_then_the_fix_trains_better(tmp_path):
    import keras

    if keras.backend.backend() != "tensorflow":
        # Known gap: with the torch backend's random stream the N(0, 1) sigmoid net's
        # gradient decay is milder and stays under the vanishing thresholds at seed 0.
        pytest.skip("demo diagnosis checked on the TensorFlow backend")
    import io
    import json

    from rich.console import Console

    from gradwatch.demo import run_demo
    from gradwatch.report import Report

    path = tmp_path / "demo.json"
    code = run_demo(
        framework="keras", steps=200, json_path=path, console=Console(file=io.StringIO())
    )
    assert code == 0
    result = json.loads(path.read_text())
    assert Report.from_dict(result["before"]["report"]).by_rule("vanishing_gradient")
    assert Report.from_dict(result["after"]["report"]).healthy
    assert result["after"]["test_accuracy"] > result["before"]["test_accuracy"] + 0.2

"""Every PyTorch/numpy example runs in its fast mode and reaches its stated outcome.

Each example exits 0 only when it shows what its docstring promises (a healthy run,
a diagnosed vanishing gradient, a run recovered by the suggested clipping).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str, steps: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--steps", str(steps)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_numpy_core_example_diagnoses_vanishing():
    out = _run("numpy_or_jax_core.py", 60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vanishing_gradient" in out.stdout


@pytest.mark.parametrize(
    ("name", "steps", "expected"),
    [
        ("pytorch_drop_in.py", 80, "gradients look healthy"),
        ("pytorch_amp_accumulation.py", 40, "largest gradient norm gradwatch saw"),
        ("fix_exploding_with_clipping.py", 80, "clipped at"),
    ],
)
def test_torch_examples(name, steps, expected):
    pytest.importorskip("torch")
    out = _run(name, steps)
    assert out.returncode == 0, out.stdout + out.stderr
    assert expected in out.stdout

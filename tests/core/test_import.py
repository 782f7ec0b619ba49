"""`import gradwatch` stays light: no framework, no rich, no matplotlib."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gradwatch


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return set(out.stdout.split())


def test_import_gradwatch_imports_no_framework_and_no_rich():
    loaded = _modules_after("import gradwatch")
    heavy = {"torch", "tensorflow", "keras", "jax", "matplotlib", "rich", "sklearn"}
    assert not heavy & loaded


def test_analyzing_imports_no_framework():
    code = (
        "import numpy as np, gradwatch\n"
        "an = gradwatch.Analyzer()\n"
        "an.observe(0, grads={'fc.weight': np.ones((2, 2))})\n"
        "an.report()"
    )
    assert not {"torch", "tensorflow", "keras"} & _modules_after(code)


def test_public_names_are_exported():
    for name in ("Analyzer", "Report", "Finding", "Fix", "StepStats", "DEFAULT_RULES"):
        assert name in gradwatch.__all__ and hasattr(gradwatch, name)
    assert set(gradwatch.RULE_IDS) == {
        "vanishing_gradient",
        "exploding_gradient",
        "nonfinite_gradient",
        "dead_relu",
        "saturation",
        "zero_gradient",
    }


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        gradwatch.no_such_thing  # noqa: B018

"""Both trainer callbacks check their arguments where they are written, naming the bad one;
``import gradwatch`` imports no framework, and the callbacks are re-exported lazily."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import gradwatch

CALLBACKS = ["LightningCallback", "HFTrainerCallback"]

BAD_ARGUMENTS = [
    ("on_finding", "loud"),
    ("on_finding", 3),
    ("rules", ["no_such_rule"]),
    ("rules", [object()]),
    ("strict", "yes"),
    ("activations", 1),
    ("verbose", "false"),
    ("grad_schedule", 5),
    ("activation_schedule", lambda: True),
    ("norm_schedule", lambda step: "often"),
    ("flush_every", 0),
    ("flush_every", True),
]


@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS)
def test_bad_argument_raises_value_error_naming_it(callback: str, name: str, value: Any) -> None:
    cls = getattr(gradwatch, callback)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cls(**{name: value})


@pytest.mark.parametrize("callback", CALLBACKS)
def test_good_arguments_are_accepted(callback: str) -> None:
    cls = getattr(gradwatch, callback)
    cb = cls(
        on_finding=lambda finding: None,
        rules=["dead_relu", "nonfinite_gradient"],
        strict=True,
        activations=False,
        grad_schedule=gradwatch.every(2),
        flush_every=1,
        verbose=False,
    )
    assert cb.report is None and cb.watch is None


def test_import_gradwatch_imports_no_framework() -> None:
    code = (
        "import sys, gradwatch\n"
        "heavy = {'torch', 'lightning', 'transformers', 'accelerate'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_callbacks_are_re_exported_lazily() -> None:
    from gradwatch.adapters.lightning import LightningCallback
    from gradwatch.adapters.transformers import HFTrainerCallback

    assert {"LightningCallback", "HFTrainerCallback"} <= set(gradwatch.__all__)
    assert gradwatch.LightningCallback is LightningCallback
    assert gradwatch.HFTrainerCallback is HFTrainerCallback

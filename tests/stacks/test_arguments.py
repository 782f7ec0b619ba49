"""Both trainer callbacks check their arguments where they are written, naming the bad one;
``import gradwatch`` imports no framework, and the callbacks are re-exported lazily."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path
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
    ("log_to_trainer", "no"),
    ("log_to", ""),
    ("log_to", []),
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
        log_to=lambda step, scalars: None,
        log_to_trainer=False,
    )
    assert cb.report is None and cb.watch is None


@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize("target", [42, object(), print.__class__])
def test_log_to_of_no_known_kind_is_a_type_error_naming_it(callback: str, target: Any) -> None:
    with pytest.raises(TypeError, match=r"\blog_to\b"):
        getattr(gradwatch, callback)(log_to=target)


@pytest.mark.parametrize("callback", CALLBACKS)
def test_log_to_a_file_is_a_value_error_and_a_directory_opens_nothing(
    callback: str, tmp_path: Path
) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\blog_to\b"):
        getattr(gradwatch, callback)(log_to=tmp_path / "file.txt")
    runs = tmp_path / "runs"
    try:
        getattr(gradwatch, callback)(log_to=runs)
    except ValueError as exc:  # no TensorBoard writer in this env: said at construction
        assert "log_to" in str(exc)
    assert not runs.exists()  # the writer is created at the first write, in a fit


@pytest.mark.parametrize("callback", CALLBACKS)
def test_docstring_states_every_argument_and_its_default(callback: str) -> None:
    cls = getattr(gradwatch, callback)
    doc = cls.__doc__
    assert "{options}" not in doc
    for name in inspect.signature(cls).parameters:
        entry = re.search(rf"^        {name}: (.*?)(?=^        \w+: |^    \w|\Z)", doc, re.M | re.S)
        assert entry is not None, name
        assert "Defaults to" in " ".join(entry.group(1).split()), name


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

"""The scenario zoo: small broken and healthy training runs with known ground truth.

Each :class:`Scenario` builds a fresh model, optimizer and one-step training function
(``build(seed)``), so the same run can be trained under gradwatch
(``benchmarks/detect.py``) or under plain framework instrumentation
(``benchmarks/verify_labels.py``). ``expected`` is the set of rule ids the run must
trigger, or ``"healthy"``; every label was chosen by measurement (see
``verify_labels.py`` and ``docs/benchmarks.md``).

Importing this package imports no framework: ``torch_scenarios()`` and
``keras_scenarios()`` import their framework when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

HEALTHY: Literal["healthy"] = "healthy"


@dataclass(frozen=True)
class Scenario:
    """One training run of the zoo.

    Attributes:
        name: unique id, ``<pathology>_<cause>`` or ``healthy_<trap>``.
        framework: ``"torch"`` or ``"keras"``.
        expected: rule ids the run must trigger, or ``"healthy"`` (no warning/error).
        build: ``build(seed)`` returns a fresh run (see ``torch_zoo.TorchRun`` and
            ``keras_zoo.KerasRun``).
        steps: optimizer steps of the run.
        onset: optimizer step at which the pathology starts (0 = from the start).
        cause: one line: what is broken, or what trap a healthy run sets.
        fast: part of the fast test subset (``tests/*/test_zoo.py``).
    """

    name: str
    framework: str
    expected: frozenset[str] | Literal["healthy"]
    build: Callable[[int], Any]
    steps: int
    cause: str
    onset: int = 0
    fast: bool = True

    @property
    def healthy(self) -> bool:
        return self.expected == HEALTHY

    @property
    def expected_rules(self) -> frozenset[str]:
        return frozenset() if self.expected == HEALTHY else frozenset(self.expected)


# The modules holding scenarios, per framework; each defines ``SCENARIOS``.
TORCH_MODULES: tuple[str, ...] = ("torch_zoo", "torch_causes", "torch_recurrent")
KERAS_MODULES: tuple[str, ...] = ("keras_zoo", "keras_late", "keras_causes", "keras_recurrent")


def _load(modules: tuple[str, ...]) -> list[Scenario]:
    import importlib

    found: list[Scenario] = []
    for module in modules:
        found += importlib.import_module(f"benchmarks.scenarios.{module}").SCENARIOS
    names = [s.name for s in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"scenario names defined twice: {duplicates}")
    return found


def torch_scenarios() -> list[Scenario]:
    """The PyTorch scenarios (imports torch)."""
    return _load(TORCH_MODULES)


def keras_scenarios() -> list[Scenario]:
    """The Keras 3 scenarios (imports keras; set ``KERAS_BACKEND`` first)."""
    return _load(KERAS_MODULES)


__all__ = ["HEALTHY", "Scenario", "keras_scenarios", "torch_scenarios"]

"""gradwatch: is your network's gradient flow healthy, and if not, what should you change?

Drop it into a PyTorch loop::

    gw = gradwatch.watch(model, optimizer)

or a Keras ``fit``::

    model.fit(x, y, callbacks=[gradwatch.GradWatchCallback()])

or feed the framework-free :class:`Analyzer` yourself. ``import gradwatch`` imports
neither torch nor tensorflow: the adapters load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwatch.analyzer import Analyzer, module_of
from gradwatch.findings import Finding
from gradwatch.fixes import Fix
from gradwatch.guard import FindingError, GradwatchWarning
from gradwatch.report import LayerSummary, Report
from gradwatch.rules import DEFAULT_RULES, RULE_IDS
from gradwatch.schedules import every
from gradwatch.stats import StepStats

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch.adapters.keras import GradWatchCallback
    from gradwatch.adapters.lightning import LightningCallback
    from gradwatch.adapters.torch import watch
    from gradwatch.adapters.transformers import HFTrainerCallback

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RULES",
    "RULE_IDS",
    "Analyzer",
    "Finding",
    "FindingError",
    "Fix",
    "GradWatchCallback",
    "GradwatchWarning",
    "HFTrainerCallback",
    "LayerSummary",
    "LightningCallback",
    "Report",
    "StepStats",
    "__version__",
    "every",
    "module_of",
    "watch",
]


def __getattr__(name: str) -> Any:
    # Lazy re-exports so that `import gradwatch` never imports a framework.
    if name == "watch":
        from gradwatch.adapters.torch import watch

        return watch
    if name == "GradWatchCallback":
        from gradwatch.adapters.keras import GradWatchCallback

        return GradWatchCallback
    if name == "LightningCallback":
        from gradwatch.adapters.lightning import LightningCallback

        return LightningCallback
    if name == "HFTrainerCallback":
        from gradwatch.adapters.transformers import HFTrainerCallback

        return HFTrainerCallback
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")

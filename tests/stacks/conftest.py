"""Trainer-callback tests (Lightning, Hugging Face Trainer): tiny models built from
configs with random weights, generated data, CPU, one intra-op thread (2 shared cores)."""

from __future__ import annotations

import copy
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence

# Nothing here may reach a model hub: every model is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

torch = pytest.importorskip("torch")

from gradwatch.analyzer import Analyzer  # noqa: E402
from gradwatch.guard import GradwatchWarning  # noqa: E402
from gradwatch.stats import StepStats  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class AnalyzerSpy:
    """Every StepStats any Analyzer receives, in order: what the watch computed."""

    def __init__(self) -> None:
        self.stats: list[StepStats] = []

    def per_layer(self) -> dict[int, dict[str, float]]:
        """step -> {layer: gradient norm}, for the steps sampled per layer."""
        return {
            s.step: dict(zip(s.grad_layers, s.grad_norm, strict=True))
            for s in self.stats
            if s.grad_layers
        }


@pytest.fixture
def analyzer_spy(monkeypatch: pytest.MonkeyPatch) -> AnalyzerSpy:
    spy = AnalyzerSpy()
    original = Analyzer.observe_stats

    def observe_stats(self: Analyzer, stats: StepStats | Sequence[StepStats]) -> None:
        spy.stats.extend([stats] if isinstance(stats, StepStats) else stats)
        original(self, stats)

    monkeypatch.setattr(Analyzer, "observe_stats", observe_stats)
    return spy


def assert_hooks_removed(model: torch.nn.Module) -> None:
    """No gradwatch hook is left on the model: it pickles and deep-copies."""
    for name, p in model.named_parameters():
        assert not p._backward_hooks, f"{name} keeps a gradient hook"
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"{name!r} keeps a hook"
    pickle.loads(pickle.dumps(model))
    copy.deepcopy(model)


@pytest.fixture
def no_gradwatch_warning() -> Iterator[None]:
    """The test emits no GradwatchWarning: no internal error, no misplaced advice."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    texts = [str(w.message) for w in caught if issubclass(w.category, GradwatchWarning)]
    assert not texts, texts

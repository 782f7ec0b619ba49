"""Torch adapter tests: one intra-op thread (the CI boxes have 2 shared cores, and
oversubscribed threads made a 60-step MLP run 10x slower)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)

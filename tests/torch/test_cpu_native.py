"""The optional one-pass C kernels: their build, their fallback, and their edge cases
(test_reference.py runs every reference comparison on both paths)."""

from __future__ import annotations

import math
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch import native as cpu_native  # noqa: E402
from gradwatch.adapters.torch.reductions import grad_stats_on_device  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import mlp  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.reduce import grad_stats_from_array  # noqa: E402

HAS_COMPILER = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture
def kernels() -> cpu_native.CpuKernels:
    built = cpu_native.wait_for_kernels()
    if built is None:
        pytest.skip(f"the C kernels cannot be built here: {cpu_native.build_failure()}")
    return built


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache directory and a forgotten build, restored afterwards."""
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(cpu_native.NATIVE_ENV, raising=False)  # also under GRADWATCH_NATIVE=0
    cpu_native.forget_build()
    yield tmp_path
    cpu_native.forget_build()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_kernels_build_where_there_is_a_compiler_and_are_cached(fresh_build: Path) -> None:
    assert cpu_native.wait_for_kernels() is not None, cpu_native.build_failure()
    built = sorted(fresh_build.iterdir())  # the library and its manifest, no temp file
    assert sorted(p.suffix for p in built) == [".json", ".so"]
    mtimes = [p.stat().st_mtime_ns for p in built]
    cpu_native.forget_build()
    assert cpu_native.wait_for_kernels() is not None
    assert [p.stat().st_mtime_ns for p in sorted(fresh_build.iterdir())] == mtimes


def test_switched_off_by_environment(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")
    assert cpu_native.cpu_kernels() is None
    assert cpu_native.build_failure() == "GRADWATCH_NATIVE=0"
    assert cpu_native.build_status() == "unavailable"
    assert not list(fresh_build.iterdir())


@pytest.mark.skipif(os.name != "posix", reason="a shell-script compiler")
def test_a_failing_compiler_falls_back_and_says_why(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fresh_build / "broken-cc"
    fake.write_text("#!/bin/sh\necho 'broken-cc: internal error' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    assert cpu_native.wait_for_kernels() is None
    assert "broken-cc: internal error" in (cpu_native.build_failure() or "")
    # no half-written library, manifest or temporary file left
    assert [p.name for p in fresh_build.iterdir()] == ["broken-cc"]


def test_watch_notes_the_fallback_and_still_reports(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")
    model = mlp(nn.ReLU, depth=3, width=16, inp=16)
    gw = gradwatch.watch(model, on_finding="ignore", show=False)
    for _ in range(3):
        model(torch.randn(8, 16)).square().mean().backward()
    report = gw.report(show=False)
    gw.close()
    assert any("C kernels" in note for note in report.notes)
    assert report.steps_observed == 3 and report.layers


def test_grad_stats_exact_nonfinite_counts_and_max(kernels: cpu_native.CpuKernels) -> None:
    g = torch.randn(70_001)
    g[[5, 70_000]] = math.inf
    g[17] = -math.inf
    out = kernels.grad_stats([g, torch.tensor([1.0, math.nan, -math.inf, 0.0])]).numpy()
    assert out[4].tolist() == [3.0, 2.0]
    assert math.isinf(out[1, 0]) and math.isnan(out[1, 1])  # NaN wins over Inf
    assert out[3, 1] == 3.0  # NaN and Inf are non-zero


def test_grad_stats_of_a_large_tensor_match_float64(kernels: cpu_native.CpuKernels) -> None:
    g = torch.randn(3_000_017) * 1e-3
    g[::7] = 0.0
    out = kernels.grad_stats([g]).double().numpy()[:, 0]
    norm, max_abs, mean_abs, _, nonfinite, _ = grad_stats_from_array(g.double().numpy())
    assert out[0] == pytest.approx(norm, rel=1e-6)
    assert kernels.sum_squares([g]).item() == pytest.approx(norm**2, rel=1e-6)
    assert out[1] == max_abs
    assert out[2] == pytest.approx(mean_abs * g.numel(), rel=1e-6)
    assert out[3] == g.numel() - int((g == 0).sum())
    assert out[4] == nonfinite == 0


def test_every_tail_length_is_covered(kernels: cpu_native.CpuKernels) -> None:
    """Lengths around the 16-lane and 4096-entry blocks, so no remainder is dropped."""
    for n in (1, 15, 16, 17, 4095, 4096, 4097, 8209):
        g = torch.ones(n)
        g[-1] = 3.0  # the last entry: in the remainder loop whenever there is one
        out = kernels.grad_stats([g]).double().numpy()[:, 0]
        assert out[0] == pytest.approx(math.sqrt(n + 8), rel=1e-7), n
        assert out.tolist()[1:5] == [3.0, n + 2, n, 0], n
        assert kernels.sum_squares([g]).tolist() == [n + 8], n


def test_per_unit_counts_in_every_layout(kernels: cpu_native.CpuKernels) -> None:
    y = torch.relu(torch.randn(6, 5, 4, 3))
    y[0, 1, 0, 0] = math.nan
    y[1, 2, 0, 0] = -0.0
    for axis in (0, 1, 3, -1):
        expected = (~(y <= 0)).sum(dim=[d for d in range(4) if d != axis % 4]).float()
        assert torch.equal(kernels.active_per_unit(y, axis), expected), axis
    flat = torch.tensor([0.0, 2.0, math.nan])
    assert kernels.active_per_unit(flat, -1).tolist() == [0.0, 1.0, 1.0]


def test_tail_counts_include_the_bound_and_skip_nan(kernels: cpu_native.CpuKernels) -> None:
    y = torch.tensor([-1.0, -0.999, 0.0, 1.0, math.nan, 2.0])
    assert kernels.count_in_tails(y, (-1.0, 1.0)).item() == 3.0  # -1, 1 and 2
    assert kernels.count_in_tails(y, (-math.inf, 1.0)).item() == 2.0  # 1 and 2
    assert kernels.count_active(y).item() == 3.0  # 1, NaN and 2


def test_nonfinite_counts_every_nan_and_inf_and_no_large_finite(
    kernels: cpu_native.CpuKernels,
) -> None:
    # Across BLOCK (4096) boundaries; a NaN with its sign bit set, the largest finite
    # float and a subnormal are compared by their bits.
    y = torch.randn(3 * 4096 + 7)
    y[[0, 4095, 4096, -1]] = torch.tensor([math.inf, -math.inf, math.nan, -math.nan])
    y[1], y[2] = torch.finfo(torch.float32).max, 1e-45
    expected = int((~torch.isfinite(y)).sum())
    assert kernels.count_nonfinite(y).item() == expected == 4


def test_ineligible_tensors_take_the_torch_ops() -> None:
    base = torch.randn(64, 64)
    assert cpu_native.eligible(base)
    assert not cpu_native.eligible(base.t())
    assert not cpu_native.eligible(base.double())
    assert not cpu_native.eligible(base.to_sparse())
    assert cpu_native.eligible(torch.nn.Parameter(base))

    class Wrapped(torch.Tensor):  # e.g. DTensor: its data pointer is not its data
        pass

    assert not cpu_native.eligible(base.as_subclass(Wrapped))
    # all_eligible: the same test of every tensor of a list, in C-level passes
    assert cpu_native.all_eligible([base, torch.nn.Parameter(base)])
    for odd in (base.t(), base.double(), base.to_sparse(), base.as_subclass(Wrapped)):
        assert not cpu_native.all_eligible([base, odd])
    assert not cpu_native.all_eligible([])
    transposed = base.t()
    got = grad_stats_on_device([transposed, base]).double().numpy()
    np.testing.assert_allclose(got[:, 0], got[:, 1], rtol=1e-5)

"""Gradient statistics at the edges of floating point, against naive references, on
both reduction paths (the C kernels and the torch ops): complex gradients keep their
imaginary part, float64 of any size is reduced, norms of 1e200 and of subnormals are
right, float16 and bfloat16 accumulate in float32 (issue #15)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch import grad_reductions, reductions, scratch  # noqa: E402
from gradwatch.adapters.torch.native import wait_for_kernels  # noqa: E402
from gradwatch.adapters.torch.reductions import (  # noqa: E402
    SMALL_GRAD_NUMEL,
    grad_stats_on_device,
    norms_on_device,
    squared_norms_on_device,
)
from torch import nn  # noqa: E402
from torch_helpers import EVERY_STEP, record_stats  # noqa: E402

import gradwatch  # noqa: E402

BIG = SMALL_GRAD_NUMEL + 5  # reduced one at a time, not in the flat pass


@pytest.fixture(autouse=True, params=["c_kernels", "torch_ops"])
def reduction_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch_ops":
        monkeypatch.setattr(reductions, "cpu_kernels", lambda: None)
        monkeypatch.setattr(grad_reductions, "cpu_kernels", lambda: None)
    elif wait_for_kernels() is None:
        pytest.skip("the C kernels cannot be built here")
    return str(request.param)


def _reference(g: torch.Tensor) -> tuple[float, float, float, int]:
    """``(norm, max |g|, sum |g|, non-zero)`` in Python floats: ``math.hypot`` scales,
    so it neither overflows nor underflows."""
    values = g.detach().reshape(-1).cpu()
    if values.is_complex():
        values = values.abs()
    a = [abs(float(v)) for v in values.double().tolist()]
    return math.hypot(*a), max(a), math.fsum(a), sum(v != 0.0 for v in a)


def _check(out: np.ndarray, g: torch.Tensor, rel: float) -> None:
    norm, max_abs, sum_abs, nonzero = _reference(g)
    assert out[0] == pytest.approx(norm, rel=rel), "norm"
    assert out[1] == pytest.approx(max_abs, rel=rel), "max |g|"
    assert out[2] == pytest.approx(sum_abs, rel=rel), "sum |g|"
    assert out[3] == nonzero, "non-zero entries"
    assert out[4] == 0, "non-finite entries"


# (dtype, entry scale, relative tolerance): a relative tolerance at the dtype's precision.
_CASES = [
    (torch.float64, 1e200, 1e-12),
    (torch.float64, 1e-310, 1e-9),  # subnormal: fewer significant bits
    (torch.float64, 1.0, 1e-12),
    (torch.float32, 1e30, 1e-5),
    (torch.float32, 1e-40, 1e-3),  # subnormal float32: ~17 significant bits
    (torch.float32, 1e-25, 1e-5),
    (torch.float16, 1e3, 2e-3),
    (torch.float16, 1e-6, 2e-2),  # float16 subnormals
    (torch.bfloat16, 1e30, 2e-2),
    (torch.bfloat16, 1e-30, 2e-2),
    (torch.complex64, 1e20, 1e-5),
    (torch.complex128, 1e200, 1e-12),
]


@pytest.mark.parametrize("layout", ["flat", "one_at_a_time", "sliced"])
@pytest.mark.parametrize(("dtype", "scale", "rel"), _CASES, ids=lambda v: str(v))
def test_norms_at_the_edges_of_each_dtype_match_a_scaled_reference(
    dtype: torch.dtype, scale: float, rel: float, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(0)
    if layout == "sliced":  # a large tensor reduced in slices of 4096 entries
        monkeypatch.setattr(scratch, "CHUNK_NUMEL", 4096)
    sizes = (7, 30, 3, 64) if layout == "flat" else (BIG, 40)
    real = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    grads = []
    for n in sizes:
        g = torch.randn(n, generator=gen, dtype=real)
        if dtype.is_complex:
            g = torch.complex(g, torch.randn(n, generator=gen, dtype=real))
        g = (g * scale).to(dtype)
        g[1] = 0.0
        grads.append(g.reshape(-1, 1) if layout == "sliced" else g)
    out = grad_stats_on_device(grads).double().numpy()
    for j, g in enumerate(grads):
        _check(out[:, j], g, rel)


def test_the_norm_of_a_complex_gradient_keeps_its_imaginary_part() -> None:
    for dtype in (torch.complex64, torch.complex128):
        g = torch.tensor([3 + 4j, 0], dtype=dtype)
        out = grad_stats_on_device([g, g * 2, g, g]).double().numpy()  # the flat pass
        assert out[:4, 0].tolist() == [5.0, 5.0, 5.0, 1.0]
        out = grad_stats_on_device([g]).double().numpy()  # one at a time
        assert out[:4, 0].tolist() == [5.0, 5.0, 5.0, 1.0]
        assert norms_on_device([g]).tolist() == [5.0]


def test_float64_gradients_of_any_size_are_reduced_in_float64() -> None:
    g = torch.full((BIG,), 1e200, dtype=torch.float64)
    out = grad_stats_on_device([g], [g])
    assert out.dtype == torch.float64
    assert out[0, 0].item() == pytest.approx(1e200 * math.sqrt(BIG), rel=1e-12)
    assert out[5, 0].item() == pytest.approx(1e200 * math.sqrt(BIG), rel=1e-12)  # weights
    assert out[4, 0].item() == 0


def test_weight_and_total_norms_of_float32_do_not_overflow_or_underflow() -> None:
    big, small = torch.full((100,), 1e20), torch.full((100,), 1e-20)
    squares = squared_norms_on_device([big, small])
    assert squares.dtype == torch.float64  # accumulated in double on both paths
    assert squares.tolist() == pytest.approx([1e42, 1e-38], rel=1e-6)
    assert norms_on_device([big, small]).tolist() == pytest.approx([1e21, 1e-19], rel=1e-6)


def test_nonfinite_entries_still_make_the_norm_nonfinite() -> None:
    for g in (torch.tensor([1e200, math.inf], dtype=torch.float64), torch.tensor([1.0, math.nan])):
        for grads in ([g], [g] * 4):
            out = grad_stats_on_device(grads).double().numpy()
            assert not math.isfinite(out[0, 0]) and out[4, 0] >= 1


def test_a_float64_step_of_1e200_through_the_watch_is_finite_and_right() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(150, 120), nn.ReLU(), nn.Linear(120, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gw = gradwatch.watch(
        model, opt, grad_schedule=EVERY_STEP, activations=False, on_finding="ignore", show=False
    )
    seen = record_stats(gw)
    model(torch.randn(4, 150, dtype=torch.float64)).sum().backward()
    for p in model.parameters():
        p.grad.mul_(1e200)
    expected = {n: _reference(p.grad) for n, p in model.named_parameters()}
    opt.step()
    gw.flush()
    gw.close()
    s = seen[0]
    for i, name in enumerate(s.grad_layers):
        norm, max_abs, sum_abs, _ = expected[name]
        assert s.grad_nonfinite[i] == 0
        assert s.grad_norm[i] == pytest.approx(norm, rel=1e-12)
        assert s.grad_max_abs[i] == pytest.approx(max_abs, rel=1e-12)
        assert s.grad_mean_abs[i] * s.grad_numel[i] == pytest.approx(sum_abs, rel=1e-12)

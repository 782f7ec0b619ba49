"""Issue #18 on the device: a NaN activation is never inactive nor in a tail, and a
unit is dead only when it is inactive at every index with all its values finite; on
the C kernels and the torch ops, directly and through the watch's module hook."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch import reductions, scratch  # noqa: E402
from gradwatch.adapters.torch.native import wait_for_kernels  # noqa: E402
from gradwatch.adapters.torch.reductions import activation_stats_on_device  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import EVERY_STEP, record_stats  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.activations import (  # noqa: E402
    activation_stats_from_array,
    nonfinite_entries,
    tail_bounds,
)

NAN = float("nan")


@pytest.fixture(autouse=True, params=["c_kernels", "torch_ops"])
def reduction_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch_ops":
        monkeypatch.setattr(reductions, "cpu_kernels", lambda: None)
    elif wait_for_kernels() is None:
        pytest.skip("the C kernels cannot be built here")
    return str(request.param)


def _relu_output_with_nan(rows: int) -> torch.Tensor:
    """Units: 0 all NaN, 1 zeros but one NaN, 2 all zeros (dead), 3 positive."""
    y = torch.ones(rows, 4)
    y[:, 0] = NAN
    y[:, 1] = 0.0
    y[rows // 2, 1] = NAN
    y[:, 2] = 0.0
    return y


@pytest.mark.parametrize("layout", ["small", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nan_is_neither_inactive_nor_dead(
    dtype: torch.dtype, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if layout == "sliced":
        monkeypatch.setattr(reductions, "SMALL_ACTIVATION_NUMEL", 0)
        monkeypatch.setattr(scratch, "CHUNK_NUMEL", 3 * 4)
    rows = 10
    y = _relu_output_with_nan(rows).to(dtype)
    stats = activation_stats_on_device(y, "relu", -1, tail_bounds("relu")).tolist()
    inactive, dead, tail, nonfinite = stats
    zeros = 2 * rows - 1  # unit 1 without its NaN, and unit 2
    assert nonfinite == rows + 1 == nonfinite_entries(y.double().numpy())  # unit 0, and one
    assert inactive == pytest.approx(zeros / y.numel())
    assert dead == pytest.approx(1 / 4)  # unit 2 only
    assert tail == 0.0
    want = activation_stats_from_array(y.double().numpy(), "relu", -1)
    np.testing.assert_allclose([inactive, dead, tail], want, rtol=1e-6)


@pytest.mark.parametrize("kind", ["relu6", "sigmoid", "tanh", "gelu"])
def test_nan_is_in_no_tail_and_not_inactive(kind: str) -> None:
    y = torch.full((6, 5), NAN)
    y[0, 0] = 6.0 if kind == "relu6" else 1.0  # the one entry in a tail (none for gelu)
    inactive, dead, tail, nonfinite = activation_stats_on_device(
        y, kind, -1, tail_bounds(kind)
    ).tolist()
    assert inactive == 0.0 and dead == 0.0
    assert nonfinite == y.numel() - 1
    want = activation_stats_from_array(y.numpy(), kind, -1)
    np.testing.assert_allclose([inactive, dead, tail], want, rtol=1e-6)
    assert tail == pytest.approx(0.0 if kind == "gelu" else 1 / y.numel())  # the one entry


def test_a_nan_relu_output_through_the_watch_is_not_dead() -> None:
    # The NaN comes out of the ReLU module itself (NaN input), as in a NaN network.
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([NAN, -1.0, -1.0, 1.0]))  # NaN, dead, dead, live
        model[0].bias[1] = NAN  # unit 1: NaN too
    gw = gradwatch.watch(model, activation_schedule=EVERY_STEP, on_finding="ignore", show=False)
    seen = record_stats(gw)
    model(torch.randn(8, 4)).sum().backward()
    gw.flush()
    gw.close()
    s = seen[0]
    i = s.act_layers.index("1")
    assert s.act_inactive_frac[i] == pytest.approx(0.25)  # unit 2 only: NaN is not inactive
    assert s.act_dead_frac[i] == pytest.approx(0.25)
    assert not math.isnan(s.act_inactive_frac[i])
    assert s.act_nonfinite[i] == 2 * 8  # units 0 and 1, every sample


class _Exp(nn.Module):
    """``exp`` written in ``forward``: no activation module to hook."""

    def __init__(self, method: bool) -> None:
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.exp() if self.method else torch.exp(x)


@pytest.mark.parametrize("method", [False, True], ids=["torch.exp", "Tensor.exp"])
def test_an_exp_in_forward_is_a_site_that_counts_its_overflow(method: bool) -> None:
    model = nn.Sequential(nn.Linear(4, 4), _Exp(method), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([100.0, 0.0, 88.0, 89.0]))  # exp > 3.4e38 at 88.73
    gw = gradwatch.watch(model, activation_schedule=EVERY_STEP, on_finding="ignore", show=False)
    seen = record_stats(gw)
    x = torch.randn(8, 4)
    model(x).sum().backward()
    gw.flush()
    gw.close()
    s = seen[0]
    i = s.act_layers.index("1#exp:0")
    assert s.act_kinds[i] == "exp"
    want = nonfinite_entries(torch.exp(model[0](x)).detach().numpy())
    assert s.act_nonfinite[i] == want == 2 * 8  # units 0 and 3 overflow, unit 2 does not

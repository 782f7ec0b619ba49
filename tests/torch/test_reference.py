"""Fused device statistics against the core's naive per-parameter numpy reference.

Every test here runs twice: with the one-pass C kernels (``native``) and with the
torch ops they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gradwatch.adapters.torch import (  # noqa: E402
    activation_stats_on_device,
    grad_reductions,
    grad_stats_on_device,
    scratch,
    strip_wrapper_prefixes,
    unit_axis_of,
)
from gradwatch.adapters.torch import reductions as torch_reductions  # noqa: E402
from gradwatch.adapters.torch.functional import margin  # noqa: E402
from gradwatch.adapters.torch.native import wait_for_kernels  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import EVERY_STEP, mlp, record_stats  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.activations import (  # noqa: E402
    activation_stats_from_array,
    activation_stats_from_input,
    input_tail_bound,
    nonfinite_entries,
    tail_bounds,
)
from gradwatch.reduce import grad_stats_from_array  # noqa: E402


@pytest.fixture(autouse=True, params=["c_kernels", "torch_ops"])
def reduction_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs each test on the C kernels (skipped without a C compiler) and on torch ops."""
    if request.param == "torch_ops":
        monkeypatch.setattr(torch_reductions, "cpu_kernels", lambda: None)
        monkeypatch.setattr(grad_reductions, "cpu_kernels", lambda: None)
    elif wait_for_kernels() is None:
        pytest.skip("the C kernels cannot be built here")
    return str(request.param)


def _naive(g: torch.Tensor) -> tuple[float, float, float, float, int, int]:
    return grad_stats_from_array(g.detach().double().numpy())


def test_fused_grad_stats_match_numpy_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(7, 5, generator=gen),
        torch.randn(3, generator=gen) * 1e-6,
        torch.zeros(4, 4),
        torch.randn(2, 3, 4, generator=gen),
    ]
    grads[3][0, 0, :2] = 0.0
    out = grad_stats_on_device(grads).double().numpy()
    for j, g in enumerate(grads):
        norm, max_abs, mean_abs, zero_frac, nonfinite, numel = _naive(g)
        assert out[0, j] == pytest.approx(norm, rel=1e-5, abs=1e-12)
        assert out[1, j] == pytest.approx(max_abs, rel=1e-6)
        assert out[2, j] / numel == pytest.approx(mean_abs, rel=1e-5, abs=1e-12)
        assert 1.0 - out[3, j] / numel == pytest.approx(zero_frac)
        assert out[4, j] == nonfinite == 0


def test_fused_grad_stats_flag_nonfinite() -> None:
    g = torch.tensor([1.0, float("nan"), 2.0])
    h = torch.tensor([float("inf"), 0.0])
    out = grad_stats_on_device([g, h, torch.ones(2)]).numpy()
    assert out[4].tolist() == [1.0, 1.0, 0.0]
    assert not math.isfinite(out[0, 0]) and not math.isfinite(out[0, 1])


def test_flat_path_for_many_small_gradients_matches_numpy_reference() -> None:
    # Enough small tensors to take the one-pass path; NaN/Inf counted exactly there.
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(int(n), generator=gen) for n in (5, 1, 17, 64, 3, 200)]
    grads[2][3] = 0.0
    grads[4][1] = float("nan")
    grads[4][2] = float("inf")
    out = grad_stats_on_device(grads).double().numpy()
    for j, g in enumerate(grads):
        norm, max_abs, mean_abs, zero_frac, nonfinite, numel = _naive(g)
        assert out[4, j] == nonfinite
        assert 1.0 - out[3, j] / numel == pytest.approx(zero_frac)
        if nonfinite == 0:
            assert out[0, j] == pytest.approx(norm, rel=1e-5)
            assert out[1, j] == pytest.approx(max_abs, rel=1e-6)
            assert out[2, j] / numel == pytest.approx(mean_abs, rel=1e-5)
        else:
            assert not math.isfinite(out[0, j])


def test_both_gradient_paths_agree() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(40, generator=gen) for _ in range(6)]
    flat = grad_stats_on_device(grads).double().numpy()
    per_tensor = np.concatenate(
        [grad_stats_on_device(grads[i : i + 2]).double().numpy() for i in range(0, 6, 2)], axis=1
    )
    np.testing.assert_allclose(flat, per_tensor, rtol=1e-5)


@pytest.mark.parametrize("kind", ["relu", "relu6", "sigmoid", "tanh", "gelu", "hard_sigmoid"])
@pytest.mark.parametrize("shape", [(32, 16), (4, 6, 5, 5), (4, 7, 8)])
def test_activation_stats_match_numpy_reference(kind: str, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen) * 4 - 1
    fn = {
        "relu": torch.relu,
        "relu6": nn.functional.relu6,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "gelu": nn.functional.gelu,
        "hard_sigmoid": nn.functional.hardsigmoid,
    }[kind]
    y = fn(x)
    axis = unit_axis_of(y)
    if kind in ("relu", "relu6"):
        y.narrow(axis, 0, 1).zero_()  # one unit dead for the whole batch
    want = activation_stats_from_array(y.numpy(), kind, axis)
    if kind == "gelu":  # judged on its input: the device reduces the margin of z
        y = margin(x, input_tail_bound("gelu"))
        want = activation_stats_from_input(x.numpy(), "gelu", "gelu", axis)
    got = activation_stats_on_device(y, kind, axis, tail_bounds(kind)).double().numpy()
    np.testing.assert_allclose(got[:3], want, rtol=1e-6, atol=1e-7)
    assert got[3] == nonfinite_entries(y.numpy()) == 0
    if kind == "relu":
        assert got[1] > 0  # the dead unit is seen


def test_watch_step_stats_match_naive_reference_on_a_real_step() -> None:
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=3, width=16)
    model[0].weight.requires_grad_(False)  # frozen: must be absent
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gw = gradwatch.watch(
        model,
        opt,
        grad_schedule=EVERY_STEP,
        activation_schedule=EVERY_STEP,
        on_finding="ignore",
        show=False,
    )
    seen = record_stats(gw)
    x = torch.randn(20, 32)
    acts: dict[str, np.ndarray] = {}
    handles = [
        model[i].register_forward_hook(
            lambda m, a, out, i=i: acts.__setitem__(str(i), out.detach().numpy().copy())
        )
        for i in (1, 3, 5)
    ]
    model(x).pow(2).mean().backward()
    expected = {n: _naive(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    for h in handles:
        h.remove()
    gw.flush()
    assert len(seen) == 1
    s = seen[0]
    assert s.grad_layers == tuple(expected)  # model order, frozen weight absent
    assert "0.weight" not in s.grad_layers
    for i, name in enumerate(s.grad_layers):
        norm, max_abs, mean_abs, zero_frac, nonfinite, numel = expected[name]
        assert s.grad_norm[i] == pytest.approx(norm, rel=1e-5)
        assert s.grad_max_abs[i] == pytest.approx(max_abs, rel=1e-6)
        assert s.grad_mean_abs[i] == pytest.approx(mean_abs, rel=1e-5)
        assert s.grad_zero_frac[i] == pytest.approx(zero_frac)
        assert s.grad_nonfinite[i] == nonfinite
        assert s.grad_numel[i] == numel
    assert s.act_layers == ("1", "3", "5")
    assert s.act_kinds == ("relu",) * 3
    assert s.act_is_output == (False,) * 3
    for i, name in enumerate(s.act_layers):
        want = activation_stats_from_array(acts[name], "relu", -1)
        got = (s.act_inactive_frac[i], s.act_dead_frac[i], s.act_tail_frac[i])
        np.testing.assert_allclose(got, want, rtol=1e-6)
    gw.close()


def test_output_activation_is_marked() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid())
    gw = gradwatch.watch(model, activation_schedule=EVERY_STEP, on_finding="ignore", show=False)
    seen = record_stats(gw)
    model(torch.randn(5, 4)).sum().backward()
    gw.flush()
    assert seen[0].act_layers == ("1", "3")
    assert seen[0].act_is_output == (False, True)
    gw.close()


def test_wrapper_prefixes_are_stripped() -> None:
    assert strip_wrapper_prefixes("module.enc.fc1.weight") == "enc.fc1.weight"
    assert strip_wrapper_prefixes("_orig_mod.fc.bias") == "fc.bias"
    assert strip_wrapper_prefixes("block._orig_mod.fc.bias") == "block.fc.bias"
    assert strip_wrapper_prefixes("modules.fc") == "modules.fc"


def test_total_norm_of_unsampled_steps_matches_naive_reference() -> None:
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=3, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    never = gradwatch.every(10**9, dense_until=0)
    gw = gradwatch.watch(
        model,
        opt,
        grad_schedule=lambda s: False,
        activation_schedule=never,
        on_finding="ignore",
        show=False,
    )
    seen = record_stats(gw)
    model(torch.randn(20, 32)).pow(2).mean().backward()
    expected = math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in model.parameters()))
    opt.step()
    gw.flush()
    assert len(seen) == 1 and not seen[0].grad_layers
    assert seen[0].grad_total_norm == pytest.approx(expected, rel=1e-5)
    gw.close()


def test_large_gradients_reduced_in_slices_match_numpy_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Slices of 7 rows (and one whole oversized row) instead of one pass per tensor.
    from gradwatch.adapters.torch import reductions as torch_reductions

    monkeypatch.setattr(torch_reductions, "SMALL_GRAD_NUMEL", 4)
    monkeypatch.setattr(scratch, "CHUNK_NUMEL", 64)
    gen = torch.Generator().manual_seed(4)
    grads = [
        torch.randn(50, 9, generator=gen),
        torch.randn(3, 200, generator=gen),  # rows larger than a slice
        torch.randn(40, 5, generator=gen).t(),  # non-contiguous
        torch.randn(30, generator=gen),
    ]
    grads[0][5:20] = 0.0
    out = grad_stats_on_device(grads).double().numpy()
    for j, g in enumerate(grads):
        norm, max_abs, mean_abs, zero_frac, _, numel = _naive(g)
        assert out[0, j] == pytest.approx(norm, rel=1e-5)
        assert out[1, j] == pytest.approx(max_abs, rel=1e-6)
        assert out[2, j] / numel == pytest.approx(mean_abs, rel=1e-5)
        assert 1.0 - out[3, j] / numel == pytest.approx(zero_frac)


def test_small_and_large_gradients_in_one_group_keep_their_order() -> None:
    from gradwatch.adapters.torch.reductions import SMALL_GRAD_NUMEL

    gen = torch.Generator().manual_seed(5)
    big = SMALL_GRAD_NUMEL + 1
    grads = [torch.randn(n, generator=gen) * (j + 1) for j, n in enumerate((3, big, 5, 7, big, 2))]
    out = grad_stats_on_device(grads).double().numpy()
    for j, g in enumerate(grads):
        assert out[0, j] == pytest.approx(_naive(g)[0], rel=1e-5)


def test_half_precision_gradients_accumulate_in_float32() -> None:
    from gradwatch.adapters.torch.reductions import SMALL_GRAD_NUMEL

    g = torch.full((SMALL_GRAD_NUMEL * 2,), 0.5, dtype=torch.bfloat16)
    g[:100] = 0.0
    out = grad_stats_on_device([g]).double().numpy()[:, 0]
    n = g.numel()
    assert out[0] == pytest.approx(0.5 * math.sqrt(n - 100), rel=1e-3)
    assert out[2] == pytest.approx(0.5 * (n - 100), rel=1e-3)  # bf16 sums would stall
    assert out[3] == n - 100


def test_nan_in_a_large_gradient_leaves_its_zero_fraction_unknown() -> None:
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gw = gradwatch.watch(model, opt, grad_schedule=EVERY_STEP, on_finding="ignore", show=False)
    seen = record_stats(gw)
    model(torch.randn(4, 200)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    gw.flush()
    s = seen[0]
    i = s.grad_layers.index("0.weight")
    assert s.grad_nonfinite[i] >= 1
    assert math.isnan(s.grad_zero_frac[i])
    assert s.grad_zero_frac[s.grad_layers.index("1.weight")] == pytest.approx(0.0)
    gw.close()


@pytest.mark.parametrize("path", ["small", "sliced"])
@pytest.mark.parametrize("kind", ["relu", "gelu", "sigmoid", "hard_tanh"])
def test_activation_stats_with_nan_and_slices_match_numpy_reference(
    kind: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NaN outputs are neither inactive nor in a tail; values exactly on a hard bound
    # are in it. "sliced": the large-output path, in slices of 3 rows.
    from gradwatch.adapters.torch import reductions as torch_reductions

    if path == "sliced":
        monkeypatch.setattr(torch_reductions, "SMALL_ACTIVATION_NUMEL", 0)
        monkeypatch.setattr(scratch, "CHUNK_NUMEL", 3 * 6)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(10, 6, generator=gen) * 4
    y = {
        "relu": torch.relu,
        "gelu": nn.functional.gelu,
        "sigmoid": torch.sigmoid,
        "hard_tanh": nn.functional.hardtanh,
    }[kind](x)
    y[0, :] = float("nan")
    y[:, 2] = float("nan")
    if kind == "relu":
        y[:, 4] = 0.0  # dead
    want = activation_stats_from_array(y.numpy(), kind, -1)
    if kind == "gelu":  # judged on its input: the device reduces the margin of z
        x[0, :] = float("nan")
        x[:, 2] = float("nan")
        y = margin(x, input_tail_bound("gelu"))
        want = activation_stats_from_input(x.numpy(), "gelu", "gelu", -1)
    got = activation_stats_on_device(y, kind, -1, tail_bounds(kind)).double().numpy()
    np.testing.assert_allclose(got[:3], want, rtol=1e-6, atol=1e-7)
    assert got[3] == nonfinite_entries(y.numpy()) > 0
    if kind == "hard_tanh":
        assert got[2] > 0.2  # the plateaus at exactly +-1 count as tail

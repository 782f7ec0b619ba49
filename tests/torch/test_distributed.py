"""DistributedDataParallel and FSDP2 (``fully_shard``) on 2 CPU processes (gloo,
127.0.0.1): every rank computes, only rank 0 warns or prints, nothing deadlocks, and
findings and per-layer norms match a single-process run on the whole batch (FSDP's
gradients are sharded: their statistics must be combined across ranks)."""

from __future__ import annotations

import os
import socket
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = 40
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _model() -> nn.Module:
    torch.manual_seed(0)
    from torch_helpers import mlp

    return mlp(nn.Sigmoid, depth=10, width=32)  # vanishes: a gradient-only verdict


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(64, 32, generator=gen), torch.randn(64, 1, generator=gen)


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    from gradwatch.adapters.torch import every

    import gradwatch

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(
        model, opt, grad_schedule=every(1), activation_schedule=every(1), show=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        report = gw.report(show=True)
    gw.close()
    grad_findings = sorted(
        (f.rule, f.layers) for f in report.findings if f.rule not in ("dead_relu", "saturation")
    )
    return {
        "findings": grad_findings,
        "layers": [layer.name for layer in report.layers],
        "norms": [layer.typical_norm for layer in report.layers],
        "numel": [layer.numel for layer in report.layers],
        "notes": list(report.notes),
        "warnings": sum(1 for w in caught if "gradwatch" in str(w.message)),
    }


def _wrapped(wrapper: str) -> nn.Module:
    model = _model()
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


def _worker(
    rank: int, port: int, out: dict[int, dict[str, object]], wrapper: str, fail_rank: int = -1
) -> None:
    torch.set_num_threads(1)
    if rank == fail_rank:  # an internal error on this rank only, at its first flush
        from gradwatch.adapters.torch.flush import PendingSteps

        def broken(*args: object) -> None:
            raise RuntimeError("injected failure")

        PendingSteps._to_step_stats = broken  # type: ignore[method-assign]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _wrapped(wrapper)
        x, y = _data()
        half = slice(rank * 32, (rank + 1) * 32)  # mean loss over halves = full-batch gradient
        out[rank] = _run(model, x[half], y[half])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(wrapper: str, fail_rank: int = -1) -> dict[int, dict[str, object]]:
    """Both ranks' results; fails the test if they do not finish within 120 s."""
    manager = mp.Manager()
    out = manager.dict()
    ctx = mp.start_processes(
        _worker,
        args=(_free_port(), out, wrapper, fail_rank),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    for _ in range(120):
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"{wrapper} run did not finish within 120 s (deadlock?)")
    return dict(out)


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_processes_match_single_process(wrapper: str) -> None:
    x, y = _data()
    single = _run(_model(), x, y)
    out = _spawn(wrapper)
    assert set(out.keys()) == {0, 1}
    assert single["findings"], "the reference run should find vanishing gradients"
    for rank in (0, 1):
        assert out[rank]["findings"] == single["findings"]
        assert out[rank]["layers"] == single["layers"]  # "module." stripped
        assert out[rank]["numel"] == single["numel"]  # whole tensors, not shards
        np.testing.assert_allclose(out[rank]["norms"], single["norms"], rtol=1e-4)
    assert out[0]["warnings"] >= 1
    assert out[1]["warnings"] == 0


@pytest.mark.slow
def test_fsdp_rank_that_stops_monitoring_does_not_stall_the_others() -> None:
    """Rank 1 hits an internal error at its first flush and switches monitoring off; it
    still joins the statistics' all_reduces, so rank 0 monitors to the end."""
    out = _spawn("fsdp", fail_rank=1)
    assert set(out.keys()) == {0, 1}
    assert any("injected failure" in note for note in out[1]["notes"])  # type: ignore[attr-defined]
    assert not any("Monitoring stopped" in note for note in out[0]["notes"])  # type: ignore[attr-defined]
    assert out[0]["findings"], "rank 0 should still find the vanishing gradients"


def test_sharded_layouts_gradwatch_cannot_combine_are_left_out() -> None:
    """A Partial placement (a pending sum) has no per-shard statistics to add up: such
    gradients are grouped out (and noted in the report), never reported per shard."""
    from gradwatch.adapters.torch.grads import group_params as _group_params
    from gradwatch.adapters.torch.sharded import local_values, sharding_of
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        local = torch.arange(6.0).reshape(3, 2)
        sharded = DTensor.from_local(local, mesh, [Shard(0)])
        replicated = DTensor.from_local(local, mesh, [Replicate()])
        partial = DTensor.from_local(local, mesh, [Partial()])
        assert sharding_of(local) is None
        sharding = sharding_of(sharded)
        assert sharding is not None and sharding.supported and sharding.group is not None
        assert sharding_of(replicated).group is None  # type: ignore[union-attr]
        assert not sharding_of(partial).supported  # type: ignore[union-attr]
        assert torch.equal(local_values(sharded), local)
        groups, left_out = _group_params([(0, local), (1, sharded), (2, partial)])
        assert left_out == [2]
        assert sorted(i for g in groups for i in g.indices) == [0, 1]
    finally:
        dist.destroy_process_group()

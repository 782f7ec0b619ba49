"""``log_to=`` a real wandb run in offline mode, read back from the run's ``.wandb`` file.

No network and no API key: the run writes its records to ``tmp_path`` and nothing is
synced. wandb 0.31 (the pin in ``constraints.txt``) writes the file from its Go service
(``wandb-core``) and no longer ships a Python reader (``wandb.sdk.internal.datastore``
is gone with the Python internal process), so :func:`wandb_records` reads the file's
framing, the LevelDB log format, and decodes each record with wandb's own ``Record``
protobuf (``wandb.proto.wandb_internal_pb2``), checking every chunk's checksum.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
wandb = pytest.importorskip("wandb")

from gradwatch.adapters.torch.watch import DEFAULT_GRAD_SCHEDULE, DEFAULT_NORM_SCHEDULE  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.sinks import MAX_ABS_PREFIX, NORM_PREFIX, TOTAL_NORM_TAG  # noqa: E402

STEPS = 70  # past the dense start (50), so the sampled steps thin out to every 10th

# The .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks
# of chunks (crc32, length, type); a record too long for a block is split FIRST, MIDDLE...,
# LAST; a block tail shorter than a chunk header is zero padding (leveldb doc/log_format.md).
_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = _HEADER.size
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:
            assert data[pos : pos + left] == bytes(left), "block padding is not zeros"
            pos += left
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        payload = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        # wandb's checksum: crc32 of the type byte, continued over the payload
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {pos}"
        pos += _CHUNK.size + length
        yield kind, payload
    assert pos == len(data), f"{len(data) - pos} trailing bytes"


def wandb_records(path: Path) -> list[Any]:
    """Every ``wandb.proto.wandb_internal_pb2.Record`` in a run's ``.wandb`` file."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert _HEADER.unpack_from(data) == (b":W&B", 0xBEE1, 0), "not a wandb run file"
    records, pending = [], b""
    for kind, payload in _chunks(data):
        assert (kind in (_FULL, _FIRST)) == (not pending), f"chunk type {kind} out of order"
        pending += payload
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    assert not pending, "the file ends inside a record"
    return records


def history_rows(path: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of the run's history records, as wandb stored them."""
    records = wandb_records(path)
    kinds = [record.WhichOneof("record_type") for record in records]
    assert "run" in kinds and "exit" in kinds, f"an incomplete run file: {kinds}"
    rows: dict[int, dict[str, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row = rows.setdefault(int(record.history.step.num), {})
        for item in record.history.item:
            (key,) = item.nested_key or (item.key,)  # one flat key: nothing here nests
            row[key] = json.loads(item.value_json)
    return rows


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterable[Path]:
    """wandb offline, every directory it writes under ``tmp_path``, no key, no git; its
    service process is shut down afterwards."""
    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
        # Were wandb to contact a server, the connection would be refused at once.
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_ARTIFACT_DIR": str(tmp_path / "artifacts"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield tmp_path
    wandb.teardown()


def _finish(run: Any) -> Path:
    """Finish the run and return its ``.wandb`` file, complete: ``finish()`` returns
    before wandb's service has written the last records (we read the file cut inside a
    record 1 time in 5), ``wandb.teardown()`` waits for the service to exit."""
    run.finish()
    wandb.teardown()
    files = list(Path(run.dir).parent.glob("run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def _init(run_dir: Path) -> Any:
    # System metrics and metadata are wandb's own collectors (one probes a cloud
    # metadata address); they are not what this test reads and only slow it down.
    settings = wandb.Settings(x_disable_stats=True, x_disable_meta=True, silent=True)
    return wandb.init(project="gradwatch-test", mode="offline", dir=run_dir, settings=settings)


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 1),
    )  # fmt: skip


def _train(model: Any, opt: Any, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 1, generator=gen)
    for _ in range(steps):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_a_wandb_run_holds_gradwatchs_numbers_at_the_training_steps(offline: Path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first, total = [], []  # plain torch, just before each optimizer step

    def measure(*_: object) -> None:
        grads = [p.grad for p in model.parameters()]
        first.append(float(model[0].weight.grad.norm()))
        total.append(math.sqrt(sum(float(g.norm()) ** 2 for g in grads)))

    opt.register_step_pre_hook(measure)
    seen: dict[int, dict[str, float]] = {}  # what gradwatch handed its sinks
    run = _init(offline)
    gw = gradwatch.watch(
        model,
        opt,
        show=False,
        on_finding="ignore",
        log_to=[run, lambda step, scalars: seen.setdefault(step, {}).update(scalars)],
    )
    _train(model, opt, STEPS)
    gw.close()  # flushes the steps since the last flush into the run
    run_file = _finish(run)

    rows = history_rows(run_file)
    mine = {
        step: {k: v for k, v in row.items() if not k.startswith("_")} for step, row in rows.items()
    }
    mine = {step: row for step, row in mine.items() if row}
    assert mine == seen  # every step, every tag, every value, as gradwatch sent them
    norm_tag, max_tag = NORM_PREFIX + "0.weight", MAX_ABS_PREFIX + "2.weight"
    sampled = [s for s in range(STEPS) if DEFAULT_GRAD_SCHEDULE(s)]
    assert [s for s in sorted(mine) if norm_tag in mine[s]] == sampled
    assert all(max_tag in mine[s] for s in sampled)
    assert [s for s in sorted(mine) if TOTAL_NORM_TAG in mine[s]] == [
        s for s in range(STEPS) if DEFAULT_GRAD_SCHEDULE(s) or DEFAULT_NORM_SCHEDULE(s)
    ]
    for step, row in mine.items():
        assert rows[step]["_step"] == step  # wandb's own step column is the training step
        if norm_tag in row:
            assert row[norm_tag] == pytest.approx(first[step], rel=1e-5)
        assert row[TOTAL_NORM_TAG] == pytest.approx(total[step], rel=1e-5)


def test_finishing_the_run_before_the_watch_warns_once_and_training_goes_on(offline: Path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = _init(offline)
    gw = gradwatch.watch(model, opt, show=False, on_finding="ignore", log_to=run, flush_every=10)
    _train(model, opt, 15)  # one flush of 10 steps reaches the run, 5 are pending
    run.finish()
    with pytest.warns(gradwatch.GradwatchWarning, match=f"wandb run {run.id}") as caught:
        _train(model, opt, 15)
        report = gw.report(show=False)
    gw.close()
    assert len([w for w in caught if "wandb run" in str(w.message)]) == 1
    assert report.last_step == 29  # monitoring went on without the run
    logged = sorted(s for s, row in history_rows(_finish(run)).items() if "grad_norm" in row)
    assert logged == list(range(10))  # the flush made before finish(), nothing after


def test_the_documented_x_axes_keep_every_row_when_the_loop_logs_to_the_same_run(offline: Path):
    # docs/logging.md, "wandb and steps": each side logs against its own x-axis and
    # neither passes step=, so no row is older than wandb's step and none is dropped.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = _init(offline)
    run.define_metric("train_step")
    run.define_metric("loss", step_metric="train_step")
    run.define_metric("gradwatch_step")
    for pattern in ("grad*", "act_*", "gradwatch/*"):
        run.define_metric(pattern, step_metric="gradwatch_step")
    gw = gradwatch.watch(
        model,
        opt,
        show=False,
        on_finding="ignore",
        flush_every=10,
        log_to=lambda step, scalars: run.log({**scalars, "gradwatch_step": step}),
    )
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 1, generator=gen)
    for step in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.log({"loss": loss.item(), "train_step": step})  # ahead of gradwatch's flush
    gw.close()
    rows = history_rows(_finish(run)).values()
    assert sorted(row["train_step"] for row in rows if "loss" in row) == list(range(30))
    ours = sorted(row["gradwatch_step"] for row in rows if TOTAL_NORM_TAG in row)
    assert ours == list(range(30))

"""``log_to=`` into a real TensorBoard directory, read back with tensorboard's own
``EventAccumulator``; and the flow picture's PNGs (this env has the plot extra)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from synth import grad_step, noisy

from gradwatch import Analyzer
from gradwatch.monitor import Monitor

pytest.importorskip("torch")
pytest.importorskip("tensorboard")


def _events(logdir: Path):  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _run(m: Monitor, steps: int = 30, flush_every: int = 10) -> None:
    rng = np.random.default_rng(0)
    batch = []
    for step in range(steps):
        batch.append(
            grad_step(
                step,
                noisy([0.1, 0.5, 1.0], rng),
                names=["fc1.weight", "fc1.bias", "fc2.weight"],
                acts={"relu1": ("relu", 0.4, 0.1, 0.0)},
            )
        )
        if len(batch) == flush_every:
            m.observe(batch)
            batch = []


def test_a_log_directory_is_written_and_reads_back_with_tensorboard(tmp_path: Path):
    logdir = tmp_path / "tb"
    m = Monitor(show=False, log_to=logdir, framework="torch")
    _run(m)
    m.report()  # flushes the writer
    acc = _events(logdir)
    tags = set(acc.Tags()["scalars"])
    assert {
        "grad_2.0_norm/fc1.weight",
        "grad_2.0_norm/fc2.weight",
        "grad_max_abs/fc1.bias",
        "grad_zero_frac/fc2.weight",
        "grad_norm",
        "act_dead_frac/relu1",
        "act_tail_frac/relu1",
    } <= tags
    total = acc.Scalars("grad_norm")
    assert [e.step for e in total] == list(range(30))  # the training steps
    dead = acc.Scalars("act_dead_frac/relu1")
    assert all(math.isclose(e.value, 0.1, rel_tol=1e-6) for e in dead)
    m.close()
    m.close()


def test_a_summary_writer_is_used_as_given_and_left_open(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    m = Monitor(show=False, log_to=writer)
    _run(m, steps=20)
    m.close()
    writer.add_scalar("user/loss", 1.0, 20)  # still the user's, still open
    writer.close()
    acc = _events(tmp_path / "tb")
    assert len(acc.Scalars("grad_2.0_norm/fc2.weight")) == 20
    assert "user/loss" in acc.Tags()["scalars"]


def test_an_open_finding_is_logged_as_one(tmp_path: Path):
    m = Monitor(show=False, on_finding="ignore", log_to=tmp_path / "tb")
    m.observe([grad_step(s, [0.0, 0.0], zero_frac=1.0) for s in range(40)])
    m.close()
    found = _events(tmp_path / "tb").Scalars("gradwatch/finding/zero_gradient")
    assert [(e.step, e.value) for e in found] == [(39, 1.0)]


# --- the flow picture ----------------------------------------------------------------


@pytest.mark.parametrize("n_layers", [10, 300])
def test_flow_png_is_written_readable_and_not_blank(tmp_path: Path, n_layers: int):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    from gradwatch.plot import MAX_HEIGHT, MAX_LABELS

    an = Analyzer()
    rng = np.random.default_rng(1)
    names = [f"encoder.layers.{i}.self_attn.out_proj.weight" for i in range(n_layers)]
    for step in range(60):
        norms = noisy([10.0 ** (-3 * i / n_layers) for i in range(n_layers)], rng)
        an.observe_stats(grad_step(step, norms, names=names))
    path = an.report().plot(tmp_path / "flow.png")
    assert path.stat().st_size > 20_000
    pixels = matplotlib.image.imread(path)
    assert float(pixels[..., :3].var()) > 0.0
    height_px, _ = pixels.shape[:2]
    assert height_px <= MAX_HEIGHT * 110 + 1  # bounded, whatever the layer count

    from gradwatch.plot import label_rows

    assert len(label_rows(n_layers, set())) <= MAX_LABELS + 1

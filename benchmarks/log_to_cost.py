"""What ``log_to=`` costs on top of gradwatch's defaults, A/A-controlled (issue #17).

Run: ``python benchmarks/log_to_cost.py`` (the ``torch`` tox env has tensorboard and
wandb; CPU, one thread). Options: ``--rounds N`` (default 40), ``--quick`` (a quarter).

The 12x512 ReLU MLP of ``benchmarks/side_by_side.py``, batch 128, SGD. Every variant
trains its own copy in this process: unmonitored, unmonitored again (the A/A control),
gradwatch at defaults, the same with ``log_to=`` a temporary TensorBoard directory, and
with ``log_to=`` a wandb run in offline mode when wandb imports. After 60 warm-up steps
each, rounds of 20 steps run interleaved, the order rotating by one each round. A round
is 20 steps so that it holds exactly one flush at the default ``flush_every=20`` (the
moment the sinks write) and two sampled steps of the default schedule: every round pays
the same share of logging. A variant's *ratio* is the median over rounds of its round
time divided by the unmonitored copy's time in the same round; the interquartile range
over rounds shows the spread, and the A/A row shows what a ratio means on this machine.
For each sink two more columns: its round time over the defaults copy's in the same round
(the increment of logging alone), and the time spent in the sink's ``write`` per step,
timed on the training thread, which model-to-model noise does not reach.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import interleaved_timing
from side_by_side import _classification, _load_average, _mlp, _quiet, _wandb_offline

STEPS_PER_ROUND = 20  # one flush at the default flush_every=20 (see the module doc)
WARMUP = 60  # past the dense start of the default schedule (every step up to 50)

PLAIN = "unmonitored"
# A SummaryWriter queue that holds a whole flush (20 steps of ~1,000 scalars): at
# torch's default max_queue=10 add_scalar waits past the 10th event of a flush for the
# writer thread, which computes a pure-Python CRC per event.
BIG_QUEUE = 20_000
# Which sink's writes are each variant's (the start of the sink's name, gradwatch/sinks.py)
SINK_OF = {
    "tensorboard": "TensorBoard directory",
    "tensorboard_queue": "SummaryWriter",
    "wandb": "wandb run",
}
LABELS = {
    "plain": "unmonitored again (A/A control)",
    "defaults": "gradwatch defaults",
    "tensorboard": "gradwatch defaults + log_to=<TensorBoard dir>",
    "tensorboard_queue": f"gradwatch defaults + log_to=SummaryWriter(dir, max_queue={BIG_QUEUE:_})",
    "wandb": "gradwatch defaults + log_to=<wandb run, offline>",
}


def make_step(log_to: Any = None, *, monitored: bool = True) -> tuple[Callable[[], None], Any]:
    """One SGD step of a fresh copy of the MLP and its watch: gradwatch's defaults with
    ``log_to`` when ``monitored``, else no watch (``None``)."""
    import torch

    import gradwatch

    torch.manual_seed(0)
    model = _mlp("cpu")
    (x, y), loss_fn = _classification((128, 512))("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = None
    if monitored:
        watch = gradwatch.watch(model, opt, on_finding="ignore", show=False, log_to=log_to)

    def step() -> None:
        loss_fn(model, (x, y)).backward()
        opt.step()
        opt.zero_grad()

    return step, watch


def per_round_ratios(
    variants: dict[str, Callable[[], None]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per step and paired ratio to the first variant, one of each per round.

    Each round is one :func:`_timing.interleaved_timing` round of ``STEPS_PER_ROUND``
    steps per variant, in an order rotated by one variant each round."""
    order = list(variants.items())
    baseline = order[0][0]
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        rotated = dict(order[r % len(order) :] + order[: r % len(order)])
        timing = interleaved_timing(
            rotated, warmup=0, rounds=1, reps=STEPS_PER_ROUND, baseline=baseline
        )
        for name in variants:
            seconds[name].append(timing.medians[name])
            ratios[name].append(timing.ratios[name])
    return seconds, ratios


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


@contextlib.contextmanager
def time_in_sinks(spent: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in each sink's ``write`` to ``spent[sink name]``: the cost
    of logging on the training thread, free of model-to-model noise. TensorBoard's
    writer thread and wandb's service process run beside it and are not counted."""
    from gradwatch.sinks import SummaryWriterSink, WandbSink

    originals = {cls: cls.write for cls in (SummaryWriterSink, WandbSink)}

    def timed(cls: type, write: Callable[..., None]) -> Callable[..., None]:
        def wrapper(self: Any, batch: Any) -> None:
            start = time.perf_counter()
            try:
                write(self, batch)
            finally:
                spent[self.name] = spent.get(self.name, 0.0) + time.perf_counter() - start

        return wrapper

    for cls, write in originals.items():
        cls.write = timed(cls, write)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, write in originals.items():
            cls.write = write  # type: ignore[method-assign]


def _scalars_written(logdir: Path) -> int:
    """How many scalar events the TensorBoard directory holds (proof the sink wrote)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])


def table(rounds: int) -> str:
    """Measure every variant and return the markdown table with its context lines."""
    import importlib.util

    import torch
    from gradwatch.adapters.torch.native import wait_for_kernels
    from torch.utils.tensorboard import SummaryWriter

    torch.set_num_threads(1)
    wait_for_kernels(120)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-log-to-cost-") as tmp:
        logdir, queued_dir = Path(tmp) / "tb", Path(tmp) / "tb_queue"
        writer = SummaryWriter(log_dir=str(queued_dir), max_queue=BIG_QUEUE)
        run = None
        if importlib.util.find_spec("wandb") is not None:
            import wandb

            try:
                with _quiet():
                    _wandb_offline()
                run = wandb.run
            except Exception as exc:  # wandb is one variant, not a requirement
                notes.append(f"wandb did not start offline: {type(exc).__name__}: {exc}")
        else:
            notes.append("wandb is not installed: its row is absent.")
        load_before = _load_average()
        started = time.perf_counter()
        with _quiet():
            made = {
                PLAIN: make_step(monitored=False),
                LABELS["plain"]: make_step(monitored=False),
                LABELS["defaults"]: make_step(),
                LABELS["tensorboard"]: make_step(logdir),
                LABELS["tensorboard_queue"]: make_step(writer),
            }
            if run is not None:
                made[LABELS["wandb"]] = make_step(run)
            variants = {name: step for name, (step, _) in made.items()}
            for step in variants.values():
                for _ in range(WARMUP):
                    step()
            spent: dict[str, float] = {}
            with time_in_sinks(spent):
                seconds, ratios = per_round_ratios(variants, rounds)
            elapsed = time.perf_counter() - started
            load_after = _load_average()
            for _, watch in made.values():
                if watch is not None:
                    watch.close()  # flushes and closes the writer gradwatch opened
            writer.close()  # the one passed in stays the caller's to close
        notes.append(
            f"Scalars written: {_scalars_written(logdir)} to the TensorBoard directory, "
            f"{_scalars_written(queued_dir)} through the SummaryWriter."
        )
        if run is not None:
            run.finish()
    lines = [
        f"### 12x512 ReLU MLP, batch 128, SGD: log_to= cost (cpu, "
        f"{torch.get_num_threads()} thread)",
        "",
        f"{rounds} interleaved rounds of {STEPS_PER_ROUND} steps after {WARMUP} warm-up "
        f"steps; load average (1/5/15 min) {load_before} before, {load_after} after; "
        f"{elapsed:.0f} s.",
        "",
        "| variant | median step (ms) | ratio (median) | ratio IQR (q1-q3) "
        "| vs defaults (median, IQR) | in the sink's write (ms/step) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    defaults = seconds[LABELS["defaults"]]
    base = statistics.median(seconds[PLAIN])
    for key, name in [("", PLAIN), *((k, v) for k, v in LABELS.items() if v in variants)]:
        q1, median, q3 = _quartiles(ratios[name])
        spread = "" if name == PLAIN else f"{q1:.3f}-{q3:.3f}"
        versus = inside = ""
        if key in SINK_OF:  # the sink's increment, paired round by round with defaults
            a, m, b = _quartiles([v / d for v, d in zip(seconds[name], defaults, strict=True)])
            versus = f"{m:.3f} ({a:.3f}-{b:.3f})"
            mine = [t for sink, t in spent.items() if sink.startswith(SINK_OF[key])]
            assert len(mine) == 1, f"{key}: sinks {sorted(spent)}"
            per_step = mine[0] / (rounds * STEPS_PER_ROUND)
            inside = f"{per_step * 1e3:.3f} ({per_step / base:.2%})"
        lines.append(
            f"| {name} | {statistics.median(seconds[name]) * 1e3:.2f} | {median:.3f} "
            f"| {spread} | {versus} | {inside} |"
        )
    return "\n".join([*lines, "", *notes])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds (40)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the rounds")
    args = parser.parse_args(argv)
    if args.rounds < 4:
        parser.error("--rounds must be at least 4 (quartiles)")
    import torch

    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    try:
        import wandb

        versions += f", wandb {wandb.__version__}"
    except ImportError:
        pass
    print(f"{versions}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print()
    print(table(max(4, args.rounds // 4) if args.quick else args.rounds), flush=True)


if __name__ == "__main__":
    main()

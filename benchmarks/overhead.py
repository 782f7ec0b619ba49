"""Step-time overhead of gradwatch's torch adapter, against the alternatives.

Run: ``python benchmarks/overhead.py`` (CPU, one thread). Prints markdown tables of
median step-time ratios versus the unmonitored loop. Every variant trains its own copy
of the model in the same process, interleaved after warm-up, the order rotating each
round (see ``benchmarks/_timing.py``); a second unmonitored copy (the A/A control row)
shows the run's noise floor. Targets: defaults <= 1.03x, every-step gradient and
activation statistics <= 1.15x.

``main()`` prints the PyTorch tables (``torch_rows()``), then the Keras table
(``overhead_keras.py`` in a subprocess, TensorFlow backend), the layer-count scaling
(``scaling.py``) and the long-run memory check (``memory.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import interleaved_timing, markdown_table


def _mlp(depth: int = 12, width: int = 512) -> object:
    import torch as t

    layers: list[t.nn.Module] = []
    for _ in range(depth):
        layers += [t.nn.Linear(width, width), t.nn.ReLU()]
    return t.nn.Sequential(*layers, t.nn.Linear(width, 10))


def _cnn() -> object:
    import torch as t

    nn = t.nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 10),
    )


def _make_step(
    model_fn: Callable[[], object], x: object, y: object, setup: str
) -> Callable[[], None]:
    """A closure doing one SGD step of a fresh model copy under monitoring ``setup``."""
    import torch
    from gradwatch.adapters.torch import every

    import gradwatch

    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.functional.cross_entropy
    context: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext
    after_backward: Callable[[], None] = lambda: None  # noqa: E731
    if setup == "defaults":
        gradwatch.watch(model, opt, on_finding="ignore", show=False)
    elif setup == "every_step":
        gradwatch.watch(
            model,
            opt,
            grad_schedule=every(1),
            activation_schedule=every(1),
            on_finding="ignore",
            show=False,
        )
    elif setup == "naive_item":
        params = list(model.named_parameters())
        norms: dict[str, float] = {}

        def after_backward() -> None:
            for name, p in params:
                norms[name] = p.grad.norm().item()
    elif setup == "detect_anomaly":
        context = lambda: torch.autograd.detect_anomaly(check_nan=True)  # noqa: E731
    elif setup == "wandb":
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb.init(mode="offline", project="gradwatch-overhead", reinit=True)
        wandb.watch(model, log="gradients", log_freq=1)

    def step() -> None:
        with context():
            loss = loss_fn(model(x), y)
            loss.backward()
        after_backward()
        opt.step()
        opt.zero_grad()

    return step


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def torch_rows(*, quick: bool = False, cnn: bool = True) -> list[str]:
    """Markdown tables for the PyTorch adapter."""
    import importlib.util

    import torch

    torch.set_num_threads(1)
    # A round of 10 steps holds exactly one sampled step of the default schedule
    # (every 10th after step 50), so its mean amortizes the sampling honestly.
    # Rounds of 10-step blocks vary by +-15% on this shared machine, so a ratio needs
    # ~60 of them to resolve 1-2%; 60 is ten full rotations of the six variants' order.
    rounds, warmup, reps = (12, 60, 10) if quick else (60, 60, 10)
    tables = []
    cases: list[tuple[str, Callable[[], object], object, object]] = []
    gen = torch.Generator().manual_seed(0)
    cases.append(
        (
            "PyTorch: 12x512 ReLU MLP, batch 128, SGD, CPU, 1 thread",
            _mlp,
            torch.randn(128, 512, generator=gen),
            torch.randint(0, 10, (128,), generator=gen),
        )
    )
    if cnn:
        cases.append(
            (
                "PyTorch: small BN CNN (3 conv), batch 32 of 3x32x32, SGD, CPU, 1 thread",
                _cnn,
                torch.randn(32, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (32,), generator=gen),
            )
        )
    setups = {
        # A second unmonitored copy: its ratio is this run's noise floor (ideally 1.000).
        "unmonitored again (A/A control)": "none",
        "gradwatch defaults": "defaults",
        "gradwatch every-step stats + activations": "every_step",
        "naive per-parameter .norm().item()": "naive_item",
        "torch.autograd.detect_anomaly": "detect_anomaly",
    }
    if importlib.util.find_spec("wandb") is not None:
        setups["wandb.watch(log='gradients', log_freq=1), offline"] = "wandb"
    for title, model_fn, x, y in cases:
        with _quiet():
            variants = {"unmonitored": _make_step(model_fn, x, y, "none")}
            for label, setup in setups.items():
                variants[label] = _make_step(model_fn, x, y, setup)
            timing = interleaved_timing(variants, warmup=warmup, rounds=rounds, reps=reps)
        medians = dict(timing.medians)
        base = medians.pop("unmonitored")
        table = markdown_table(title, base, medians, timing.ratios)
        table += "\n\nRatios are medians over rounds of the paired per-round ratio."
        own = {
            label: instrumented_cost(model_fn, x, y, setup)
            for label, setup in (
                ("gradwatch defaults", "defaults"),
                ("gradwatch every-step stats + activations", "every_step"),
            )
        }
        table += "\n\nTime inside gradwatch's hooks per step (instrumented, steps 60-360):\n\n"
        table += "| variant | ms/step | share of the unmonitored step |\n|---|---:|---:|\n"
        table += "\n".join(
            f"| {label} | {sec * 1e3:.2f} | {sec / base:.1%} |" for label, sec in own.items()
        )
        tables.append(table)
    return tables


# The torch adapter's entry points that run in the training loop (its step clock and
# activation capture, by class name); their time is gradwatch's.
_ENTRY_POINTS = (
    ("StepClock", "_begin_backward"),
    ("StepClock", "_end_backward"),
    ("StepClock", "_end_step"),
    ("ActivationCapture", "_on_activation"),
    ("ActivationCapture", "_on_root_output"),
)


def instrumented_cost(
    model_fn: Callable[[], object], x: object, y: object, setup: str, steps: int = 300
) -> float:
    """Seconds per step spent inside gradwatch's hooks (flushes and analysis included),
    timed around each entry point. On CPU the device work is synchronous, so this is
    gradwatch's whole cost, free of the model-to-model noise of end-to-end timings."""
    from gradwatch.adapters.torch.activations import ActivationCapture
    from gradwatch.adapters.torch.clock import StepClock

    spent = [0.0]
    owners = {"StepClock": StepClock, "ActivationCapture": ActivationCapture}
    originals = {(cls, name): getattr(owners[cls], name) for cls, name in _ENTRY_POINTS}

    def timed(fn: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    for (cls, name), fn in originals.items():
        setattr(owners[cls], name, timed(fn))
    try:
        with _quiet():
            step = _make_step(model_fn, x, y, setup)
            for _ in range(60):  # past the dense start of the default schedule
                step()
            spent[0] = 0.0
            for _ in range(steps):
                step()
    finally:
        for (cls, name), fn in originals.items():
            setattr(owners[cls], name, fn)
    return spent[0] / steps


def keras_table() -> str:
    """The Keras rows, measured in a subprocess: Keras fixes its backend at import."""
    import subprocess

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead_keras.py")
    out = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        return f"### Keras\n\nnot measured: {out.stderr.strip().splitlines()[-1:]}"
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    import importlib.util

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--no-cnn", action="store_true", help="skip the CNN table")
    parser.add_argument("--torch-only", action="store_true", help="skip Keras, scaling, memory")
    args = parser.parse_args(argv)
    for table in torch_rows(quick=args.quick, cnn=not args.no_cnn):
        print(table)
        print()
    if args.torch_only:
        return
    if importlib.util.find_spec("keras") is not None:
        print(keras_table())
        print()
    import memory
    import scaling

    print(scaling.rows(rounds=6 if args.quick else 15))
    print()
    print(memory.rows())


if __name__ == "__main__":
    main()

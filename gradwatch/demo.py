"""``gradwatch demo``: diagnose a classic broken network, apply the top fix, train again.

1. Train a deep sigmoid MLP with N(0, 1) initialization on scikit-learn's bundled 8x8
   digits (no download), with gradwatch watching.
2. Print gradwatch's report for that run.
3. Apply the fix gradwatch ranked first and train again with the same budget.
4. Print the new report and a before/after table. Every number comes from the runs.

Needs the ``demo`` extra (torch, scikit-learn); ``--framework keras`` needs the
``keras`` extra instead of torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradwatch.report import Report


@dataclass(frozen=True)
class NetSpec:
    """The network a run trains; a fix changes one or two fields."""

    depth: int = 15
    width: int = 32
    activation: str = "sigmoid"
    init: str = "normal"  # N(0, 1): the classic broken setup
    batch_norm: bool = False
    residual: bool = False
    lr: float = 0.05
    clip_norm: float | None = None


@dataclass(frozen=True)
class RunResult:
    """What one training run produced."""

    report: Report
    test_accuracy: float
    final_loss: float
    seconds: float


# What applying each fix means for the demo network.
_APPLY: dict[str, dict[str, Any]] = {
    "leaky_relu": {"activation": "leaky_relu", "init": "he"},
    "relu": {"activation": "relu", "init": "he"},
    "he_init": {"init": "he"},
    "xavier_init": {"init": "xavier"},
    "batch_norm": {"batch_norm": True},
    "residual": {"residual": True},
    "lower_learning_rate": {"lr": 0.005},
    "gradient_clipping": {"clip_norm": 1.0},
}
DEFAULT_STEPS = 1000
BATCH_SIZE = 64


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits split 80/20, standardized with the training statistics."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    x = ((x - mean) / std).astype(np.float32)
    return x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64)


def next_spec(spec: NetSpec, report: Report) -> tuple[NetSpec, str | None, str]:
    """The network after the report's top-ranked fix, its id and its text."""
    for finding in report.findings:
        for fix in finding.fixes:
            if fix.id in _APPLY:
                return replace(spec, **_APPLY[fix.id]), fix.id, fix.text
    return spec, None, "no applicable fix"


def run_demo(
    framework: str = "torch",
    steps: int | None = None,
    seed: int = 0,
    json_path: Path | None = None,
    plot_path: Path | None = None,
    console: Console | None = None,
) -> int:
    """Run the demo; returns the process exit code."""
    console = console or Console()
    steps = steps or DEFAULT_STEPS
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    try:
        train = _trainer(framework)
        data = load_data(seed)
    except ImportError as exc:
        extra = "keras" if framework == "keras" else "demo"
        console.print(f"gradwatch demo needs the '{extra}' extra: pip install 'gradwatch[{extra}]'")
        console.print(f"({exc})")
        return 2

    before_spec = NetSpec()
    console.rule("[bold]1. A deep sigmoid network with N(0, 1) initialization")
    console.print(
        f"{before_spec.depth} hidden layers of {before_spec.width} sigmoid units, "
        f"SGD lr={before_spec.lr}, {steps} steps of batch {BATCH_SIZE} on the 8x8 digits "
        f"({framework})."
    )
    before = train(before_spec, data, steps, seed, console, "before")
    console.rule("[bold]2. gradwatch's diagnosis")
    console.print(before.report)

    after_spec, fix_id, fix_text = next_spec(before_spec, before.report)
    console.rule("[bold]3. Apply the top-ranked fix and train again")
    if fix_id is None:
        console.print("gradwatch found nothing to fix; training the same network again.")
    else:
        console.print(f"Applying [bold]{fix_id}[/bold]: {fix_text}")
    after = train(after_spec, data, steps, seed, console, "after")
    console.print(after.report)

    console.rule("[bold]4. Before and after")
    console.print(comparison_table(before, after, fix_id))
    if json_path is not None:
        payload = {
            "fix_applied": fix_id,
            "before": {**_numbers(before), "report": before.report.to_dict()},
            "after": {**_numbers(after), "report": after.report.to_dict()},
        }
        json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        console.print(f"wrote {json_path}")
    if plot_path is not None:
        before.report.plot(plot_path)
        console.print(f"wrote {plot_path}")
    return 0


def _numbers(result: RunResult) -> dict[str, float | int]:
    layers = result.report.layers
    return {
        "test_accuracy": result.test_accuracy,
        "final_loss": result.final_loss,
        "first_layer_grad_norm": layers[0].typical_norm if layers else float("nan"),
        "last_layer_grad_norm": layers[-1].typical_norm if layers else float("nan"),
        "findings": sum(f.severity != "info" for f in result.report.findings),
        "seconds": result.seconds,
    }


def comparison_table(before: RunResult, after: RunResult, fix_id: str | None) -> Table:
    """The side-by-side table the demo ends with."""
    table = Table(title=f"fix applied: {fix_id or 'none'}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    b, a = _numbers(before), _numbers(after)
    table.add_row("test accuracy", f"{b['test_accuracy']:.1%}", f"{a['test_accuracy']:.1%}")
    table.add_row("final loss", f"{b['final_loss']:.3f}", f"{a['final_loss']:.3f}")
    table.add_row(
        "first-layer grad norm",
        f"{b['first_layer_grad_norm']:.2e}",
        f"{a['first_layer_grad_norm']:.2e}",
    )
    table.add_row(
        "last-layer grad norm",
        f"{b['last_layer_grad_norm']:.2e}",
        f"{a['last_layer_grad_norm']:.2e}",
    )
    table.add_row("findings (warning+error)", str(b["findings"]), str(a["findings"]))
    table.add_row("training time", f"{b['seconds']:.1f} s", f"{a['seconds']:.1f} s")
    return table


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _trainer(framework: str) -> Any:
    if framework == "torch":
        import torch  # noqa: F401  (fail early with ImportError)

        return _train_torch
    if framework == "keras":
        import keras  # noqa: F401

        return _train_keras
    raise ValueError(f"framework must be 'torch' or 'keras', got {framework!r}")


def _train_torch(
    spec: NetSpec, data: tuple[np.ndarray, ...], steps: int, seed: int, console: Console, label: str
) -> RunResult:
    import torch
    from torch import nn

    import gradwatch

    torch.manual_seed(seed)
    # Saturated sigmoids pass back subnormal floats, which x86 CPUs handle ~100x slower;
    # flushing them to zero keeps the broken run as fast as the fixed one. The flag is
    # per thread, and nets this small run fastest on one thread anyway.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data)
    model = _torch_net(spec, x_train.shape[1], 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    with gradwatch.watch(model, optimizer, on_finding="ignore", show=False) as gw:
        with _progress(console) as progress:
            task = progress.add_task(label, total=steps, loss=float("nan"))
            for step in range(steps):
                idx = torch.randint(0, len(x_train), (BATCH_SIZE,), generator=generator)
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad()
                loss.backward()
                if spec.clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), spec.clip_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
                if step % 10 == 0 or step == steps - 1:
                    progress.update(task, completed=step + 1, loss=losses[-1])
        report = gw.report(show=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model.eval()(x_test).argmax(1) == y_test).float().mean())
    return RunResult(report, accuracy, float(np.mean(losses[-20:])), seconds)


def _torch_net(spec: NetSpec, n_in: int, n_out: int) -> Any:
    from torch import nn

    activations = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}

    class Block(nn.Module):
        def __init__(self, d_in: int) -> None:
            super().__init__()
            self.linear = nn.Linear(d_in, spec.width)
            self.norm = nn.BatchNorm1d(spec.width) if spec.batch_norm else nn.Identity()
            self.act = activations[spec.activation]()
            self.skip = spec.residual and d_in == spec.width
            _init_torch(self.linear, spec)

        def forward(self, x: Any) -> Any:
            out = self.act(self.norm(self.linear(x)))
            return x + out if self.skip else out

    blocks = [Block(n_in if i == 0 else spec.width) for i in range(spec.depth)]
    head = nn.Linear(spec.width, n_out)
    _init_torch(head, spec)
    return nn.Sequential(*blocks, head)


def _init_torch(layer: Any, spec: NetSpec) -> None:
    from torch import nn

    if spec.init == "normal":
        nn.init.normal_(layer.weight, 0.0, 1.0)
    elif spec.init == "he":
        nn.init.kaiming_normal_(layer.weight, nonlinearity="leaky_relu")
    elif spec.init == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


def _train_keras(
    spec: NetSpec, data: tuple[np.ndarray, ...], steps: int, seed: int, console: Console, label: str
) -> RunResult:
    import keras

    import gradwatch

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = data
    initializer = {
        "normal": keras.initializers.RandomNormal(0.0, 1.0, seed=seed),
        "he": keras.initializers.HeNormal(seed=seed),
        "xavier": keras.initializers.GlorotUniform(seed=seed),
    }[spec.init]
    inputs = keras.Input((x_train.shape[1],))
    h = inputs
    for _ in range(spec.depth):
        z = keras.layers.Dense(spec.width, kernel_initializer=initializer)(h)
        if spec.batch_norm:
            z = keras.layers.BatchNormalization()(z)
        z = keras.layers.Activation(spec.activation)(z)
        h = keras.layers.Add()([h, z]) if spec.residual and h.shape[-1] == spec.width else z
    outputs = keras.layers.Dense(10, kernel_initializer=initializer)(h)
    model = keras.Model(inputs, outputs)
    optimizer = keras.optimizers.SGD(learning_rate=spec.lr, global_clipnorm=spec.clip_norm)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    steps_per_epoch = -(-len(x_train) // BATCH_SIZE)  # Keras keeps the last partial batch
    epochs = max(1, round(steps / steps_per_epoch))
    callback = gradwatch.GradWatchCallback(on_finding="ignore", verbose=0)
    losses: list[float] = []

    class _Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            losses.append(float((logs or {}).get("loss", float("nan"))))
            progress.update(task, advance=1, loss=losses[-1])

    start = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task(label, total=epochs * steps_per_epoch, loss=float("nan"))
        model.fit(
            x_train,
            y_train,
            batch_size=BATCH_SIZE,
            epochs=epochs,
            verbose=0,
            callbacks=[callback, _Progress()],
        )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert callback.report is not None
    return RunResult(callback.report, float(accuracy), float(np.mean(losses[-20:])), seconds)

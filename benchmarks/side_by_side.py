"""gradwatch against its peers, side by side in one run (issue #16).

Run: ``OMP_NUM_THREADS=1 python benchmarks/side_by_side.py`` (CPU, one thread; the
``stacks`` tox env has transformers and Lightning; wandb joins when it imports and runs
offline). ``benchmarks/cuda_table.py`` prints the same tables on a GPU.

For each model every variant trains its own copy in the same process, interleaved after
warm-up, the order rotating each round (``benchmarks/_timing.py``); a round is 10 steps,
so it holds exactly one sampled step of gradwatch's default schedule. Ratios are medians
over rounds of each round's paired ratio to the unmonitored copy; a second unmonitored
copy (the A/A control) shows the run's noise floor. The last column of each table is
the time inside gradwatch's own hooks (instrumented, steps 60-260): on CPU the device
work is synchronous, so this is gradwatch's whole cost, free of model-to-model noise.

Targets: 12x512 MLP defaults <= 1.01x and every step <= 1.05x; 5,000 tensors defaults
<= 1.05x; GPT-2 (4 layers, 128 wide) and a ResNet-style CNN defaults <= 1.03x.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import interleaved_timing

# An extra directory for peers installed outside the environment (e.g. a --target
# install of wandb), appended so it never shadows the environment's own packages.
_EXTRA_PATH_ENV = "GRADWATCH_BENCH_EXTRA_PATH"


@dataclass(frozen=True)
class Case:
    title: str
    make_model: Callable[[Any], Any]  # device -> model
    make_batch: Callable[[Any], tuple[Any, Callable[[Any, Any], Any]]]  # -> (batch, loss)
    rounds: int
    setups: tuple[str, ...]


def _mlp(device: Any) -> Any:
    import torch

    layers: list[torch.nn.Module] = []
    for _ in range(12):
        layers += [torch.nn.Linear(512, 512), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(512, 10)).to(device)


def _many_tensors(device: Any) -> Any:
    import torch

    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(2500)]).to(device)


def _resnet(device: Any) -> Any:
    """A ResNet-style CNN in plain torch: stem, three stages of two basic blocks
    (16/32/64 channels, stride 2 between stages), global pooling, a linear head."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.skip: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.skip = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + self.skip(x))

    blocks: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*blocks).to(device)


def _gpt2(device: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    # An 8,192-token vocabulary: with GPT-2's 50,257 the LM head is most of a CPU step.
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=8192)
    return GPT2LMHeadModel(config).to(device)


def _classification(shape: tuple[int, ...]) -> Callable[[Any], tuple[Any, Any]]:
    def make(device: Any) -> tuple[Any, Any]:
        import torch

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=gen).to(device)
        y = torch.randint(0, 10, (shape[0],), generator=gen).to(device)

        def loss(model: Any, batch: Any) -> Any:
            return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

        return (x, y), loss

    return make


def _regression(shape: tuple[int, ...]) -> Callable[[Any], tuple[Any, Any]]:
    def make(device: Any) -> tuple[Any, Any]:
        import torch

        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)

        def loss(model: Any, batch: Any) -> Any:
            return model(batch).square().mean()

        return x, loss

    return make


def _tokens(device: Any) -> tuple[Any, Any]:
    import torch

    ids = torch.randint(0, 8192, (8, 64), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def loss(model: Any, batch: Any) -> Any:
        return model(input_ids=batch, labels=batch).loss

    return ids, loss


_PEERS = ("naive_item", "lightning_grad_norm", "detect_anomaly", "wandb_1", "wandb_100")
LABELS = {
    "none": "unmonitored again (A/A control)",
    "defaults": "gradwatch defaults",
    "every_step": "gradwatch every step (grads + activations)",
    "naive_item": "naive per-parameter .norm().item()",
    "lightning_grad_norm": "Lightning grad_norm(model, 2) every step",
    "detect_anomaly": "torch.autograd.detect_anomaly",
    "wandb_1": "wandb.watch(log='gradients', log_freq=1), offline",
    "wandb_100": "wandb.watch(log='gradients', log_freq=100), offline",
}


def cases(device: Any) -> list[Case]:
    out = [
        Case(
            "12x512 ReLU MLP, batch 128, SGD",
            _mlp,
            _classification((128, 512)),
            40,
            ("none", "defaults", "every_step", *_PEERS),
        ),
        Case(
            "ResNet-style CNN (6 basic blocks, 16-64 channels), batch 32 of 3x32x32, SGD",
            _resnet,
            _classification((32, 3, 32, 32)),
            30,
            ("none", "defaults", "every_step", *_PEERS),
        ),
    ]
    if importlib.util.find_spec("transformers") is not None:
        out.append(
            Case(
                "transformers GPT-2 (4 layers, 128 wide, vocab 8192), batch 8 x 64 tokens, AdamW",
                _gpt2,
                _tokens,
                20,
                ("none", "defaults", "every_step", *_PEERS),
            )
        )
    out.append(
        Case(
            "5,000 tensors (2,500 Linear(8, 8)), batch 16, SGD",
            _many_tensors,
            _regression((16, 8)),
            12,
            ("none", "defaults", "naive_item", "lightning_grad_norm"),
        )
    )
    return out


def _available(setup: str) -> bool:
    if setup.startswith("wandb"):
        return importlib.util.find_spec("wandb") is not None
    if setup == "lightning_grad_norm":
        return importlib.util.find_spec("lightning") is not None
    return True


def _make_step(case: Case, device: Any, setup: str) -> Callable[[], None]:
    """One training step of a fresh copy of the case's model under ``setup``."""
    import torch

    import gradwatch

    torch.manual_seed(0)
    model = case.make_model(device)
    batch, loss_fn = case.make_batch(device)
    if "GPT-2" in case.title:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    context: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext
    after_backward: Callable[[], None] = lambda: None  # noqa: E731
    if setup == "defaults":
        gradwatch.watch(model, opt, on_finding="ignore", show=False)
    elif setup == "every_step":
        every = gradwatch.every(1)
        gradwatch.watch(
            model,
            opt,
            grad_schedule=every,
            activation_schedule=every,
            on_finding="ignore",
            show=False,
        )
    elif setup == "naive_item":
        params = list(model.named_parameters())
        norms: dict[str, float] = {}

        def after_backward() -> None:
            for name, p in params:
                if p.grad is not None:
                    norms[name] = p.grad.norm().item()
    elif setup == "lightning_grad_norm":
        from lightning.pytorch.utilities import grad_norm

        logged: list[dict[str, Any]] = []

        def after_backward() -> None:  # as in on_before_optimizer_step, then self.log_dict
            logged[:] = [grad_norm(model, norm_type=2)]
    elif setup == "detect_anomaly":
        context = lambda: torch.autograd.detect_anomaly(check_nan=True)  # noqa: E731
    elif setup.startswith("wandb"):
        import wandb

        wandb.watch(model, log="gradients", log_freq=int(setup.split("_")[1]))

    def step() -> None:
        with context():
            loss = loss_fn(model, batch)
            loss.backward()
        after_backward()
        opt.step()
        opt.zero_grad()
        if device != "cpu":
            torch.cuda.synchronize()

    return step


def _instrumented_cost(case: Case, device: Any, setup: str, steps: int = 200) -> float:
    """Seconds per step inside gradwatch's hooks (every GateHook call and the optimizer
    step pre-hook, flushes and analysis included), after the dense start."""
    import torch
    from gradwatch.adapters.torch.clock import StepClock
    from gradwatch.adapters.torch.gate import GateHook

    spent = [0.0]
    originals = {GateHook: GateHook.__call__, StepClock: StepClock._on_optimizer_step}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if device != "cpu":
                    torch.cuda.synchronize()
                spent[0] += time.perf_counter() - start

        return wrapper

    GateHook.__call__ = timed(originals[GateHook])  # type: ignore[method-assign]
    StepClock._on_optimizer_step = timed(originals[StepClock])  # type: ignore[method-assign]
    try:
        step = _make_step(case, device, setup)
        for _ in range(60):  # past the dense start of the default schedule
            step()
        spent[0] = 0.0
        for _ in range(steps):
            step()
    finally:
        GateHook.__call__ = originals[GateHook]  # type: ignore[method-assign]
        StepClock._on_optimizer_step = originals[StepClock]  # type: ignore[method-assign]
    return spent[0] / steps


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _wandb_offline() -> None:
    import wandb

    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    run_dir = tempfile.mkdtemp(prefix="gradwatch-wandb-")
    wandb.init(mode="offline", project="gradwatch-side-by-side", dir=run_dir)


def _load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def tables(device: str = "cpu", *, quick: bool = False, only: str | None = None) -> Iterator[str]:
    """Markdown tables, one per model, as they are measured."""
    import torch
    from gradwatch.adapters.torch.native import wait_for_kernels

    torch.set_num_threads(1)
    if device == "cpu":
        wait_for_kernels(120)
    with _quiet():
        wandb_ok = importlib.util.find_spec("wandb") is not None
        if wandb_ok:
            try:
                _wandb_offline()
            except Exception as exc:  # offline wandb is a peer, not a requirement
                wandb_ok = False
                yield f"wandb did not start offline: {type(exc).__name__}: {exc}"
    missing = []
    for case in cases(device):
        if only is not None and only.lower() not in case.title.lower():
            continue
        setups = [s for s in case.setups if _available(s) and (wandb_ok or "wandb" not in s)]
        missing = sorted({LABELS[s] for s in case.setups if s not in setups})
        load_before = _load_average()
        start = time.perf_counter()
        with _quiet():
            variants = {"unmonitored": _make_step(case, device, "none")}
            for setup in setups:
                variants[LABELS[setup]] = _make_step(case, device, setup)
            rounds = max(6, case.rounds // 4) if quick else case.rounds
            timing = interleaved_timing(variants, warmup=60, rounds=rounds, reps=10)
            own = {
                setup: _instrumented_cost(case, device, setup)
                for setup in ("defaults", "every_step")
                if setup in setups
            }
        base = timing.medians["unmonitored"]
        lines = [
            f"### {case.title} ({device}, {torch.get_num_threads()} thread)",
            "",
            f"{rounds} interleaved rounds of 10 steps; load average (1/5/15 min) "
            f"{load_before} before, {_load_average()} after; {time.perf_counter() - start:.0f} s.",
            "",
            "| variant | median step (ms) | ratio | inside gradwatch (ms/step) |",
            "|---|---:|---:|---:|",
            f"| unmonitored | {base * 1e3:.2f} | 1.000 | |",
        ]
        for setup in setups:
            label = LABELS[setup]
            inside = f"{own[setup] * 1e3:.2f} ({own[setup] / base:.1%})" if setup in own else ""
            lines.append(
                f"| {label} | {timing.medians[label] * 1e3:.2f} | "
                f"{timing.ratios[label]:.3f} | {inside} |"
            )
        if missing:
            lines += ["", f"Not measured here (not installed): {', '.join(missing)}."]
        yield "\n".join(lines)


def main(argv: list[str] | None = None, device: str = "cpu") -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the rounds")
    parser.add_argument("--only", help="only the models whose title contains this")
    args = parser.parse_args(argv)
    extra = os.environ.get(_EXTRA_PATH_ENV)
    if extra:
        sys.path.append(extra)
    import platform

    import torch

    print(
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print()
    for table in tables(device, quick=args.quick, only=args.only):
        print(table, flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()

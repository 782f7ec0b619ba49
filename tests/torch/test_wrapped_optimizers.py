"""Plain ``gradwatch.watch(model, optimizer)`` with the optimizer wrappers of real stacks:
accelerate's ``AcceleratedOptimizer`` (a plain accelerate loop, and inside a Hugging Face
``TrainerCallback.on_train_begin``) and Lightning's ``LightningOptimizer``.

Needs the ``stacks`` env (accelerate, transformers, lightning); skipped elsewhere.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import EVERY_STEP, he_relu_mlp, record_stats  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.guard import GradwatchWarning  # noqa: E402


def _first_layer_norms(seen: list) -> list[float]:
    return [s.grad_norm[s.grad_layers.index("0.weight")] for s in seen if s.grad_layers]


def test_accelerate_loop_with_accumulation_watches_the_real_optimizer() -> None:
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = he_relu_mlp(depth=3, width=16)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    applied: list[float] = []  # recorded by the real optimizer's own hook, as it steps
    opt.optimizer.register_step_pre_hook(
        lambda o, a, k: applied.append(float(model[0].weight.grad.norm()))
    )
    gw = gradwatch.watch(
        model, opt, grad_schedule=EVERY_STEP, activation_schedule=EVERY_STEP, show=False
    )
    seen = record_stats(gw)
    data = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradwatchWarning)
        for _ in range(16):
            x, y = torch.randn(16, 32, generator=data), torch.randn(16, 1, generator=data)
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
                opt.step()
                opt.zero_grad()
        report = gw.report(show=False)
    assert gw.step_count == 8 == len(applied)  # one step per real (synced) step
    assert _first_layer_norms(seen) == pytest.approx(applied, rel=1e-5)
    assert report.healthy, report.findings
    gw.close()


def test_watch_in_hf_trainer_callback_on_train_begin_never_breaks_training(
    tmp_path: Path,
) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    watches: list[Any] = []

    class WatchOnBegin(transformers.TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            watches.append(gradwatch.watch(kw["model"], kw["optimizer"], show=False))

    class Regressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = he_relu_mlp(depth=2, width=16)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    data = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(96, 32, generator=data), torch.randn(96, 1, generator=data)
    dataset = [{"x": x, "labels": y} for x, y in zip(xs, ys, strict=True)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=Regressor(), args=args, train_dataset=dataset, callbacks=[WatchOnBegin()]
    )
    trainer.train()
    (gw,) = watches
    assert gw.enabled  # no internal error switched it off
    assert gw.step_count == 6
    gw.close()


def test_lightning_optimizer_is_unwrapped_and_warns_once_naming_the_callback() -> None:
    lightning = pytest.importorskip("lightning")
    torch.manual_seed(0)
    watches: list[Any] = []

    class Module(lightning.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = he_relu_mlp(depth=2, width=16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def on_train_start(self) -> None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                watches.append(gradwatch.watch(self, self.optimizers(), show=False))
            texts = [str(w.message) for w in caught if issubclass(w.category, GradwatchWarning)]
            assert len(texts) == 1 and "gradwatch.LightningCallback" in texts[0], texts

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.Generator().manual_seed(1)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(64, 32, generator=data), torch.randn(64, 1, generator=data)
    )
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(dataset, batch_size=8))
    (gw,) = watches
    report = gw.report(show=False)
    assert gw.enabled and gw.step_count == 4  # 8 batches, 2 per optimizer step
    # the closure's gradients are read: no step is taken for AMP-skipped without a scaler
    assert report.by_rule("nonfinite_gradient") is None
    gw.close()

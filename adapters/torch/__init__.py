"""PyTorch adapter: ``gradwatch.watch(model, optimizer)`` and nothing else changes.

It turns gradients and activation outputs into :class:`gradwatch.StepStats` and hands
them to a :class:`gradwatch.monitor.Monitor`. The per-step path stays on the device:
fused multi-tensor reductions, no ``.item()``, no Python branch on a tensor value; results
are copied to the host in one transfer every ``flush_every`` steps.

One module per part, each owning its state; :class:`TorchWatch` composes them:

* ``watch``: :func:`watch`, :class:`TorchWatch`, the default schedules;
* ``clock``: when a step ends (optimizer step, ``step(closure)``, backward pass, or
  ``gw.step()``), steps a ``GradScaler`` skipped, and parameters that changed;
* ``grads``: the watched parameters and their fused gradient reductions;
* ``activations``: activation sites, hooks and probes, attached only on sampled steps;
* ``flush``: the steps waiting on the device and the one host transfer;
* ``grad_reductions`` and ``reductions``: the gradient and activation reductions
  themselves; ``scratch``: their reused buffers; ``native`` (calls) and
  ``native_build`` (build, cache, verify): their one-pass C kernels on CPU float32;
  ``sharded``: FSDP2 / DTensor shards combined across ranks;
* ``gate``: when hooks run, and module hooks that copies and pickles leave out;
* ``wrappers``: DDP / torch.compile names; the optimizer under accelerate / Lightning
  wrappers.

Example:
    >>> import torch, gradwatch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gradwatch.watch(model, opt, show=False) as gw:
    ...     for _ in range(3):
    ...         model(torch.randn(16, 4)).pow(2).mean().backward()
    ...         opt.step()
    ...         opt.zero_grad()
    >>> gw.report(show=False).steps_observed
    3
"""

from __future__ import annotations

from gradwatch.adapters.torch.live import (
    LIVE_WATCHES as _LIVE_WATCHES,  # noqa: F401  (the lifecycle tests read it)
)
from gradwatch.adapters.torch.reductions import (
    SMALL_GRAD_NUMEL,
    activation_fractions,
    activation_reductions_on_device,
    activation_stats_on_device,
    grad_stats_on_device,
    unit_axis_of,
)
from gradwatch.adapters.torch.watch import (
    DEFAULT_ACTIVATION_SCHEDULE,
    DEFAULT_GRAD_SCHEDULE,
    DEFAULT_NORM_SCHEDULE,
    TorchWatch,
    watch,
)
from gradwatch.adapters.torch.wrappers import strip_wrapper_prefixes

from gradwatch.schedules import every

__all__ = [
    "DEFAULT_ACTIVATION_SCHEDULE",
    "DEFAULT_GRAD_SCHEDULE",
    "DEFAULT_NORM_SCHEDULE",
    "SMALL_GRAD_NUMEL",
    "TorchWatch",
    "activation_fractions",
    "activation_reductions_on_device",
    "activation_stats_on_device",
    "every",
    "grad_stats_on_device",
    "strip_wrapper_prefixes",
    "unit_axis_of",
    "watch",
]

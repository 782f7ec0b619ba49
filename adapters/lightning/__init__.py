"""Lightning: ``lightning.Trainer(callbacks=[gradwatch.LightningCallback()])``.

:class:`LightningCallback` only says when a step happens; the torch adapter does the rest.

When: Lightning runs the closure (forward, backward) inside ``optimizer.step(closure)``;
the precision plugin's ``_after_closure`` then calls the callbacks'
``on_before_optimizer_step``, and only after that ``_clip_gradients``
(``lightning/pytorch/plugins/precision/precision.py``; the AMP plugin unscales before
``_after_closure``, ``precision/amp.py``). So at ``on_before_optimizer_step`` the
gradients are accumulated over ``accumulate_grad_batches``, unscaled, and not yet
clipped: one optimizer step is one gradwatch step.
"""

from gradwatch.adapters.lightning.callback import LightningCallback

__all__ = ["LightningCallback"]

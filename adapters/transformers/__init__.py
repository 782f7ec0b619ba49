"""Hugging Face Trainer: ``Trainer(..., callbacks=[gradwatch.HFTrainerCallback()])``.

:class:`HFTrainerCallback` only says when a step happens; the torch adapter does the rest.

When: on the last micro-batch of an accumulation window, ``Trainer._inner_training_loop``
clips (``accelerator.clip_grad_norm_``, which first unscales AMP gradients, or the same
call with ``max_norm=inf`` to log the norm when ``max_grad_norm`` is 0) and only then calls
``on_pre_optimizer_step``; no callback event falls between the last backward pass and the
clip (transformers 5.24, ``trainer.py``). So for the length of training the callback wraps
the accelerator's ``unscale_gradients`` and ``clip_grad_norm_`` (:mod:`.clip`): the step is
taken inside the clip call, once the gradients are unscaled, before they are clipped.
Where that clip call never comes (DeepSpeed clips inside its engine), the step is taken at
``on_pre_optimizer_step`` and the report says the gradients may be clipped.
"""

from gradwatch.adapters.transformers.callback import HFTrainerCallback

__all__ = ["HFTrainerCallback"]

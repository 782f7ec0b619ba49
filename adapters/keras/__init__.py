"""The Keras 3 adapter: :class:`GradWatchCallback`, a ``model.fit`` callback.

A Keras callback is never handed gradients, and recomputing them on a side batch
(the usual workaround) would watch a different signal from the one that trains the
model. Instead, for the duration of ``fit`` the callback:

* wraps the ``apply`` of ``model.optimizer`` and of every optimizer the model holds
  as an attribute (a custom ``train_step``'s, such as a GAN's; instance attributes,
  removed after ``fit``) so that *inside the compiled train step* the per-variable
  statistics of the very gradients being applied are reduced with ``keras.ops`` and
  written into a small ring of non-trainable variables owned by the callback;
* wraps the ``call`` of every activation layer (Dense/Conv with an activation,
  ``Activation``, ``ReLU``, ``LeakyReLU``, ``PReLU``, ``ELU``, ``Softmax``) so that
  its output is remembered during the traced step and, on sampled steps, reduced to
  inactive/dead/tail fractions in the same conditional branch as the gradients;
* reads the ring every ``flush_every`` batches in ``on_train_batch_end`` (one host
  transfer per ring) and hands :class:`gradwatch.StepStats` to its
  :class:`gradwatch.monitor.Monitor`.

On the JAX backend the train step is pure, so the ring travels as optimizer state
and ``optimizer.stateless_apply`` is wrapped instead.

Modules:

* :mod:`~gradwatch.adapters.keras.callback`: the callback's lifecycle;
* :mod:`~gradwatch.adapters.keras.lifecycle`: the ``fit`` the patches belong to (a
  ``fit`` that died leaves nothing behind) and the optimizers they patch;
* :mod:`~gradwatch.adapters.keras.reader`: the host side, rings to ``StepStats``;
* :mod:`~gradwatch.adapters.keras.capture`: the patches, TensorFlow and torch path;
* :mod:`~gradwatch.adapters.keras.capture_jax`: the patches, JAX path;
* :mod:`~gradwatch.adapters.keras.probe`: the ring variables and one sample's write;
* :mod:`~gradwatch.adapters.keras.reductions`: the in-graph ``keras.ops`` reductions;
* :mod:`~gradwatch.adapters.keras.layers`: layer discovery and naming.
"""

from __future__ import annotations

from gradwatch.adapters.keras.callback import GradWatchCallback

__all__ = ["GradWatchCallback"]

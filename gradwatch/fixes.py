"""The catalogue of fixes gradwatch recommends, each with its PyTorch and Keras spelling.

Rules pick fixes from :data:`FIXES` and order them by the evidence. A fix may be
specialised with numbers from the run (``gradient_clipping`` carries a suggested
max-norm). A :class:`Fix` keeps both spellings; :meth:`Fix.spelled` picks the one of
the framework a report came from (``text`` alone shows both, for a framework-free run).

Example:
    >>> from gradwatch.fixes import fix
    >>> fix("he_init").id
    'he_init'
    >>> fix("batch_norm").spelled("keras").text
    'Add batch normalization before each hidden activation: keras.layers.BatchNormalization().'
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Fix:
    """One concrete change. ``id`` is stable (see the API contract); ``text`` is one line.

    ``torch`` and ``keras`` hold the text in one framework's spelling only (empty when
    the fix reads the same everywhere); they are not part of equality or of a saved
    report, which keeps the text it was rendered with.
    """

    id: str
    text: str
    torch: str = field(default="", compare=False, repr=False)
    keras: str = field(default="", compare=False, repr=False)

    def spelled(self, framework: str | None) -> Fix:
        """This fix as a report of ``framework`` (``"torch"``, ``"keras"``) shows it;
        ``None`` or an unknown framework keeps both spellings."""
        text = {"torch": self.torch, "keras": self.keras}.get(framework or "", "")
        return Fix(self.id, text) if text else self


FRAMEWORKS = ("torch", "keras")


def _entry(lead: str, torch: str, keras: str, tail: str = ".") -> tuple[str, str, str]:
    """Combined, torch and Keras texts of one catalogue entry: ``lead: torch / keras``."""
    return (
        f"{lead}: {torch} / {keras}{tail}",
        f"{lead}: {torch}{tail}",
        f"{lead}: {keras}{tail}",
    )


# id -> (both spellings, torch only, Keras only).
_SPELLINGS: dict[str, tuple[str, str, str]] = {
    "he_init": _entry(
        "Use He (Kaiming) initialization for ReLU-family layers",
        "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')",
        'kernel_initializer="he_normal"',
    ),
    # When the activation is unknown: no text may assume which one it is.
    "init_for_activation": _entry(
        "Initialize each layer for the activation after it: He (Kaiming) for ReLU-family, "
        "Xavier (Glorot) for sigmoid/tanh",
        "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu') or "
        "nn.init.xavier_uniform_(layer.weight)",
        'kernel_initializer="he_normal" or "glorot_uniform"',
    ),
    "xavier_init": _entry(
        "Use Xavier (Glorot) initialization for sigmoid/tanh layers",
        "nn.init.xavier_uniform_(layer.weight)",
        'kernel_initializer="glorot_uniform" (the Keras default)',
    ),
    "leaky_relu": _entry(
        "Replace sigmoid/tanh/ReLU hidden activations with leaky ReLU, with He init",
        "nn.LeakyReLU(0.01) + nn.init.kaiming_normal_",
        'activation="leaky_relu", kernel_initializer="he_normal"',
    ),
    "relu": _entry(
        "Replace sigmoid/tanh hidden activations with ReLU",
        "nn.ReLU()",
        'activation="relu"',
        " (keep sigmoid/softmax only on the output).",
    ),
    "batch_norm": _entry(
        "Add batch normalization before each hidden activation",
        "nn.BatchNorm1d(width) or nn.BatchNorm2d(channels)",
        "keras.layers.BatchNormalization()",
    ),
    "residual": _entry(
        "Add residual (skip) connections so gradients bypass deep stacks",
        "return x + block(x)",
        "keras.layers.Add()([x, block(x)])",
    ),
    "gradient_clipping": _entry(
        "Clip the global gradient norm",
        "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0) before optimizer.step()",
        "keras.optimizers.SGD(..., global_clipnorm=1.0)",
    ),
    "lower_learning_rate": _entry(
        "Lower the learning rate about 10x (or add warm-up)",
        "for g in optimizer.param_groups: g['lr'] /= 10",
        "model.optimizer.learning_rate = lr / 10",
    ),
    "normalize_inputs": _entry(
        "Standardize the inputs to zero mean and unit variance",
        "x = (x - mean) / std in your Dataset",
        "keras.layers.Normalization() as the first layer",
    ),
    "stable_loss": (
        "Make the loss numerically stable: compute it from logits "
        "(nn.BCEWithLogitsLoss, nn.CrossEntropyLoss / from_logits=True) and guard "
        "log, sqrt and division with an epsilon.",
        "Make the loss numerically stable: compute it from logits "
        "(nn.BCEWithLogitsLoss, nn.CrossEntropyLoss) and guard "
        "log, sqrt and division with an epsilon.",
        "Make the loss numerically stable: compute it from logits "
        "(from_logits=True) and guard log, sqrt and division with an epsilon.",
    ),
    "output_activation": (
        "Give the output layer no ReLU or clamp: the loss must see raw logits "
        "(nn.Linear as the last layer, the loss applies its own sigmoid/softmax) / "
        "the last Dense with activation=None and from_logits=True.",
        "Give the output layer no ReLU or clamp: the loss must see raw logits "
        "(nn.Linear as the last layer, the loss applies its own sigmoid/softmax).",
        "Give the output layer no ReLU or clamp: the loss must see raw logits "
        "(the last Dense with activation=None and from_logits=True).",
    ),
    "bias_init": _entry(
        "Re-initialize the biases near zero: a large bias pins units in their flat "
        "or zero region from the first step",
        "nn.init.zeros_(layer.bias)",
        'bias_initializer="zeros" (the Keras default)',
    ),
    "stable_activation": _entry(
        "Replace the activation that overflows in the forward pass (exp, unbounded "
        "powers) with a bounded or log-space one, or clamp its input",
        "torch.clamp(z, max=20) before torch.exp, or F.softplus / torch.logsumexp",
        "ops.clip(z, -20, 20) before ops.exp, or ops.softplus / ops.logsumexp",
    ),
    "gated_recurrence": _entry(
        "Replace the plain RNN with a gated one (LSTM or GRU), or truncate "
        "backpropagation through time to fewer steps",
        "nn.LSTM(...) or nn.GRU(...) in place of nn.RNN(...)",
        "keras.layers.LSTM(...) or keras.layers.GRU(...) in place of SimpleRNN(...)",
    ),
    "connected_graph": _entry(
        "Keep the loss connected to the weights",
        "no .detach(), .item(), .numpy() or torch.no_grad() between the parameters and the loss",
        "no ops.stop_gradient or numpy in the model or the loss",
    ),
    "loss_depends_on_params": (
        "Check that the loss is computed from the model's output on this batch, not from "
        "constants, labels alone or a stale tensor.",
        "",
        "",
    ),
}

FIXES: dict[str, str] = {fid: texts[0] for fid, texts in _SPELLINGS.items()}


def fix(fix_id: str) -> Fix:
    """The catalogue entry for ``fix_id``; ``KeyError`` if there is none."""
    both, torch, keras = _SPELLINGS[fix_id]
    return Fix(fix_id, both, torch, keras)


def clipping_fix(max_norm: float, calibrated: bool) -> Fix:
    """``gradient_clipping`` with a suggested max-norm from the run's own norms."""
    shown = f"{max_norm:.3g}"
    why = (
        "twice the gradient norm of the first, healthy steps"
        if calibrated
        else "a common default; no healthy steps were seen to calibrate on"
    )
    both, torch, keras = _entry(
        f"Clip the global gradient norm at {shown} ({why})",
        f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={shown}) before "
        f"optimizer.step()",
        f"keras.optimizers.SGD(..., global_clipnorm={shown})",
    )
    return Fix("gradient_clipping", both, torch, keras)


def fixes(*fix_ids: str) -> tuple[Fix, ...]:
    """Catalogue entries in the given order, duplicates dropped."""
    seen: dict[str, Fix] = {}
    for fid in fix_ids:
        if fid not in seen:
            seen[fid] = fix(fid)
    return tuple(seen.values())

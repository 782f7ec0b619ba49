"""The one data type that crosses the adapter-to-core boundary: :class:`StepStats`.

Adapters reduce framework tensors on their device and hand the analyzer one
``StepStats`` per step. It holds plain floats, ints and strings, never tensors, so
rules, analyzer and report are tested by building it by hand.

The layout is "struct of tuples": ``grad_layers[i]`` is described by
``grad_norm[i]``, ``grad_max_abs[i]`` and so on. Layers are listed in model order,
first (input side) to last (output side).

Example:
    >>> from gradwatch import StepStats
    >>> s = StepStats(step=0, grad_layers=("fc1.weight",), grad_norm=(0.5,),
    ...               grad_max_abs=(0.1,), grad_mean_abs=(0.01,),
    ...               grad_zero_frac=(0.0,), grad_nonfinite=(0,), grad_numel=(100,))
    >>> s.grad_norm[0]
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from gradwatch.activations import ActivationKind

_GRAD_FIELDS = (
    "grad_norm",
    "grad_max_abs",
    "grad_mean_abs",
    "grad_zero_frac",
    "grad_nonfinite",
    "grad_numel",
)
_ACT_FIELDS = ("act_kinds", "act_inactive_frac", "act_dead_frac", "act_tail_frac", "act_is_output")
# Fields of the act family an adapter may leave empty (older adapters, hand-built stats).
_ACT_OPTIONAL = ("act_nonfinite",)
_TIME_FIELDS = ("time_grad_first", "time_grad_last", "time_length")


@dataclass(frozen=True, slots=True)
class StepStats:
    """Per-layer gradient (and optionally activation) statistics of one training step.

    Gradient fields, one entry per parameter tensor in ``grad_layers``:
        grad_norm: L2 norm over the finite entries. An adapter that cannot afford
            that may pass NaN or Inf when ``grad_nonfinite > 0``; the analyzer then
            treats the norm as unknown for that step.
        grad_max_abs: max |g| over the finite entries.
        grad_mean_abs: mean |g| over all entries (non-finite ones count as 0; an
            adapter may pass Inf/NaN when ``grad_nonfinite > 0``).
        grad_zero_frac: fraction of entries that are exactly 0 (NaN, unknown, when
            the adapter cannot count it next to non-finite entries).
        grad_nonfinite: number of NaN or Inf entries, or a lower bound of it (the
            adapters pass 1 for a large tensor with any).
        grad_numel: number of entries.
        param_norm: optional, the L2 norm of each parameter itself (empty when the
            adapter does not provide it); lets rules compare a gradient with the
            weights it updates.

    Activation fields, one entry per activation layer in ``act_layers``:
        act_kinds: an :class:`~gradwatch.activations.ActivationKind` value, e.g. ``"relu"``.
        act_inactive_frac: fraction of outputs in the zero-gradient region (ReLU: ``<= 0``).
        act_dead_frac: fraction of units (features/channels) inactive for every sample
            of the batch.
        act_tail_frac: fraction of outputs in the flat tails (see
            :func:`gradwatch.activations.tail_bounds`).
        act_is_output: whether this activation produces the model's output.
        act_nonfinite: optional, the number of NaN/Inf entries of the output (of the
            input, for the kinds judged on it), or empty when the adapter does not count
            them. A NaN entry is neither inactive nor in a tail in the fractions above,
            which an adapter may give as NaN when no entry is finite.

    Through-time fields, one entry per recurrent layer in ``time_layers`` (an RNN, LSTM
    or GRU layer, named like its parameters' group), from sampled steps:
        time_grad_first: RMS over batch and features of the loss gradient that reached
            the start of the sequence: with respect to the layer's input at its first
            time step (torch adapter), or its initial state (Keras callback).
        time_grad_last: the same at the other end: with respect to the input at its last
            time step (torch), or the output of the last processed step (Keras). A ratio
            first/last far below 1 means the gradient vanishes through time, even when
            every parameter's norm looks normal.
        time_length: the number of time steps of the sequence (with a mask, the mean
            number of real steps).

    ``grad_total_norm`` is the L2 norm over all gradients, for steps whose per-layer
    statistics were not sampled: adapters can afford one fused norm every step, so
    growth, spikes and NaN between samples are still seen. ``None`` when not given
    (with per-layer statistics the analyzer computes it itself).

    ``skipped_step`` marks an optimizer step that was skipped because the gradients
    were not finite (e.g. ``torch.amp.GradScaler`` found Inf/NaN). Such a step may
    carry no gradient fields at all.

    All tuples of one family must have the same length; a ``ValueError`` says which
    does not.
    """

    step: int
    grad_layers: tuple[str, ...] = ()
    grad_norm: tuple[float, ...] = ()
    grad_max_abs: tuple[float, ...] = ()
    grad_mean_abs: tuple[float, ...] = ()
    grad_zero_frac: tuple[float, ...] = ()
    grad_nonfinite: tuple[int, ...] = ()
    grad_numel: tuple[int, ...] = ()
    param_norm: tuple[float, ...] = ()
    act_layers: tuple[str, ...] = ()
    act_kinds: tuple[str, ...] = ()
    act_inactive_frac: tuple[float, ...] = ()
    act_dead_frac: tuple[float, ...] = ()
    act_tail_frac: tuple[float, ...] = ()
    act_is_output: tuple[bool, ...] = ()
    act_nonfinite: tuple[int, ...] = ()
    time_layers: tuple[str, ...] = ()
    time_grad_first: tuple[float, ...] = ()
    time_grad_last: tuple[float, ...] = ()
    time_length: tuple[int, ...] = ()
    grad_total_norm: float | None = None
    skipped_step: bool = False

    def __post_init__(self) -> None:
        self._check_family("grad_layers", _GRAD_FIELDS)
        n_grad = len(self.grad_layers)
        if self.param_norm and len(self.param_norm) != n_grad:
            raise ValueError(
                f"StepStats.param_norm has {len(self.param_norm)} entries, "
                f"grad_layers has {n_grad} (or leave it empty)"
            )
        self._check_family("act_layers", _ACT_FIELDS, _ACT_OPTIONAL)
        self._check_family("time_layers", _TIME_FIELDS)
        known = {k.value for k in ActivationKind}
        for kind in self.act_kinds:
            if kind not in known:
                raise ValueError(
                    f"StepStats.act_kinds has unknown kind {kind!r}; "
                    f"expected one of {sorted(known)}"
                )

    def _check_family(
        self, layers: str, names: tuple[str, ...], optional: tuple[str, ...] = ()
    ) -> None:
        """Every field in ``names`` has one entry per name in the ``layers`` field, and
        every field in ``optional`` as many or none."""
        n = len(getattr(self, layers))
        for name in names + optional:
            size = len(getattr(self, name))
            if size != n and not (name in optional and size == 0):
                empty = " (or leave it empty)" if name in optional else ""
                raise ValueError(f"StepStats.{name} has {size} entries, {layers} has {n}{empty}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """All field names, in declaration order."""
        return tuple(f.name for f in fields(cls))

"""Where a run's first NaN/Inf gradient came from: :class:`NonfiniteOnset`.

At the first step whose gradients are NaN/Inf the weights are still finite (no earlier
non-finite gradient reached them; weights that start non-finite are not considered), so
that step's forward pass tells where the NaN was born: an activation output that is
already NaN/Inf means the forward pass made it (an ``exp`` overflowing float32); all
activation outputs finite means the loss or the backward pass did (``log(0)``,
``sqrt(0)``). Later steps run on NaN weights and tell
nothing. :class:`~gradwatch.run_statistics.RunStatistics` keeps the onset for the whole
run, so the ranking does not change when the step leaves the window.

Example:
    >>> from gradwatch import StepStats
    >>> s = StepStats(step=22, act_layers=("1#exp:0",), act_kinds=("exp",),
    ...               act_inactive_frac=(0.0,), act_dead_frac=(0.0,), act_tail_frac=(0.0,),
    ...               act_is_output=(False,), act_nonfinite=(7,))
    >>> onset_of(s).overflowed
    ('1#exp:0',)
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.activations import CAN_OVERFLOW
from gradwatch.stats import StepStats


@dataclass(frozen=True)
class NonfiniteOnset:
    """The run's first step with NaN/Inf gradients, and what its forward pass showed.

    Attributes:
        step: the step.
        activations_counted: the adapter counted the NaN/Inf entries of activation
            outputs at that step (it was sampled, and the adapter counts them).
        sites: the activation sites with NaN/Inf entries at that step, in the adapter's
            order (the order of the forward pass).
        kinds: the kind of each of ``sites``.
        entries: the number of NaN/Inf entries of each of ``sites``.
    """

    step: int
    activations_counted: bool = False
    sites: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    entries: tuple[int, ...] = ()

    @property
    def forward_born(self) -> bool:
        """An activation output was NaN/Inf at the onset, while the weights were finite."""
        return self.activations_counted and bool(self.sites)

    @property
    def overflowed(self) -> tuple[str, ...]:
        """The sites of :attr:`forward_born` whose kind can turn a finite input into
        NaN/Inf (:data:`~gradwatch.activations.CAN_OVERFLOW`: ``exp``, unknown kinds).
        A ReLU, tanh or GELU output is NaN/Inf only when its input was: the layer before
        it overflowed, not the activation."""
        if not self.forward_born:
            return ()
        return tuple(
            site for site, kind in zip(self.sites, self.kinds, strict=True) if kind in CAN_OVERFLOW
        )

    def kind_of(self, site: str) -> str:
        """The kind of ``site``, one of :attr:`sites`."""
        return self.kinds[self.sites.index(site)]


def onset_of(s: StepStats) -> NonfiniteOnset:
    """The :class:`NonfiniteOnset` of step ``s``, the run's first with NaN/Inf gradients."""
    counted = bool(s.act_layers) and len(s.act_nonfinite) == len(s.act_layers)
    bad = [i for i, n in enumerate(s.act_nonfinite) if n > 0] if counted else []
    return NonfiniteOnset(
        step=int(s.step),
        activations_counted=counted,
        sites=tuple(s.act_layers[i] for i in bad),
        kinds=tuple(s.act_kinds[i] for i in bad),
        entries=tuple(int(s.act_nonfinite[i]) for i in bad),
    )


__all__ = ["NonfiniteOnset", "onset_of"]

"""Property tests: hostile arrays never crash the analyzer, memory stays bounded."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import activation_kinds, gradient_arrays, layer_names

from gradwatch import Analyzer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.dictionaries(layer_names, gradient_arrays, max_size=4),
            st.dictionaries(layer_names, st.tuples(gradient_arrays, activation_kinds), max_size=3),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_hostile_arrays_never_raise(steps):
    an = Analyzer(strict=True)  # strict: any internal error fails the test
    with np.errstate(all="ignore"):
        for step, (grads, acts) in enumerate(steps):
            an.observe(step, grads=grads, activations=acts)
        report = an.report()
    assert report.steps_observed == len(steps)
    report.render()
    report.to_json()


@settings(max_examples=5, deadline=None)
@given(n_layers=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_memory_does_not_grow_with_run_length(n_layers, seed):
    rng = np.random.default_rng(seed)
    an = Analyzer(strict=True, check_every=25)
    grads = {f"l{i}.w": rng.normal(size=4) for i in range(n_layers)}
    for step in range(300):
        an.observe(step, grads=grads)
    before = an.nbytes()
    for step in range(300, 900):
        an.observe(step, grads=grads)
    assert an.nbytes() == before

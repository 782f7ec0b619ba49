"""Hypothesis strategies shared by the property tests (attrs' convention)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# Floats a real gradient can hold, including the ones that break naive code.
hostile_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-308, 1e308, -1e308]),
)

gradient_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    elements=hostile_floats,
)

layer_names = st.text(
    alphabet=st.characters(categories=("L", "N"), include_characters="._/"),
    min_size=1,
    max_size=12,
)

activation_kinds = st.sampled_from(
    [
        "relu",
        "ReLU",
        "sigmoid",
        "tanh",
        "hardtanh",
        "hard_sigmoid",
        "relu6",
        "gelu",
        "softmax",
        "mystery",
    ]
)

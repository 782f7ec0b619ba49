"""The in-graph reductions on hostile tensors (issues #18, #12): a NaN activation is
never inactive nor in a tail, whatever relu(NaN) returns on the machine; a NaN
gradient is flagged whatever the max kernel does with NaN; unknown shapes work."""

from __future__ import annotations

import math

import pytest

keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
from gradwatch.adapters.keras.reductions import (  # noqa: E402
    _activation_row,
    _grad_row,
    _one_hot_rows_where,
)
from keras import ops  # noqa: E402

from gradwatch.activations import activation_stats_from_array, nonfinite_entries  # noqa: E402

NAN = math.nan
BACKEND = keras.backend.backend()


def _row(y, kind, axis=-1):
    out = _activation_row(ops.convert_to_tensor(np.asarray(y, "float32")), kind, axis, 0.01)
    return ops.convert_to_numpy(out).tolist()


def test_a_nan_activation_is_never_inactive_nor_dead() -> None:
    # Unit 0 is NaN everywhere (unknown), unit 1 is zero everywhere (dead), unit 2 lives.
    y = [[NAN, 0.0, 1.0], [NAN, 0.0, 2.0]]
    inactive, dead, tail, nonfinite = _row(y, "relu")
    assert inactive == pytest.approx(2 / 4)  # of the finite outputs
    assert dead == pytest.approx(1 / 2)  # of the units with finite outputs
    assert tail == 0.0
    assert nonfinite == 2.0 == nonfinite_entries(y)


def test_an_all_nan_activation_is_unknown_not_dead() -> None:
    for kind in ("relu", "relu6", "leaky_relu", "sigmoid", "tanh", "exp"):
        *fractions, nonfinite = _row(np.full((4, 3), NAN), kind)
        assert all(math.isnan(v) for v in fractions), (kind, fractions)
        assert nonfinite == 12.0  # seen, with every entry NaN


def test_an_overflowed_exp_counts_its_inf_entries() -> None:
    z = np.array([[100.0, 0.0, 88.0], [89.0, -5.0, 1.0]], "float32")
    *_, nonfinite = _row(ops.exp(ops.convert_to_tensor(z)), "exp")
    with np.errstate(over="ignore"):
        assert nonfinite == 2.0 == nonfinite_entries(np.exp(z))  # exp(88) < 3.4e38 < exp(89)


def test_inf_is_neither_inactive_nor_in_a_tail() -> None:
    inactive, _, _, nonfinite = _row([[-math.inf, 0.0], [-math.inf, 1.0]], "leaky_relu")
    assert inactive == pytest.approx(1 / 2)
    assert nonfinite == 2.0
    _, _, tail, _ = _row([[NAN, math.inf], [0.5, 0.99999]], "sigmoid")
    assert tail == pytest.approx(1 / 2)  # 0.99999 of the finite outputs 0.5 and 0.99999


@pytest.mark.parametrize("kind", ["relu", "relu6", "sigmoid", "tanh", "leaky_relu", "elu"])
def test_finite_outputs_match_the_host_reference(kind) -> None:
    y = np.random.default_rng(0).normal(size=(8, 5, 6)).astype("float32") * 3
    y[:, :, 2] = -1.0  # one dead unit
    row = _row(y, kind)
    np.testing.assert_allclose(row[:3], activation_stats_from_array(y, kind, -1, 0.01), atol=1e-6)
    assert row[3] == 0.0


def test_a_nan_gradient_is_flagged_and_counted_whatever_max_does() -> None:
    g = np.array([[1.0, NAN], [3.0, -4.0]], "float32")
    norm, _, sum_abs, _, nonfinite, numel = ops.convert_to_numpy(
        _grad_row(ops.convert_to_tensor(g))
    ).tolist()
    assert nonfinite == 1.0
    assert math.isnan(norm) and math.isnan(sum_abs)
    assert numel == 4.0
    finite = ops.convert_to_numpy(_grad_row(ops.convert_to_tensor(np.array([3.0, 4.0, 0.0]))))
    np.testing.assert_allclose(finite, [5.0, 4.0, 7.0, 2.0, 0.0, 3.0])


def test_writing_rows_of_one_slot_leaves_the_others() -> None:
    old = np.zeros((3, 5, 2), "float32")
    new = ops.convert_to_numpy(
        _one_hot_rows_where(1, 3, 2, ops.ones((2, 2), "float32"), ops.convert_to_tensor(old))
    )
    expected = old.copy()
    expected[1, 2:4] = 1.0
    np.testing.assert_array_equal(new, expected)


tf = pytest.importorskip("tensorflow") if BACKEND == "tensorflow" else None


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function and IndexedSlices are TF's")
def test_unknown_shapes_and_indexed_slices_inside_tf_function() -> None:
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(7, 3)).astype("float32")

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.float32)])
    def reduce(x):
        return _grad_row(x), _activation_row(tf.nn.relu(x), "relu", -1, 0.01)

    grad, act = reduce(tf.constant(dense))
    expected = [
        np.linalg.norm(dense),
        np.abs(dense).max(),
        np.abs(dense).sum(),
        np.count_nonzero(dense),
        0.0,
        dense.size,
    ]
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        act.numpy()[:3], activation_stats_from_array(np.maximum(dense, 0), "relu"), atol=1e-6
    )
    assert act.numpy()[3] == 0.0

    # An Embedding's gradient: rows 1 and 4 looked up, row 1 twice (summed).
    values = rng.normal(size=(3, 3)).astype("float32")
    indices = tf.constant([1, 4, 1])

    @tf.function
    def sparse(values):
        return _grad_row(tf.IndexedSlices(values, indices, tf.shape(tf.zeros((6, 3)))))

    reference = tf.convert_to_tensor(tf.IndexedSlices(values, indices, [6, 3])).numpy()
    got = sparse(tf.constant(values)).numpy()
    np.testing.assert_allclose(
        got,
        [
            np.linalg.norm(reference),
            np.abs(reference).max(),
            np.abs(reference).sum(),
            np.count_nonzero(reference),
            0.0,
            reference.size,
        ],
        rtol=1e-5,
    )

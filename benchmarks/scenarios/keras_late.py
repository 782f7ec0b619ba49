"""Keras 3 scenarios whose pathology starts late, between the callback's samples.

A run healthy for 150 steps whose learning-rate schedule then jumps 50x: the total
gradient norm grows ~10x per step and turns NaN within 10 steps, all of it between
two of the callback's per-layer samples (every 8th step after the dense start). Its
twin runs the schedule as meant (a 10x decay at the same step) and stays healthy.
Both are ``model.fit`` runs of :class:`benchmarks.scenarios.keras_zoo.KerasRun`.

Labels are measured without gradwatch: :func:`measure_late` trains each run with a
plain ``tf.GradientTape`` loop over the same batches (``keras_zoo.measure_keras``)
for all of its steps, and judges the 50 steps from the onset.

    KERAS_BACKEND=tensorflow python -m benchmarks.scenarios.keras_late
"""

from __future__ import annotations

import math
from typing import Any

import keras

from benchmarks.scenarios import HEALTHY, Scenario
from benchmarks.scenarios.keras_zoo import BATCH, KerasRun, _mlp, _run, _seed

# The step at which the schedule changes the learning rate.
ONSET = 150
_BASE_LR = 0.02
_EPOCHS = 3  # digits, batch 32: 3 x 57 = 171 steps, 21 of them after the onset


def _schedule_run(after: float) -> KerasRun:
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([ONSET], [_BASE_LR, after])
    model = _mlp([128] * 4, "relu", kernel_initializer="he_normal")
    return _run(model, keras.optimizers.SGD(schedule, momentum=0.9), epochs=_EPOCHS)


def exploding_late_lr_jump(seed: int) -> KerasRun:
    """He ReLU MLP, SGD momentum 0.9: lr 0.02, then 1.0 from step 150 (a restart 50x
    too high)."""
    _seed(seed)
    return _schedule_run(1.0)


def healthy_late_lr_decay(seed: int) -> KerasRun:
    """The same run with the schedule as meant: lr 0.02, then 0.002 from step 150."""
    _seed(seed)
    return _schedule_run(0.002)


_STEPS = _EPOCHS * math.ceil(1797 / BATCH)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "exploding_late_lr_jump",
        "keras",
        frozenset({"exploding_gradient", "nonfinite_gradient"}),
        exploding_late_lr_jump,
        _STEPS,
        "He ReLU MLP, lr 0.02 -> 1.0 at step 150",
        onset=ONSET,
        fast=False,
    ),
    Scenario(
        "healthy_late_lr_decay",
        "keras",
        HEALTHY,
        healthy_late_lr_decay,
        _STEPS,
        "same MLP, lr 0.02 -> 0.002 at step 150",
        onset=ONSET,
        fast=False,
    ),
)


def measure_late(scn: Scenario, seed: int = 0) -> dict[str, Any]:
    """``keras_zoo.measure_keras`` over all ``scn.steps`` steps (it measures the first
    120 by default, before these scenarios' onset): plain ``tf.GradientTape``."""
    from benchmarks.scenarios import keras_zoo

    budget = keras_zoo.MEASURE_STEPS
    keras_zoo.MEASURE_STEPS = scn.steps
    try:
        return keras_zoo.measure_keras(scn, seed)
    finally:
        keras_zoo.MEASURE_STEPS = budget


def main() -> None:
    from benchmarks.verify_labels import HEADER, row

    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for scn in SCENARIOS:
        print(row(scn, measure_late(scn))[0])


if __name__ == "__main__":
    main()

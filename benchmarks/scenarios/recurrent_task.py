"""The task the recurrent scenarios of both frameworks share (no framework imported).

Read a sequence of ``FEATURES``-feature vectors (N(0, 1)) and say whether the first
feature summed over its last ``LABEL_STEPS`` steps is positive: many-to-one, the layer's
last output, then a two-class head. See ``torch_recurrent.py`` and ``keras_recurrent.py``.
"""

from __future__ import annotations

FEATURES = 4
HIDDEN = 32
BATCH = 32
# The label depends on this many last steps: a gated layer learns it in ~100 steps.
LABEL_STEPS = 20
LONG, SHORT = 200, 10
# The label check's judged steps (after gradwatch's warm-up of 10) and its threshold
# (VanishingGradientRule.time_ratio_threshold).
JUDGED = range(10, 60)
RATIO_THRESHOLD = 1e-5

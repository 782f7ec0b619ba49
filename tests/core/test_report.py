"""Report: exact console rendering at 80 columns, JSON round trip, plot."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from gradwatch import Finding, Fix, LayerSummary, Report
from gradwatch.report import FlowHistory


def sample_report() -> Report:
    return Report(
        findings=(
            Finding(
                rule="vanishing_gradient",
                severity="warning",
                layers=("fc1",),
                first_step=10,
                last_step=99,
                message="The first layers (fc1) receive 1.0e-05 of the last layer's gradient norm.",
                evidence={"first_last_norm_ratio": 1e-05, "first_layer_norm": 2e-06},
                fixes=(Fix("leaky_relu", "Use leaky ReLU."), Fix("he_init", "Use He init.")),
            ),
        ),
        layers=(
            LayerSummary("fc1", 100, 2e-06, 1e-06, 3e-06, 2e-06, 1e-06, 0.0, 0, 100),
            LayerSummary("fc2", 100, 0.01, 0.005, 0.02, 0.01, 0.004, 0.25, 0, 100),
            LayerSummary("fc3", 100, 0.2, 0.1, 0.3, 0.2, 0.05, 0.0, 0, 10),
        ),
        first_step=0,
        last_step=99,
        steps_observed=100,
        flow=FlowHistory(
            bin_steps=(0, 50),
            layers=("fc1", "fc2", "fc3"),
            log10_norm=((-5.5, -2.0, -0.7), (-5.8, -2.0, math.nan)),
        ),
        notes=("activations inside fc2 were not covered",),
    )


EXPECTED = """\
gradwatch: 1 problem (1 warning) - steps 0-99 (100 observed)
+- 1. vanishing_gradient (warning) --------------------------------------------+
| The first layers (fc1) receive 1.0e-05 of the last layer's gradient norm.    |
| where: fc1                                                                   |
| steps: 10-99                                                                 |
| evidence: first_last_norm_ratio=1.0e-05, first_layer_norm=2.0e-06            |
| fixes, best first:                                                           |
| 1. leaky_relu: Use leaky ReLU.                                               |
| 2. he_init: Use He init.                                                     |
+------------------------------------------------------------------------------+
Gradient norm per layer, first to last (* warning, ! error):
layer   |g| typ   flow (log)       over run       zeros    
───────────────────────────────────────────────────────────
fc1     2.0e-06   █                ▆▃                0%   *
fc2        0.01   ██████████▌      ▅▅               25%    
fc3         0.2   ██████████████   ▅                 0%    
note: activations inside fc2 were not covered
"""


def test_render_is_exact_at_80_columns_without_colour():
    assert sample_report().render(width=80) == EXPECTED


def test_rich_print_renders_the_same_text():
    buffer = io.StringIO()
    Console(file=buffer, width=80, color_system=None, legacy_windows=False).print(sample_report())
    assert buffer.getvalue() == EXPECTED


def test_every_rendered_line_fits_in_80_columns_even_with_long_names():
    long = LayerSummary("encoder.layers.11.self_attn.out_proj", 5, 1.0, 1.0, 1.0, 1.0, 1.0, 0, 0, 1)
    report = Report(layers=(long,) * 3, first_step=0, last_step=4, steps_observed=5)
    assert max(len(line) for line in report.render(width=80).splitlines()) <= 80


def test_healthy_summary_line():
    report = Report(first_step=0, last_step=9, steps_observed=10)
    assert report.render().splitlines()[0] == (
        "gradwatch: gradients look healthy - steps 0-9 (10 observed)"
    )


def test_many_layers_are_elided_in_the_middle():
    layers = tuple(LayerSummary(f"l{i}", 1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0, 1) for i in range(100))
    text = Report(layers=layers, steps_observed=1).render()
    assert "... 60 more" in text and "l0 " in text and "l99" in text and "l50 " not in text


def test_json_round_trip_is_exact(tmp_path):
    report = sample_report()
    path = tmp_path / "run.json"
    report.to_json(path)
    again = Report.from_json(path)
    assert again.to_dict() == report.to_dict()
    assert math.isnan(again.flow.log10_norm[1][2])
    assert again.findings == report.findings
    assert Report.from_json(report.to_json()).to_dict() == report.to_dict()


def test_to_dict_is_strict_json_with_a_schema_version():
    raw = sample_report().to_dict()
    assert raw["schema_version"] == 1
    text = json.dumps(raw, allow_nan=False)  # raises on a bare NaN
    assert '"NaN"' in text


def test_unknown_schema_version_is_rejected():
    raw = sample_report().to_dict()
    raw["schema_version"] = 99
    with pytest.raises(ValueError, match="schema_version"):
        Report.from_dict(raw)


def test_plot_writes_a_non_blank_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    path = sample_report().plot(tmp_path / "flow.png")
    with Image.open(path) as image:
        assert image.size[0] > 600 and image.size[1] > 200
        extrema = image.convert("L").getextrema()
        assert extrema[1] - extrema[0] > 100  # not a blank canvas

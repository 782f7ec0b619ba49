"""What the console shows during and after a run: distinct layer names at 80 columns,
warnings on a line of their own pointing at the user's line, no numpy warning, and
each report in its framework's spelling."""

# ruff: noqa: W291 (exact rendered text, trailing spaces included)

from __future__ import annotations

import io
import math
import sys
import warnings
from typing import Any

import pytest
from synth import grad_step

from gradwatch import Analyzer, GradwatchWarning, LayerSummary, Report, StepStats
from gradwatch.fixes import FIXES, fix
from gradwatch.monitor import Monitor
from gradwatch.render import elide_names
from gradwatch.report import FlowHistory
from gradwatch.rules.base import nanmax

GPT2 = [
    f"transformer.h.{i}.{part}"
    for i in range(4)
    for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
]
BERT = [
    f"transformer_layer_{i}/{part}"
    for i in range(2)
    for part in (
        "self_attention/query",
        "self_attention/key",
        "self_attention/value",
        "self_attention/attention_output",
        "self_attention_layer_norm",
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
        "feedforward_layer_norm",
    )
]


def report_of(names: list[str]) -> Report:
    layers = tuple(
        LayerSummary(n, 10, 10.0 ** (-i / 5), 1e-3, 1.0, 0.1, 0.1, 0.0, 0, 100)
        for i, n in enumerate(names)
    )
    row = tuple(-i / 5 for i in range(len(names)))
    flow = FlowHistory(bin_steps=(0, 5), layers=tuple(names), log10_norm=(row, row))
    return Report(layers=layers, first_step=0, last_step=9, steps_observed=10, flow=flow)


def table_names(text: str) -> list[str]:
    rows = text.splitlines()[4:]
    return [line.split("  ")[0] for line in rows if line.strip()]


GPT2_EXPECTED = """\
gradwatch: gradients look healthy - steps 0-9 (10 observed)
Gradient norm per layer, first to last (* warning, ! error):
layer                        |g| typ   flow (log)       over run       zeros   
───────────────────────────────────────────────────────────────────────────────
transformer.h.0.ln_1               1   ██████████████   ▅▅                0%   
transformer.h.0.…c_attn        0.631   █████████████    ▄▄                0%   
transformer.h.0.…c_proj        0.398   ████████████▌    ▅▅                0%   
transformer.h.0.ln_2           0.251   ████████████     ▅▅                0%   
transformer.h.0.mlp.c_fc       0.158   ███████████▌     ▅▅                0%   
transformer.h.0.mlp.c_proj       0.1   ███████████      ▅▅                0%   
transformer.h.1.ln_1          0.0631   ██████████▌      ▅▅                0%   
transformer.h.1.…c_attn       0.0398   ██████████       ▅▅                0%   
transformer.h.1.…c_proj       0.0251   █████████▌       ▅▅                0%   
transformer.h.1.ln_2          0.0158   █████████        ▄▄                0%   
transformer.h.1.mlp.c_fc        0.01   ████████▌        ▅▅                0%   
transformer.h.1.mlp.c_proj   0.00631   ███████▌         ▅▅                0%   
transformer.h.2.ln_1         0.00398   ███████          ▅▅                0%   
transformer.h.2.…c_attn      0.00251   ██████▌          ▅▅                0%   
transformer.h.2.…c_proj      0.00158   ██████           ▅▅                0%   
transformer.h.2.ln_2           0.001   █████▌           ▅▅                0%   
transformer.h.2.mlp.c_fc     6.3e-04   █████            ▅▅                0%   
transformer.h.2.mlp.c_proj   4.0e-04   ████▌            ▅▅                0%   
transformer.h.3.ln_1         2.5e-04   ████             ▄▄                0%   
transformer.h.3.…c_attn      1.6e-04   ███▌             ▅▅                0%   
transformer.h.3.…c_proj      1.0e-04   ███              ▅▅                0%   
transformer.h.3.ln_2         6.3e-05   ██               ▅▅                0%   
transformer.h.3.mlp.c_fc     4.0e-05   █▌               ▅▅                0%   
transformer.h.3.mlp.c_proj   2.5e-05   █                ▅▅                0%   
"""

BERT_EXPECTED = """\
gradwatch: gradients look healthy - steps 0-9 (10 observed)
Gradient norm per layer, first to last (* warning, ! error):
layer                                  |g| typ   flow (log)   over run   zeros  
────────────────────────────────────────────────────────────────────────────────
transformer_layer_0/…query                   1   ████████     ▅▅            0%  
transformer_layer_0/…key                 0.631   ███████▌     ▄▄            0%  
transformer_layer_0/…value               0.398   ███████      ▅▅            0%  
transformer_layer_0/…ttention_output     0.251   ██████▌      ▅▅            0%  
transformer_layer_0/…tion_layer_norm     0.158   ██████       ▅▅            0%  
transformer_layer_0/…ermediate_dense       0.1   █████▌       ▅▅            0%  
transformer_layer_0/…rd_output_dense    0.0631   █████        ▅▅            0%  
transformer_layer_0/…ward_layer_norm    0.0398   ████▌        ▅▅            0%  
transformer_layer_1/…query              0.0251   ████         ▅▅            0%  
transformer_layer_1/…key                0.0158   ███▌         ▄▄            0%  
transformer_layer_1/…value                0.01   ███          ▅▅            0%  
transformer_layer_1/…ttention_output   0.00631   ██▌          ▅▅            0%  
transformer_layer_1/…tion_layer_norm   0.00398   ██▌          ▅▅            0%  
transformer_layer_1/…ermediate_dense   0.00251   ██           ▅▅            0%  
transformer_layer_1/…rd_output_dense   0.00158   █▌           ▅▅            0%  
transformer_layer_1/…ward_layer_norm     0.001   █            ▅▅            0%  
"""


# --- names at 80 columns -------------------------------------------------------------


def test_gpt2_names_are_exact_and_distinct_at_80_columns():
    text = report_of(GPT2).render(width=80)
    assert text == GPT2_EXPECTED
    shown = table_names(text)
    assert len(shown) == len(set(shown)) == len(GPT2)


def test_keras_bert_names_are_exact_and_distinct_at_80_columns():
    text = report_of(BERT).render(width=80)
    assert text == BERT_EXPECTED
    shown = table_names(text)
    assert len(shown) == len(set(shown)) == len(BERT)
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_wider_terminal_shows_whole_names():
    text = report_of(GPT2).render(width=100)
    assert "transformer.h.0.attn.c_attn " in text and "…" not in text


def test_elide_cuts_the_middle_and_keeps_both_ends():
    shown, distinct = elide_names(
        ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"], 24
    )
    assert shown == ["transformer.h.0.…c_attn", "transformer.h.0.…c_proj"] and distinct
    assert elide_names(["fc1", "fc2"], 24) == (["fc1", "fc2"], True)
    # Equal names stay equal, and are no collision to resolve.
    assert elide_names(["a" * 30, "a" * 30], 12)[1]


@pytest.mark.parametrize("width", [12, 16, 24, 31])
def test_elided_names_fit_and_stay_distinct(width: int):
    for names in (GPT2, BERT, [f"encoder.layers.{i}.self_attn.out_proj" for i in range(40)]):
        shown, distinct = elide_names(names, width)
        assert all(len(s) <= width for s in shown)
        if distinct:
            assert len(set(shown)) == len(names)


# --- warnings during the run ---------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _zero_gradient_run(m: Monitor) -> None:
    m.observe([grad_step(s, [0.0, 0.0], zero_frac=1.0) for s in range(40)])


def test_a_warning_starts_on_its_own_line_on_a_terminal_and_points_at_the_user(monkeypatch):
    screen = FakeTTY()
    screen.write("epoch 1:  40%|████      | 40/100")  # a progress bar mid-line
    monkeypatch.setattr(sys, "stderr", screen)

    def show(message: Any, category: Any, filename: str, lineno: int, file=None, line=None):
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", show)
        _zero_gradient_run(Monitor(show=False))
        assert warnings.showwarning is show  # restored after the call
    lines = screen.getvalue().splitlines()
    assert lines[0] == "epoch 1:  40%|████      | 40/100"
    assert lines[1].startswith(f"{__file__}:")  # the user's line, not gradwatch's
    assert "GradwatchWarning: gradwatch error [zero_gradient]" in lines[1]


def test_no_extra_newline_off_a_terminal_or_when_filtered(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradwatchWarning)
        _zero_gradient_run(Monitor(show=False))
    screen = FakeTTY()
    monkeypatch.setattr(sys, "stderr", screen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradwatchWarning)
        _zero_gradient_run(Monitor(show=False))
    assert log.getvalue() == "" and screen.getvalue() == ""


def test_guard_warning_points_at_the_user_line():
    from gradwatch.guard import Guard

    guard = Guard("gradwatch test")
    with pytest.warns(GradwatchWarning, match="switched itself off") as caught, guard:
        raise RuntimeError("boom")
    assert caught[0].filename == __file__


# --- numpy warnings ------------------------------------------------------------------

NAN = math.nan


def test_rules_on_all_nan_windows_emit_no_numpy_warning():
    an = Analyzer(window=40, strict=True)
    acts = {
        "r1": ("relu", 0.9, 0.9, 0.0),
        "r2": ("relu", NAN, 0.9, 0.0),
        "t1": ("tanh", NAN, NAN, 0.9),
        "t2": ("tanh", NAN, NAN, NAN),
        "out": ("sigmoid", 0.1, 0.0, 0.0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(5):
            an.observe_stats(grad_step(step, [1.0, 1.0], acts=acts, output="out"))
        # Skipped AMP steps: every total norm in the window is NaN, and so are the
        # inactive fractions the dead-unit evidence reads.
        for step in range(5, 120):
            an.observe_stats(
                StepStats(
                    step=step,
                    skipped_step=True,
                    act_layers=tuple(acts),
                    act_kinds=tuple(v[0] for v in acts.values()),
                    act_inactive_frac=(NAN,) * 5,
                    act_dead_frac=(0.9, 0.9, NAN, NAN, 0.0),
                    act_tail_frac=(NAN, NAN, 0.9, NAN, 0.0),
                    act_is_output=(False, False, False, False, True),
                )
            )
        # Gradient statistics that are NaN throughout.
        for step in range(120, 160):
            an.observe_stats(grad_step(step, [NAN, NAN], zero_frac=NAN, nonfinite=0))
        report = an.report()
    assert {"dead_relu", "saturation"} <= {f.rule for f in report.findings}


def test_nanmax_is_nan_for_all_nan_and_empty_input():
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(nanmax(np.array([NAN, NAN])))
        assert math.isnan(nanmax(np.array([])))
        assert nanmax(np.array([NAN, 2.0, 1.0])) == 2.0


# --- one framework's spelling ----------------------------------------------------------


def test_fix_texts_keep_both_spellings_and_each_framework_its_own():
    he = fix("he_init")
    assert "kaiming_normal_" in he.text and "he_normal" in he.text
    assert "he_normal" not in he.spelled("torch").text
    assert "kaiming" not in he.spelled("keras").text
    assert he.spelled(None) == he and he.spelled("keras").id == "he_init"
    for fid in FIXES:
        for framework, other in (("torch", "keras."), ("keras", "nn.")):
            assert other not in fix(fid).spelled(framework).text, (fid, framework)


def _vanishing_run(framework: str | None) -> Report:
    m = Monitor(show=False, on_finding="ignore", framework=framework)
    m.observe([grad_step(s, [1e-7, 1e-5, 1e-3, 1e-1, 1.0], zero_frac=0.0) for s in range(60)])
    return m.report()


def test_a_keras_report_speaks_keras_only_and_round_trips(tmp_path):
    report = _vanishing_run("keras")
    assert report.framework == "keras" and report.findings
    text = report.render(width=100)
    assert "nn." not in text and "torch" not in text
    assert "kernel_initializer" in text or "keras." in text
    path = tmp_path / "run.json"
    report.to_json(path)
    assert Report.from_json(path) == report
    assert Report.from_json(path).framework == "keras"


def test_a_torch_report_speaks_torch_only_and_none_speaks_both():
    torch_text = _vanishing_run("torch").render(width=100)
    assert "keras" not in torch_text and "nn." in torch_text
    both = _vanishing_run(None).render(width=100)
    assert " / " in both
    assert _vanishing_run(None).framework is None


def test_warnings_speak_the_framework_too():
    m = Monitor(show=False, framework="keras")
    with pytest.warns(GradwatchWarning) as caught:
        m.observe([grad_step(s, [1e-7, 1e-5, 1e-3, 1e-1, 1.0]) for s in range(60)])
    text = " ".join(str(w.message) for w in caught)
    assert "Try first" in text and "nn." not in text


def test_bad_framework_is_refused():
    with pytest.raises(ValueError, match="framework"):
        Monitor(framework="jax")

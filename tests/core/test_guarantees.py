"""The core's promises under hostile input (issue #15): bad configuration fails at
construction naming the parameter; a saved report reads back equal; the CLI answers
bad input with one line and exit code 2."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synth import grad_step, run

from gradwatch import Analyzer, Report, every
from gradwatch.cli import main
from gradwatch.monitor import Monitor
from gradwatch.rules import DeadRelu, VanishingGradient

# Values a careless call passes: wrong types, strings that look right, extremes.
hostile_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["warn", "yes", "false", "dead_relu", "1"]),
    st.lists(st.integers(), max_size=3),
)

ANALYZER_PARAMETERS = ("window", "history_bins", "check_every", "group_by", "on_finding", "strict")


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(ANALYZER_PARAMETERS), value=hostile_values)
def test_analyzer_arguments_fail_at_construction_naming_the_parameter_or_work(name, value):
    try:
        an = Analyzer(**{name: value})
    except (ValueError, TypeError) as exc:
        assert name in str(exc)
        return
    # Accepted: it must then run a step without error.
    an.observe_stats(grad_step(0, [1.0]))
    assert an.report().steps_observed == 1


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(["on_finding", "strict", "show", "window", "check_every"]),
    value=hostile_values,
)
def test_monitor_arguments_fail_at_construction_naming_the_parameter_or_work(name, value):
    try:
        m = Monitor(show=False, **{name: value})
    except (ValueError, TypeError) as exc:
        assert name in str(exc)
        return
    m.observe([grad_step(0, [1.0])])
    assert m.report().steps_observed == 1


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(["dead_fraction", "min_samples", "window", "persistence", "hysteresis"]),
    value=hostile_values,
)
def test_rule_thresholds_fail_at_construction_naming_the_field_or_work(field, value):
    try:
        rule = DeadRelu(**{field: value})
    except (ValueError, TypeError) as exc:
        assert field in str(exc)
        return
    assert isinstance(getattr(rule, field), (int, float))


@settings(max_examples=200, deadline=None)
@given(k=hostile_values, dense_until=hostile_values)
def test_every_fails_at_construction_or_answers_bools(k, dense_until):
    try:
        schedule = every(k, dense_until=dense_until)
    except (ValueError, TypeError) as exc:
        assert "every(" in str(exc)
        return
    assert all(isinstance(schedule(step), bool) for step in range(5))


@pytest.mark.parametrize(
    ("factory", "parameter"),
    [
        (lambda: Analyzer(on_finding="warn"), "on_finding"),
        (lambda: Analyzer(strict="yes"), "strict"),
        (lambda: Analyzer(group_by=None), "group_by"),
        (lambda: Analyzer(window=10**12), "window"),
        (lambda: Analyzer(rules=5), "rules"),
        (lambda: Analyzer(rules=[object()]), "rules"),
        (lambda: every(1, dense_until=-5), "dense_until"),
        (lambda: VanishingGradient(ratio_threshold="1e-3"), "ratio_threshold"),
        (lambda: DeadRelu(min_samples=2.5), "min_samples"),
    ],
)
def test_each_reported_bad_configuration_names_its_parameter(factory, parameter):
    with pytest.raises((ValueError, TypeError), match=parameter):
        factory()


def test_a_schedule_with_the_wrong_signature_or_answer_fails_at_check():
    from gradwatch.config import check_schedule

    with pytest.raises(ValueError, match=r"grad_schedule.*raised TypeError"):
        check_schedule("grad_schedule", lambda step, extra: True)
    with pytest.raises(ValueError, match="grad_schedule must return True or False"):
        check_schedule("grad_schedule", lambda step: "yes")
    assert check_schedule("grad_schedule", every(10)) is not None


# --- report round trip ------------------------------------------------------------


def test_a_report_holding_nan_equals_its_json_round_trip():
    # fc1 appears at step 30 (NaN in the flow before it) and fc2's gradient is always
    # exactly zero (typical norm 0, minimum NaN-free but log-norm NaN).
    def make(step, rng):
        names = ["fc0.weight", "fc2.weight"] + (["fc1.weight"] if step >= 30 else [])
        return grad_step(step, [0.5, 0.0] + ([1.0] if step >= 30 else []), names=names)

    report = run(60, make).report()
    text = json.dumps(report.to_dict())
    assert "NaN" in text
    assert Report.from_json(report.to_json()) == report
    assert Report.from_json(report.to_json()) != Report()


# --- CLI ----------------------------------------------------------------------------

_GOOD = run(30, lambda s, r: grad_step(s, [0.5, 1.0])).report().to_dict()

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


def _mutations():
    keys = sorted(_GOOD)
    return st.one_of(
        json_values,
        st.builds(lambda k, v: {**_GOOD, k: v}, st.sampled_from(keys), json_values),
        st.builds(lambda k: {x: _GOOD[x] for x in keys if x != k}, st.sampled_from(keys)),
        st.builds(lambda k, v: {**_GOOD, k: v}, st.text(min_size=1, max_size=5), json_values),
    )


@settings(max_examples=150, deadline=None)
@given(document=_mutations())
def test_the_report_command_answers_any_json_with_a_report_or_one_line_and_exit_2(
    document, tmp_path_factory
):
    path = tmp_path_factory.mktemp("cli") / "run.json"
    path.write_text(json.dumps(document))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["report", str(path), "--width", "80"])
    if code == 0:
        assert "gradwatch" in out.getvalue().lower()
    else:
        assert code == 2
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in lines[0]


@pytest.mark.parametrize(
    "document",
    [[1, 2], {**_GOOD, "findings": 5}, {**_GOOD, "surprise": 1}, "[" * 50_000],
    ids=["list", "findings-5", "unknown-key", "deep"],
)
def test_reported_bad_json_shapes_give_one_line_and_exit_2(document, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1


def test_ragged_flow_rows_are_rejected(tmp_path, capsys):
    bad = json.loads(json.dumps(_GOOD))
    bad["flow"]["log10_norm"][0] = bad["flow"]["log10_norm"][0][:1]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(bad))
    assert main(["report", str(path)]) == 2
    assert "flow rows" in capsys.readouterr().err


def test_a_zero_width_gives_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_GOOD))
    with pytest.raises(SystemExit) as info:
        main(["report", str(path), "--width", "0"])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert "--width" in err and len(err.strip().splitlines()) == 1 and out == ""


@pytest.mark.parametrize(
    ("plot", "says"),
    [("/no/such/dir/flow.png", "no such directory"), ("flow.gif", "unsupported extension")],
)
def test_a_bad_plot_path_gives_one_line_and_exit_2_before_the_report(plot, says, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_GOOD))
    assert main(["report", str(path), "--plot", plot]) == 2
    out, err = capsys.readouterr()
    assert says in err and len(err.strip().splitlines()) == 1
    assert out == ""  # nothing printed before the error


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("gradwatch ")


# --- never "healthy" over what was not seen -------------------------------------------


def test_a_report_with_no_observed_step_is_not_healthy_and_says_so():
    report = Analyzer().report()
    assert not report.healthy
    first = report.render(width=100).splitlines()[0]
    assert "healthy" not in first and "nothing was judged" in first


def test_a_report_cut_short_by_an_internal_error_is_not_healthy_and_says_where():
    class Broken(DeadRelu):
        def check(self, ctx):
            if ctx.step >= 25:
                raise ZeroDivisionError("rule bug")
            return None

    an = Analyzer(rules=[Broken()])
    with pytest.warns(UserWarning, match="internal error"):
        run(40, lambda s, r: grad_step(s, [0.5, 1.0]), analyzer=an)
    report = an.report()
    assert report.stopped_at == 25 and not report.healthy
    first = report.render(width=120).splitlines()[0]
    assert "healthy" not in first and "stopped at step 25" in first
    assert Report.from_json(report.to_json()) == report


def test_a_monitor_whose_adapter_failed_marks_the_report_stopped():
    m = Monitor(show=False)
    m.observe([grad_step(s, [0.5, 1.0]) for s in range(5)])
    m.error_step = 4
    with pytest.warns(UserWarning, match="internal error"), m.guard:
        raise RuntimeError("adapter bug")
    report = m.report()
    assert report.stopped_at == 4 and not report.healthy
    assert any("adapter bug" in note for note in report.notes)


# --- numbers at the edges of float64 ----------------------------------------------------


def test_host_reductions_are_right_for_complex_huge_and_subnormal_gradients():
    import warnings

    import numpy as np

    from gradwatch.reduce import grad_stats_from_array

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or complex-cast warning escapes
        assert grad_stats_from_array(np.array([3 + 4j, 0]))[0] == pytest.approx(5.0)
        norm, peak, *_ = grad_stats_from_array(np.array([1e200, 1e200]))
        assert norm == pytest.approx(np.sqrt(2) * 1e200) and peak == 1e200
        tiny = np.array([1e-310, 1e-310])
        assert grad_stats_from_array(tiny)[0] == pytest.approx(np.sqrt(2) * 1e-310, rel=1e-6)
        an = Analyzer(strict=True)
        an.observe(0, grads={"a.w": np.array([1e200]), "a.b": np.array([1e200])})
        (layer,) = an.report().layers
    assert layer.typical_norm == pytest.approx(np.sqrt(2) * 1e200)
    assert layer.nonfinite == 0

"""Configuration fails at construction, naming the parameter, or works in a real fit
(issue #15): a single rule id or Rule is a list of one, a wrong type is an error."""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")
hypothesis = pytest.importorskip("hypothesis")

import math  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from keras_helpers import compile_classifier, data, mlp  # noqa: E402

from gradwatch import GradWatchCallback  # noqa: E402
from gradwatch.rules import DEFAULT_RULES  # noqa: E402

_X, _Y = data(n=48, features=16)


def _tiny_fit(cb: GradWatchCallback) -> None:
    model = compile_classifier(mlp(depth=1, width=4))
    model.fit(_X, _Y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[cb])


def _dead_relu_rule():
    return next(r for r in DEFAULT_RULES if r.id == "dead_relu")


@pytest.mark.parametrize("rules", ["dead_relu", "make_rules", ("dead_relu", "saturation")])
def test_a_single_rule_id_or_rule_is_a_list_of_one(rules) -> None:
    if rules == "make_rules":
        rules = _dead_relu_rule()
    cb = GradWatchCallback(rules=rules, sample_every=1, verbose=0, on_finding="ignore")
    expected = ("dead_relu",) if not isinstance(rules, tuple) else rules
    assert tuple(r.id for r in cb.rules) == expected
    _tiny_fit(cb)
    assert cb.report.steps_observed == 3
    assert cb.enabled
    assert not any("internal error" in n for n in cb.report.notes)


@pytest.mark.parametrize(
    "rules", [5, None, [5], b"dead_relu", ["dead_relu", "dead_relu"], "no_such_rule", object()]
)
def test_rules_of_a_wrong_type_or_value_fail_at_construction(rules) -> None:
    with pytest.raises(ValueError, match="rules"):
        GradWatchCallback(rules=rules)


_HOSTILE = st.sampled_from(
    [None, "", "yes", "false", -1, 0, 1.5, math.nan, math.inf, True, False, [], {}, 10**12, b"1"]
)
_ARGUMENTS = {
    "rules": st.one_of(
        st.sampled_from(
            [DEFAULT_RULES, "dead_relu", "zero_gradient", ["saturation", "vanishing_gradient"]]
        ),
        st.just("make_rule"),
        _HOSTILE,
    ),
    "window": st.one_of(st.integers(-2, 120), _HOSTILE),
    "flush_every": st.one_of(st.integers(-1, 40), _HOSTILE),
    "sample_every": st.one_of(st.integers(-1, 9), _HOSTILE),
    "dense_until": st.one_of(st.integers(-2, 60), _HOSTILE),
    "activations": st.one_of(st.booleans(), _HOSTILE),
    "tail_derivative_fraction": st.one_of(st.floats(-0.5, 1.5), _HOSTILE),
    "on_finding": st.one_of(st.sampled_from(["warn", "ignore", "stop", "raise", print]), _HOSTILE),
    "verbose": st.one_of(st.integers(-1, 2), _HOSTILE),
    "strict": st.one_of(st.booleans(), _HOSTILE),
}


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(kwargs=st.fixed_dictionaries({}, optional=_ARGUMENTS))
def test_every_constructor_argument_fails_naming_it_or_works(kwargs, capsys) -> None:
    if kwargs.get("rules") == "make_rule":
        kwargs["rules"] = _dead_relu_rule()
    try:
        cb = GradWatchCallback(**kwargs)
    except (ValueError, TypeError) as exc:
        named = [name for name in kwargs if name in str(exc)]
        assert named, f"{exc!r} names none of {sorted(kwargs)}"
        return
    # A working callback: a tiny fit runs, monitored, and leaves a report.
    _tiny_fit(cb)
    capsys.readouterr()
    assert cb.report is not None
    assert cb.enabled, cb.report.notes
    assert cb.report.steps_observed >= 1

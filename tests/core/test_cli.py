"""The gradwatch command line: report rendering and argument errors."""

from __future__ import annotations

import pytest
from synth import decaying, grad_step, run

from gradwatch.cli import main


def test_report_subcommand_renders_a_saved_report(tmp_path, capsys):
    an = run(60, lambda s, r: grad_step(s, decaying(10, 0.25)))
    path = tmp_path / "run.json"
    an.report().to_json(path)
    assert main(["report", str(path), "--width", "80"]) == 0
    out = capsys.readouterr().out
    assert "vanishing_gradient (warning)" in out
    assert "fc0" in out


def test_report_subcommand_fails_cleanly_on_a_missing_file(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2

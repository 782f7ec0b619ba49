"""The ``gradwatch`` command: ``gradwatch demo`` and ``gradwatch report run.json``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

# What matplotlib's Agg canvas writes without extra backends.
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit code 2 (argparse prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from gradwatch import __version__

    parser = _OneLineParser(
        prog="gradwatch", description="Gradient-health monitor for deep learning training runs."
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    demo = sub.add_parser(
        "demo",
        help="train a broken network, diagnose it, apply the top fix, train again",
        description="Train a deep sigmoid network with N(0,1) init on scikit-learn's "
        "bundled digits, print gradwatch's diagnosis, apply the top-ranked fix and "
        "train again with the same budget. Needs no network.",
    )
    demo.add_argument("--framework", choices=("torch", "keras"), default="torch")
    demo.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps per run")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", type=Path, default=None, help="write both reports here")
    demo.add_argument("--plot", type=Path, default=None, help="write the 'before' flow PNG")

    report = sub.add_parser("report", help="render a report saved with Report.to_json")
    report.add_argument("path", type=Path)
    report.add_argument("--plot", type=Path, default=None, help="also write the flow PNG here")
    report.add_argument(
        "--width", type=_positive_int, default=None, help="console width (at least 1)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "report":
        return _report(args.path, args.plot, args.width)
    from gradwatch.demo import run_demo

    return int(
        run_demo(
            framework=args.framework,
            steps=args.steps,
            seed=args.seed,
            json_path=args.json,
            plot_path=args.plot,
        )
    )


def _report(path: Path, plot: Path | None, width: int | None) -> int:
    from rich.console import Console

    from gradwatch.report import Report

    if plot is not None:
        problem = _plot_problem(plot)
        if problem is not None:
            print(f"gradwatch: cannot write {plot}: {problem}", file=sys.stderr)
            return 2
    try:
        report = Report.from_json(path)
    except (OSError, ValueError) as exc:
        print(f"gradwatch: cannot read {path}: {_one_line(exc)}", file=sys.stderr)
        return 2
    Console(width=width).print(report)
    if plot is not None:
        try:
            written = report.plot(plot)
        except (OSError, ValueError, ImportError) as exc:
            print(f"gradwatch: cannot write {plot}: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"wrote {written}")
    return 0


def _plot_problem(plot: Path) -> str | None:
    """Why ``plot`` cannot be written, checked before the report is printed."""
    if plot.suffix.lower() not in PLOT_SUFFIXES:
        return f"unsupported extension {plot.suffix!r}; use one of {', '.join(PLOT_SUFFIXES)}"
    if not plot.parent.is_dir():
        return f"no such directory {str(plot.parent)!r}"
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``gradwatch`` command: ``gradwatch demo`` and ``gradwatch report run.json``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description="Gradient-health monitor for deep learning training runs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a broken network, diagnose it, apply the top fix, train again",
        description="Train a deep sigmoid network with N(0,1) init on scikit-learn's "
        "bundled digits, print gradwatch's diagnosis, apply the top-ranked fix and "
        "train again with the same budget. Needs no network.",
    )
    demo.add_argument("--framework", choices=("torch", "keras"), default="torch")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", type=Path, default=None, help="write both reports here")
    demo.add_argument("--plot", type=Path, default=None, help="write the 'before' flow PNG")

    report = sub.add_parser("report", help="render a report saved with Report.to_json")
    report.add_argument("path", type=Path)
    report.add_argument("--plot", type=Path, default=None, help="also write the flow PNG here")
    report.add_argument("--width", type=int, default=None, help="console width")
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

    try:
        report = Report.from_json(path)
    except (OSError, ValueError, KeyError) as exc:
        print(f"gradwatch: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    Console(width=width).print(report)
    if plot is not None:
        written = report.plot(plot)
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
